"""The public names and signatures of the contract (shared DESIGN.md), as the original has them.

Code written for the original calls these by keyword; a renamed argument or a
changed default breaks it silently, so each signature is pinned here.
"""

import importlib
import inspect

import pytest

# module -> {name: "signature as str(inspect.signature)" or None when only existence is pinned}
CONTRACT = {
    "gaussian_diffusion": {
        "get_named_beta_schedule": "(schedule_name, num_diffusion_timesteps)",
        "betas_for_alpha_bar": "(num_diffusion_timesteps, alpha_bar, max_beta=0.999)",
        "ModelMeanType": None,
        "ModelVarType": None,
        "LossType": None,
        "GaussianDiffusion": "(*, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False)",
        "GaussianDiffusion.q_mean_variance": "(self, x_start, t)",
        "GaussianDiffusion.q_sample": "(self, x_start, t, noise=None)",
        "GaussianDiffusion.q_posterior_mean_variance": "(self, x_start, x_t, t)",
        "GaussianDiffusion.p_mean_variance": (
            "(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None)"
        ),
        "GaussianDiffusion.condition_mean": "(self, cond_fn, p_mean_var, x, t, model_kwargs=None)",
        "GaussianDiffusion.condition_score": "(self, cond_fn, p_mean_var, x, t, model_kwargs=None)",
        "GaussianDiffusion.p_sample": (
            "(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, *, "
            "generator=None)"
        ),
        "GaussianDiffusion.p_sample_loop": (
            "(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, "
            "device=None, progress=False, *, generator=None)"
        ),
        "GaussianDiffusion.p_sample_loop_progressive": (
            "(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, "
            "device=None, progress=False, *, generator=None)"
        ),
        "GaussianDiffusion.ddim_sample": (
            "(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0, *, "
            "generator=None)"
        ),
        "GaussianDiffusion.ddim_reverse_sample": (
            "(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0)"
        ),
        "GaussianDiffusion.ddim_sample_loop": (
            "(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, "
            "device=None, progress=False, eta=0.0, *, generator=None)"
        ),
        "GaussianDiffusion.ddim_sample_loop_progressive": (
            "(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, "
            "device=None, progress=False, eta=0.0, *, generator=None)"
        ),
        "GaussianDiffusion.training_losses": "(self, model, x_start, t, model_kwargs=None, noise=None)",
        "GaussianDiffusion.calc_bpd_loop": "(self, model, x_start, clip_denoised=True, model_kwargs=None)",
    },
    "respace": {"space_timesteps": "(num_timesteps, section_counts)", "SpacedDiffusion": "(use_timesteps, **kwargs)"},
    "losses": {
        "normal_kl": "(mean1, logvar1, mean2, logvar2)",
        "approx_standard_normal_cdf": "(x)",
        "discretized_gaussian_log_likelihood": "(x, *, means, log_scales)",
    },
    "resample": {
        "create_named_schedule_sampler": "(name, diffusion)",
        "ScheduleSampler.sample": "(self, batch_size, device)",
        "LossAwareSampler.update_with_local_losses": "(self, local_ts, local_losses)",
        "LossSecondMomentResampler": "(diffusion, history_per_term=10, uniform_prob=0.001)",
        "UniformSampler": "(diffusion)",
    },
    "nn": {
        "timestep_embedding": "(timesteps, dim, max_period=10000)",
        "normalization": "(channels)",
        "conv_nd": "(dims, *args, **kwargs)",
        "linear": "(*args, **kwargs)",
        "avg_pool_nd": "(dims, *args, **kwargs)",
        "update_ema": "(target_params, source_params, rate=0.99)",
        "zero_module": "(module)",
        "scale_module": "(module, scale)",
        "mean_flat": "(tensor)",
        "checkpoint": "(func, inputs, params, flag)",
        "CheckpointFunction": None,
        "CheckpointFunction.forward": "(ctx, run_function, length, *args)",
        "CheckpointFunction.backward": "(ctx, *output_grads)",
    },
    "unet": {
        "UNetModel": (
            "(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, "
            "dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None, "
            "use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1, "
            "use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)"
        ),
        "UNetModel.forward": "(self, x, timesteps, y=None)",
        "UNetModel.convert_to_fp16": "(self)",
        "UNetModel.convert_to_fp32": "(self)",
        "SuperResModel": "(image_size, in_channels, *args, **kwargs)",
        "SuperResModel.forward": "(self, x, timesteps, low_res=None, **kwargs)",
        "EncoderUNetModel": (
            "(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, "
            "dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, use_checkpoint=False, use_fp16=False, "
            "num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, "
            "resblock_updown=False, use_new_attention_order=False, pool='adaptive')"
        ),
        "EncoderUNetModel.forward": "(self, x, timesteps)",
        "ResBlock": (
            "(channels, emb_channels, dropout, out_channels=None, use_conv=False, use_scale_shift_norm=False, dims=2, "
            "use_checkpoint=False, up=False, down=False)"
        ),
        "AttentionBlock": (
            "(channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, use_new_attention_order=False)"
        ),
        "QKVAttention": "(n_heads)",
        "QKVAttentionLegacy": "(n_heads)",
        "QKVAttention.count_flops": "(model, _x, y)",
        "QKVAttentionLegacy.count_flops": "(model, _x, y)",
        "count_flops_attn": "(model, _x, y)",
        "AttentionPool2d": "(spacial_dim, embed_dim, num_heads_channels, output_dim=None)",
        "Upsample": "(channels, use_conv, dims=2, out_channels=None)",
        "Downsample": "(channels, use_conv, dims=2, out_channels=None)",
        "TimestepBlock": None,
        "TimestepEmbedSequential": None,
    },
    "script_util": {
        "NUM_CLASSES": None,
        "diffusion_defaults": "()",
        "model_and_diffusion_defaults": "()",
        "classifier_defaults": "()",
        "classifier_and_diffusion_defaults": "()",
        "sr_model_and_diffusion_defaults": "()",
        "create_model": (
            "(image_size, num_channels, num_res_blocks, channel_mult='', learn_sigma=False, class_cond=False, "
            "use_checkpoint=False, attention_resolutions='16', num_heads=1, num_head_channels=-1, "
            "num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0, resblock_updown=False, use_fp16=False, "
            "use_new_attention_order=False, num_classes=1000, p_uncond=0.0)"
        ),
        "create_classifier": (
            "(image_size, classifier_use_fp16, classifier_width, classifier_depth, classifier_attention_resolutions, "
            "classifier_use_scale_shift_norm, classifier_resblock_updown, classifier_pool, num_classes=1000)"
        ),
        "sr_create_model": (
            "(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint, "
            "attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm, dropout, "
            "resblock_updown, use_fp16, num_classes=1000, p_uncond=0.0)"
        ),
        "create_gaussian_diffusion": (
            "(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule='linear', use_kl=False, "
            "predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False, timestep_respacing='')"
        ),
        "create_model_and_diffusion": None,
        "create_classifier_and_diffusion": None,
        "sr_create_model_and_diffusion": None,
        "add_dict_to_argparser": "(parser, default_dict)",
        "args_to_dict": "(args, keys)",
        "str2bool": "(v)",
    },
    "train_util": {
        "TrainLoop": (
            "(*, model, diffusion, data, batch_size, microbatch, lr, ema_rate, log_interval, save_interval, "
            "resume_checkpoint, use_fp16=False, fp16_scale_growth=0.001, schedule_sampler=None, weight_decay=0.0, "
            "lr_anneal_steps=0, use_bf16=False)"
        ),
        "TrainLoop.run_loop": "(self)",
        "TrainLoop.run_step": "(self, batch, cond)",
        "parse_resume_step_from_filename": "(filename)",
        "log_loss_dict": "(diffusion, ts, losses)",
    },
    "fp16_util": {
        "convert_module_to_f16": "(l)",
        "convert_module_to_f32": "(l)",
        "check_overflow": "(value)",
        "get_param_groups_and_shapes": "(named_model_params)",
        "MixedPrecisionTrainer": (
            "(*, model, use_fp16=False, fp16_scale_growth=0.001, initial_lg_loss_scale=20.0, use_bf16=False)"
        ),
        "MixedPrecisionTrainer.zero_grad": "(self)",
        "MixedPrecisionTrainer.backward": "(self, loss)",
        "MixedPrecisionTrainer.optimize": "(self, opt)",
        "MixedPrecisionTrainer.master_params_to_state_dict": "(self, master_params)",
        "MixedPrecisionTrainer.state_dict_to_master_params": "(self, state_dict)",
    },
    "image_datasets": {
        "load_data": (
            "(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False, random_crop=False, "
            "random_flip=True, label_source='filename')"
        ),
        "ImageDataset": (
            "(resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True)"
        ),
        "center_crop_arr": "(pil_image, image_size)",
        "random_crop_arr": "(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0)",
    },
    "dist_util": {"setup_dist": "()", "dev": "()", "load_state_dict": "(path, **kwargs)", "sync_params": "(params)"},
    "logger": {
        "configure": "(dir=None, format_strs=None, comm=None, log_suffix='')",
        "logkv": "(key, val)",
        "logkv_mean": "(key, val)",
        "logkvs": "(d)",
        "dumpkvs": "()",
        "getkvs": "()",
        "log": None,
        "debug": None,
        "info": None,
        "warn": None,
        "error": None,
        "set_level": "(level)",
        "get_dir": "()",
        "get_current": "()",
        "reset": "()",
    },
}

