"""Flags, defaults and factories: the original's values, one definition per flag."""

import argparse
import inspect

import pytest
import torch as th

from guided_diffusion import flags as fl
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import script_util as su


def test_defaults_are_the_originals():
    assert su.diffusion_defaults() == dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )
    model = su.model_and_diffusion_defaults()
    assert model == dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        num_classes=1000,
        p_uncond=0.0,  # beyond the original, like num_classes: 0 keeps its layout and training
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        **su.diffusion_defaults(),
    )
    assert su.classifier_defaults() == dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
        num_classes=1000,
    )
    sr = su.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64
    assert not {"image_size", "channel_mult", "use_new_attention_order"} & set(sr)
    assert su.NUM_CLASSES == 1000


@pytest.mark.parametrize(
    "defaults, factory",
    [
        (su.model_and_diffusion_defaults, su.create_model_and_diffusion),
        (su.classifier_and_diffusion_defaults, su.create_classifier_and_diffusion),
        (su.sr_model_and_diffusion_defaults, su.sr_create_model_and_diffusion),
    ],
)
def test_factories_take_exactly_the_flags(defaults, factory):
    assert set(inspect.signature(factory).parameters) == set(defaults())


def test_every_flag_has_help():
    for group in (fl.DIFFUSION_FLAGS, fl.MODEL_FLAGS, fl.CLASSIFIER_FLAGS, fl.SR_FLAGS):
        for flag in group:
            assert flag.help and fl.FLAG_BY_NAME[flag.name].help