CASES = [(module, name, sig) for module, names in CONTRACT.items() for name, sig in names.items()]


def _resolve(module, dotted):
    obj = importlib.import_module(f"guided_diffusion.{module}")
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module, name, signature", CASES, ids=[f"{m}.{n}" for m, n, _ in CASES])
def test_contract_name_and_signature(module, name, signature):
    obj = _resolve(module, name)
    if signature is not None:
        actual = inspect.signature(obj)
        assert signature in (str(actual), str(_without_extensions(actual)))


def _without_extensions(signature):
    """The signature without our keyword-only extensions (generator=, attention_impl=): they have defaults
    and come after every original parameter, so calls written for the original are unaffected."""
    kept = [p for p in signature.parameters.values() if p.kind != p.KEYWORD_ONLY or p.default is p.empty]
    return signature.replace(parameters=kept)


def test_enum_members():
    gd = importlib.import_module("guided_diffusion.gaussian_diffusion")
    assert [m.name for m in gd.ModelMeanType] == ["PREVIOUS_X", "START_X", "EPSILON"]
    assert [m.name for m in gd.ModelVarType] == ["LEARNED", "FIXED_SMALL", "FIXED_LARGE", "LEARNED_RANGE"]
    assert [m.name for m in gd.LossType] == ["MSE", "RESCALED_MSE", "KL", "RESCALED_KL"]


MATH_CORE = ["gaussian_diffusion", "respace", "losses", "resample", "samplers"]


def _imports(tree):
    """(module roots, relative module or None) of every import statement in tree."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield {alias.name.split(".")[0] for alias in node.names}, None
        elif isinstance(node, ast.ImportFrom):
            yield ({"."}, node.module) if node.level else ({node.module.split(".")[0]}, None)


@pytest.mark.parametrize("module", MATH_CORE)
def test_math_core_imports_only_torch_and_numpy(module):
    """At module level, the math core imports torch, numpy and its own modules. Inside functions it may
    also reach tqdm (progress=True) and dist_util (the loss-aware sampler gathers losses over ranks)."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(importlib.import_module(f"guided_diffusion.{module}").__file__).read_text())
    allowed = {"torch", "numpy", "enum", "functools", "math", "abc", "dataclasses", "."}
    siblings = set(MATH_CORE) | {"nn"}
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for roots, relative in _imports(ast.Module(body=top_level, type_ignores=[])):
        assert roots <= allowed and (relative is None or relative in siblings), (roots, relative)
    for roots, relative in _imports(tree):
        assert roots <= allowed | {"tqdm"} and (relative is None or relative in siblings | {"dist_util"}), roots