def test_channel_mult_table_and_explicit_values():
    assert su.parse_channel_mult("", 512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult("", 256) == (1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult("", 128) == (1, 1, 2, 3, 4)
    assert su.parse_channel_mult("", 64) == (1, 2, 3, 4)
    assert su.parse_channel_mult("", 32) == (1, 2, 2, 2)
    assert su.parse_channel_mult("", 16) == (1, 2, 2)
    assert su.parse_channel_mult("1,2,2,2", 64) == (1, 2, 2, 2)
    assert su.parse_channel_mult("0.5,1", 64) == (0.5, 1)
    assert su.parse_channel_mult((1, 3), 64) == (1, 3)
    with pytest.raises(ValueError, match="unsupported image size: 48"):
        su.parse_channel_mult("", 48)


def test_attention_resolutions_become_downsample_rates():
    assert su.parse_attention_resolutions("32,16,8", 64) == (2, 4, 8)
    assert su.parse_attention_resolutions("16", 256) == (16,)
    assert su.parse_attention_resolutions([32, 16], 128) == (4, 8)
    assert su.parse_attention_resolutions("", 64) == ()


def test_num_classes_reaches_every_network():
    model = su.create_model(16, 32, 1, class_cond=True, num_classes=7, attention_resolutions="8")
    assert model.label_emb.weight.shape[0] == 7
    assert su.create_model(16, 32, 1, num_classes=7).num_classes is None  # not class-conditional
    clf = su.create_classifier(
        **{
            **su.classifier_defaults(),
            "image_size": 16,
            "classifier_width": 64,
            "classifier_depth": 1,
            "num_classes": 7,
        }
    )
    assert clf(th.randn(2, 3, 16, 16), th.tensor([0, 1])).shape == (2, 7)


def test_string_flags_become_typed_settings_once():
    settings = su.unet_settings(
        64,
        32,
        1,
        attention_resolutions="32,16",
        learn_sigma=True,
        class_cond=True,
        num_classes=10,
        p_uncond=0.1,
        use_fp16=True,
    )
    assert settings.attention_resolutions == (2, 4) and settings.channel_mult == (1, 2, 3, 4)
    assert settings.out_channels == 6 and settings.num_classes == 11 and settings.use_fp16 is True
    built = su.create_model(
        64, 32, 1, attention_resolutions="32,16", learn_sigma=True, class_cond=True, num_classes=10, p_uncond=0.1
    )
    from_settings = type(built).from_settings(
        su.unet_settings(
            64, 32, 1, attention_resolutions="32,16", learn_sigma=True, class_cond=True, num_classes=10, p_uncond=0.1
        )
    )
    assert [(k, v.shape) for k, v in built.state_dict().items()] == [
        (k, v.shape) for k, v in from_settings.state_dict().items()
    ]


def test_explicit_channel_mult_reaches_the_network():
    model = su.create_model(32, 32, 1, channel_mult="1,2,2,2", attention_resolutions="8")
    assert model.channel_mult == (1, 2, 2, 2) and model.attention_resolutions == (4,)


@pytest.mark.parametrize("size", [16, 32])
def test_small_image_sizes_work_everywhere(size):
    model, diffusion = su.create_model_and_diffusion(
        **{**su.model_and_diffusion_defaults(), "image_size": size, "num_channels": 32, "num_res_blocks": 1}
    )
    x, t = th.randn(2, 3, size, size), th.tensor([0, 999])
    assert model(x, t).shape == x.shape
    classifier = su.create_classifier(
        **{**su.classifier_defaults(), "image_size": size, "classifier_width": 64, "classifier_depth": 1}
    )
    assert classifier(x, t).shape == (2, 1000)
    sr_args = {
        **su.sr_model_and_diffusion_defaults(),
        "large_size": size,
        "small_size": size // 2,
        "num_channels": 32,
        "num_res_blocks": 1,
    }
    sr, _ = su.sr_create_model_and_diffusion(**sr_args)
    assert sr(x, t, low_res=th.randn(2, 3, size // 2, size // 2)).shape == x.shape


def test_classifier_width_must_fit_the_attention_heads():
    with pytest.raises(ValueError, match="classifier_width 32"):
        su.create_classifier(**{**su.classifier_defaults(), "image_size": 32, "classifier_width": 32})


@pytest.mark.parametrize(
    "flags, mean, var, loss",
    [
        ({}, gd.ModelMeanType.EPSILON, gd.ModelVarType.FIXED_LARGE, gd.LossType.MSE),
        ({"sigma_small": True}, gd.ModelMeanType.EPSILON, gd.ModelVarType.FIXED_SMALL, gd.LossType.MSE),
        (
            {"learn_sigma": True, "rescale_learned_sigmas": True},
            gd.ModelMeanType.EPSILON,
            gd.ModelVarType.LEARNED_RANGE,
            gd.LossType.RESCALED_MSE,
        ),
        (
            {"use_kl": True, "predict_xstart": True},
            gd.ModelMeanType.START_X,
            gd.ModelVarType.FIXED_LARGE,
            gd.LossType.RESCALED_KL,
        ),
    ],
)
def test_create_gaussian_diffusion_types(flags, mean, var, loss):
    d = su.create_gaussian_diffusion(**flags)
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (mean, var, loss)
    assert d.num_timesteps == 1000


def test_create_gaussian_diffusion_respacing_and_schedule():
    d = su.create_gaussian_diffusion(steps=4000, noise_schedule="cosine", timestep_respacing="ddim25")
    assert d.num_timesteps == 25 and d.original_num_steps == 4000 and d.timestep_map[1] == 160
    with pytest.raises(ValueError, match="ddim43"):
        su.create_gaussian_diffusion(timestep_respacing="ddim43")


def test_argparser_round_trip():
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, su.model_and_diffusion_defaults())
    args = parser.parse_args(
        [
            "--class_cond",
            "True",
            "--attention_resolutions",
            "32,16,8",
            "--num_channels",
            "256",
            "--use_fp16",
            "no",
            "--dropout",
            "0.1",
        ]
    )
    flags = su.args_to_dict(args, su.model_and_diffusion_defaults().keys())
    assert flags["class_cond"] is True and flags["use_fp16"] is False and flags["num_channels"] == 256
    assert flags["attention_resolutions"] == "32,16,8" and flags["dropout"] == 0.1
    assert "AdaGN" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--class_cond", "maybe"])


def test_str2bool():
    assert su.str2bool("Yes") is True and su.str2bool("0") is False and su.str2bool(True) is True
    with pytest.raises(argparse.ArgumentTypeError, match="boolean"):
        su.str2bool("perhaps")


def test_readme_flags_reference_lists_every_flag():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    reference = readme[readme.index("## Flags reference") :]
    groups = (
        fl.DIFFUSION_FLAGS,
        fl.MODEL_FLAGS,
        fl.CLASSIFIER_FLAGS,
        fl.SR_FLAGS,
        fl.TRAIN_FLAGS,
        fl.CLASSIFIER_TRAIN_FLAGS,
        fl.SAMPLE_FLAGS,
        fl.GUIDANCE_FLAGS,
        fl.SUPER_RES_SAMPLE_FLAGS,
        fl.NLL_FLAGS,
        fl.RUN_FLAGS,
    )
    for group in groups:
        for flag in group:
            assert (
                f"`--{flag.name}` | `{flag.default!r}`" in reference
                or f"`--{flag.name}` | `{flag.default}`" in reference
            ), flag.name
