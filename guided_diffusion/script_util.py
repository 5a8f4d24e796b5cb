"""Flags, their defaults, and the factories that build models and diffusions from them.

Every flag is defined once, in a FlagGroup below: its name, default and help.
The *_defaults() dicts, the argparse parsers and the factories' keyword names all
come from those groups (tests/test_script_util.py checks the factories against them).
Factories accept the original's string forms ("32,16,8", channel_mult "") and turn
them into typed values at their entry; the networks receive typed values.
"""

import argparse
from dataclasses import dataclass, replace

from . import gaussian_diffusion as gd
from .errors import UsageError, flag_errors
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000
CLASSIFIER_HEAD_CHANNELS = 64  # the classifier's attention head width, fixed as in the original


@dataclass(frozen=True)
class Flag:
    """A command-line flag; `check(value)` returns what is wrong with a parsed value, or None."""

    name: str
    default: object
    help: str
    check: object = None


def _at_least(low, strict=False):
    def check(value):
        if value < low or (strict and value == low):
            return f"must be {'above' if strict else 'at least'} {low}"
        return None

    return check


POSITIVE, NON_NEGATIVE = _at_least(0, strict=True), _at_least(0)


def _one_of(*choices):
    def check(value):
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _probability(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _ema_rates(value):
    try:
        rates = [float(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        return "must be comma-separated numbers, e.g. 0.9999 or 0.999,0.9999"
    return None if rates and all(0 <= r < 1 for r in rates) else "must be decay rates in [0, 1), e.g. 0.9999"


class FlagGroup:
    """An ordered set of flags; defaults() gives a fresh {name: default} dict."""

    def __init__(self, *flags):
        self.flags = flags

    def defaults(self):
        return {f.name: f.default for f in self.flags}

    def __iter__(self):
        return iter(self.flags)


DIFFUSION_FLAGS = FlagGroup(
    Flag("learn_sigma", False, "predict the variance too (interpolated, IDDPM Eq. 15); doubles the output channels"),
    Flag("diffusion_steps", 1000, "number of diffusion steps T used in training", check=POSITIVE),
    Flag("noise_schedule", "linear", "beta schedule: linear or cosine"),
    Flag("timestep_respacing", "", "steps to keep for sampling: '' (all), '250', '10,15,20' or 'ddim25'"),
    Flag("use_kl", False, "train on the variational bound (rescaled KL) instead of MSE"),
    Flag("predict_xstart", False, "the model predicts x_0 instead of the noise"),
    Flag("rescale_timesteps", False, "pass timesteps to the model scaled to 0..1000"),
    Flag("rescale_learned_sigmas", False, "use RESCALED_MSE: weight the vb term by T/1000"),
)

# Flags that the diffusion model and the classifier share (one value for both in classifier_sample.py).
_IMAGE_SIZE = Flag("image_size", 64, "image resolution (16, 32, 64, 128, 256 or 512 with the default channel_mult)",
                   check=POSITIVE)
_NUM_CLASSES = Flag("num_classes", NUM_CLASSES, "number of classes of a class-conditional model or classifier "
                                                "(beyond the original)", check=POSITIVE)

_MODEL_FLAGS = (
    _IMAGE_SIZE,
    Flag("num_channels", 128, "base width of the UNet (model_channels)", check=POSITIVE),
    Flag("num_res_blocks", 2, "residual blocks per resolution", check=POSITIVE),
    Flag("num_heads", 4, "attention heads (ignored when num_head_channels is set)"),
    Flag("num_heads_upsample", -1, "attention heads in the decoder; -1 means num_heads"),
    Flag("num_head_channels", -1, "channels per attention head; -1 means use num_heads"),
    Flag("attention_resolutions", "16,8", "comma-separated resolutions (in pixels) that get attention"),
    Flag("channel_mult", "", "comma-separated width multipliers per level; '' picks one from image_size"),
    Flag("dropout", 0.0, "dropout in the residual blocks", check=_probability),
    Flag("class_cond", False, "class-conditional model (label embedding)"),
    _NUM_CLASSES,
    Flag("p_uncond", 0.0, "classifier-free guidance: training replaces each label by a null class with this "
                          "probability; > 0 gives the model the null class (label num_classes), so sample such a "
                          "model with the same value (any > 0); 0: the original's layout"),
    Flag("use_checkpoint", False, "gradient checkpointing: recompute activations in backward to save memory"),
    Flag("use_scale_shift_norm", True, "AdaGN: the timestep embedding scales and shifts the GroupNorm"),
    Flag("resblock_updown", False, "BigGAN-style residual blocks for up/downsampling"),
    Flag("use_fp16", False, "run the network body in float16"),
    Flag("use_new_attention_order", False, "split q, k, v before heads (QKVAttention) instead of after"),
)
MODEL_FLAGS = FlagGroup(*_MODEL_FLAGS)

CLASSIFIER_FLAGS = FlagGroup(
    _IMAGE_SIZE,
    Flag("classifier_use_fp16", False, "run the classifier body in float16"),
    Flag("classifier_width", 128, "base width of the classifier", check=POSITIVE),
    Flag("classifier_depth", 2, "residual blocks per resolution in the classifier", check=POSITIVE),
    Flag("classifier_attention_resolutions", "32,16,8", "resolutions (in pixels) with attention in the classifier"),
    Flag("classifier_use_scale_shift_norm", True, "AdaGN in the classifier's residual blocks"),
    Flag("classifier_resblock_updown", True, "BigGAN-style downsampling blocks in the classifier"),
    Flag("classifier_pool", "attention", "classifier head: adaptive, attention, spatial or spatial_v2"),
    _NUM_CLASSES,
)

SR_FLAGS = FlagGroup(
    Flag("large_size", 256, "output resolution of the super-resolution model", check=POSITIVE),
    Flag("small_size", 64, "input (low) resolution of the super-resolution model", check=POSITIVE),
)

# Flags of the training scripts (the original's names and defaults), and ours beyond them.
RUN_FLAGS = FlagGroup(
    Flag("log_dir", "", "where logs, checkpoints and outputs go ('' : $OPENAI_LOGDIR, else a new temporary folder)"),
    Flag("compile", False, "compile the networks with torch.compile on their first call (for GPUs; on a CPU it "
                           "took 100 s to save 4 percent); runs eagerly where no compiler works"),
)

_LABEL_SOURCE = Flag("label_source", "filename", "where a labeled image's class comes from: filename (its name's "
                                                 "prefix, 'dog_123.png', as the original) or folder (its parent "
                                                 "folder's name, 'dog/123.png')", check=_one_of("filename", "folder"))

TRAIN_FLAGS = FlagGroup(
    Flag("data_dir", "", "folder of training images ('' : the built-in toy shapes dataset)"),
    _LABEL_SOURCE,
    Flag("schedule_sampler", "uniform", "timestep sampler: uniform or loss-second-moment"),
    Flag("lr", 1e-4, "learning rate (AdamW)", check=NON_NEGATIVE),
    Flag("weight_decay", 0.0, "AdamW weight decay", check=NON_NEGATIVE),
    Flag("lr_anneal_steps", 0, "anneal the learning rate to 0 over this many steps, then stop (0: train until stopped)", check=NON_NEGATIVE),
    Flag("batch_size", 1, "images per step on each process", check=POSITIVE),
    Flag("microbatch", -1, "images per forward pass; -1 disables gradient accumulation"),
    Flag("ema_rate", "0.9999", "comma-separated EMA decay rates, one ema_*.pt file each", check=_ema_rates),
    Flag("log_interval", 10, "steps between log dumps", check=POSITIVE),
    Flag("save_interval", 10000, "steps between checkpoints", check=POSITIVE),
    Flag("resume_checkpoint", "", "modelNNNNNN.pt to resume from (its ema_* and opt files are found beside it)"),
    Flag("use_fp16", False, "train in float16 with a float32 master copy and dynamic loss scaling"),
    Flag("fp16_scale_growth", 1e-3, "log2 growth of the fp16 loss scale per step"),
    Flag("use_bf16", False, "train under bfloat16 autocast (no loss scale)"),
    Flag("seed", -1, "seed the run's random number generators (-1: unseeded)"),
)

CLASSIFIER_TRAIN_FLAGS = FlagGroup(
    Flag("data_dir", "", "folder of labeled training images ('' : the built-in toy shapes dataset)"),
    Flag("val_data_dir", "", "folder of labeled validation images (with the toy dataset: a held-out toy set)"),
    _LABEL_SOURCE,
    Flag("noised", True, "train on noised images x_t (the guidance classifier) instead of clean ones"),
    Flag("iterations", 150000, "optimizer steps in total", check=NON_NEGATIVE),
    Flag("lr", 3e-4, "learning rate (AdamW)", check=NON_NEGATIVE),
    Flag("weight_decay", 0.0, "AdamW weight decay", check=NON_NEGATIVE),
    Flag("anneal_lr", False, "anneal the learning rate linearly to 0 over the iterations"),
    Flag("batch_size", 4, "images per step on each process", check=POSITIVE),
    Flag("microbatch", -1, "images per forward pass; -1 disables gradient accumulation"),
    Flag("schedule_sampler", "uniform", "timestep sampler for the noise levels"),
    Flag("resume_checkpoint", "", "modelNNNNNN.pt to resume from (its opt file is found beside it)"),
    Flag("log_interval", 10, "steps between log dumps", check=POSITIVE),
    Flag("eval_interval", 5, "steps between validation batches", check=POSITIVE),
    Flag("save_interval", 10000, "steps between checkpoints", check=POSITIVE),
    Flag("use_bf16", False, "train under bfloat16 autocast"),
    Flag("seed", -1, "seed the run's random number generators (-1: unseeded)"),
)

SAMPLE_FLAGS = FlagGroup(
    Flag("clip_denoised", True, "clip the predicted x_0 to [-1, 1] at every step"),
    Flag("num_samples", 10000, "number of images to generate (over all processes)", check=POSITIVE),
    Flag("batch_size", 16, "images per batch on each process", check=POSITIVE),
    Flag("use_ddim", False, "sample with DDIM (use with --timestep_respacing ddimN) instead of DDPM"),
    Flag("sampler", "", "ddpm, ddim, dpm++2m (DPM-Solver++ 2M, the fast one), dpm++3m or dpm++2m_sde "
                        "('' : ddim with --use_ddim True, else ddpm, as the original)"),
    Flag("sampling_steps", 0, "model evaluations per sample: for ddpm/ddim the same as --timestep_respacing N; "
                              "for the dpm++ solvers taken from the diffusion's timesteps (0: 20)"),
    Flag("step_schedule", "time", "dpm++ solvers: space the steps uniformly in time (time) or in log-SNR (logsnr)"),
    Flag("dynamic_threshold", 0.0, "dpm++ solvers: clip x_0 per sample at this percentile of abs(x_0) and rescale "
                                   "(Imagen's dynamic thresholding, e.g. 0.995) instead of clipping to [-1, 1]; 0: off"),
    Flag("cfg_scale", 0.0, "classifier-free guidance weight w: eps = (1 + w) eps(x, y) - w eps(x, null) "
                           "(Ho & Salimans 2022; other libraries' guidance scale s is 1 + w); needs a model trained "
                           "with --p_uncond > 0; 0: off"),
    Flag("model_path", "", "the diffusion model checkpoint"),
    Flag("seed", -1, "seed of per-sample random generators: the same images for any batch size or number of "
                     "processes (-1: unseeded, torch's global RNG as in the original)"),
    Flag("balanced_classes", False, "target class of sample i is i mod num_classes instead of random"),
)

GUIDANCE_FLAGS = FlagGroup(
    Flag("classifier_path", "", "the noisy classifier checkpoint"),
    Flag("classifier_scale", 1.0, "guidance scale s: the classifier gradient is multiplied by s (ADM, Alg. 1 and 2)"),
)

SUPER_RES_SAMPLE_FLAGS = FlagGroup(
    Flag("base_samples", "", "npz of low-resolution samples (arr_0 uint8 NHWC, arr_1 labels) to upsample"),
)

NLL_FLAGS = FlagGroup(
    Flag("data_dir", "", "folder of images to evaluate ('' : the built-in toy shapes dataset)"),
    _LABEL_SOURCE,
    Flag("clip_denoised", True, "clip the predicted x_0 to [-1, 1]"),
    Flag("num_samples", 1000, "number of images to evaluate", check=POSITIVE),
    Flag("batch_size", 1, "images per batch on each process", check=POSITIVE),
    Flag("model_path", "", "the diffusion model checkpoint"),
    Flag("seed", -1, "seed of the noise draws (-1: unseeded)"),
)

# Model flags a super-resolution model has no use for (its sizes come from large/small_size).
_SR_DROPPED = ("image_size", "channel_mult", "use_new_attention_order")

_ALL_GROUPS = (DIFFUSION_FLAGS, MODEL_FLAGS, CLASSIFIER_FLAGS, SR_FLAGS, RUN_FLAGS, TRAIN_FLAGS, CLASSIFIER_TRAIN_FLAGS,
               SAMPLE_FLAGS, GUIDANCE_FLAGS, SUPER_RES_SAMPLE_FLAGS, NLL_FLAGS)
# Each name's Flag as the model, classifier and diffusion groups define it (the first group wins):
# defaults dicts get their help text and checks from here.
FLAG_BY_NAME = {f.name: f for group in reversed(_ALL_GROUPS) for f in group}

# Default width multipliers per level, by image size (the original's table, plus 32 and 16).
CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                   32: (1, 2, 2, 2), 16: (1, 2, 2)}


# --------------------------------------------------------------------------- defaults


def diffusion_defaults():
    """Defaults for image and classifier training."""
    return DIFFUSION_FLAGS.defaults()


def model_and_diffusion_defaults():
    """Defaults for image training."""
    res = MODEL_FLAGS.defaults()
    res.update(diffusion_defaults())
    return res


def classifier_defaults():
    """Defaults for classifier models."""
    return CLASSIFIER_FLAGS.defaults()


def classifier_and_diffusion_defaults():
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def sr_model_and_diffusion_defaults():
    res = {k: v for k, v in model_and_diffusion_defaults().items() if k not in _SR_DROPPED}
    res.update(SR_FLAGS.defaults())
    return res


# --------------------------------------------------------------------------- typed values


def parse_channel_mult(channel_mult, image_size, table=CHANNEL_MULT):
    """'' -> the table's default for image_size; '1,2,2,2' or a sequence -> a tuple of numbers."""
    if channel_mult in ("", None):
        if image_size not in table:
            raise UsageError(
                f"unsupported image size: {image_size} (defaults exist for {sorted(table)}); "
                "pass --channel_mult explicitly, e.g. '1,2,2,2'"
            )
        return table[image_size]
    if isinstance(channel_mult, str):
        return tuple(_number(x) for x in channel_mult.split(","))
    return tuple(channel_mult)


def _number(text):
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_attention_resolutions(attention_resolutions, image_size):
    """Resolutions in pixels ("32,16,8" or ints) -> downsample rates image_size // r."""
    if isinstance(attention_resolutions, str):
        resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    elif isinstance(attention_resolutions, int):
        resolutions = [attention_resolutions]
    else:
        resolutions = [int(r) for r in attention_resolutions]
    return tuple(image_size // r for r in resolutions)


# --------------------------------------------------------------------------- factories


def create_model_and_diffusion(image_size, class_cond, learn_sigma, num_channels, num_res_blocks, channel_mult,
                               num_heads, num_head_channels, num_heads_upsample, attention_resolutions, dropout,
                               diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart,
                               rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
                               resblock_updown, use_fp16, use_new_attention_order, num_classes=NUM_CLASSES,
                               p_uncond=0.0):
    model = create_model(
        image_size, num_channels, num_res_blocks, channel_mult=channel_mult, learn_sigma=learn_sigma,
        class_cond=class_cond, use_checkpoint=use_checkpoint, attention_resolutions=attention_resolutions,
        num_heads=num_heads, num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, dropout=dropout, resblock_updown=resblock_updown,
        use_fp16=use_fp16, use_new_attention_order=use_new_attention_order, num_classes=num_classes,
        p_uncond=p_uncond,
    )
    diffusion = _diffusion_from_flags(locals())
    return model, diffusion


@flag_errors()  # a flag value the network cannot be built with
def create_model(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False, class_cond=False,
                 use_checkpoint=False, attention_resolutions="16", num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0, resblock_updown=False,
                 use_fp16=False, use_new_attention_order=False, num_classes=NUM_CLASSES, p_uncond=0.0):
    """A UNetModel from flags (the defaults of this signature are the original's).

    p_uncond > 0 (classifier-free guidance) adds the null class: num_classes + 1 label embeddings.
    """
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=label_embeddings(class_cond, num_classes, p_uncond),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def label_embeddings(class_cond, num_classes, p_uncond=0.0):
    """Rows of a UNet's label embedding: None unconditional, num_classes (+ 1 null class when p_uncond > 0)."""
    if not 0 <= p_uncond < 1:
        raise UsageError(f"--p_uncond {p_uncond} is not a probability in [0, 1)")
    if not class_cond:
        if p_uncond > 0:
            raise UsageError(f"--p_uncond {p_uncond} drops labels of a class-conditional model: add --class_cond True")
        return None
    return num_classes + 1 if p_uncond > 0 else num_classes


def create_classifier_and_diffusion(image_size, classifier_use_fp16, classifier_width, classifier_depth,
                                    classifier_attention_resolutions, classifier_use_scale_shift_norm,
                                    classifier_resblock_updown, classifier_pool, learn_sigma, diffusion_steps,
                                    noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps,
                                    rescale_learned_sigmas, num_classes=NUM_CLASSES):
    classifier = create_classifier(
        image_size, classifier_use_fp16, classifier_width, classifier_depth, classifier_attention_resolutions,
        classifier_use_scale_shift_norm, classifier_resblock_updown, classifier_pool, num_classes=num_classes,
    )
    diffusion = _diffusion_from_flags(locals())
    return classifier, diffusion


@flag_errors()  # a flag value the network cannot be built with
def create_classifier(image_size, classifier_use_fp16, classifier_width, classifier_depth,
                      classifier_attention_resolutions, classifier_use_scale_shift_norm, classifier_resblock_updown,
                      classifier_pool, num_classes=NUM_CLASSES):
    """The noisy-image classifier: an EncoderUNetModel with num_classes outputs."""
    channel_mult = parse_channel_mult("", image_size)
    attention_ds = parse_attention_resolutions(classifier_attention_resolutions, image_size)
    _check_head_channels(classifier_width, channel_mult, attention_ds)
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_ds,
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=CLASSIFIER_HEAD_CHANNELS,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def _check_head_channels(width, channel_mult, attention_ds):
    """The classifier's attention uses 64-channel heads: every attended width must divide."""
    widths = [int(m * width) for level, m in enumerate(channel_mult) if 2**level in attention_ds]
    widths.append(int(channel_mult[-1] * width))  # the middle block (and an attention pool) always attend
    bad = [w for w in widths if w % CLASSIFIER_HEAD_CHANNELS]
    if bad:
        raise UsageError(
            f"classifier_width {width} gives {bad[0]} channels where attention runs, not a multiple of the "
            f"{CLASSIFIER_HEAD_CHANNELS} channels per head; use a classifier_width that is a multiple of 64"
        )


def sr_create_model_and_diffusion(large_size, small_size, class_cond, learn_sigma, num_channels, num_res_blocks,
                                  num_heads, num_head_channels, num_heads_upsample, attention_resolutions, dropout,
                                  diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart,
                                  rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm,
                                  resblock_updown, use_fp16, num_classes=NUM_CLASSES, p_uncond=0.0):
    model = sr_create_model(
        large_size, small_size, num_channels, num_res_blocks, learn_sigma=learn_sigma, class_cond=class_cond,
        use_checkpoint=use_checkpoint, attention_resolutions=attention_resolutions, num_heads=num_heads,
        num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm, dropout=dropout, resblock_updown=resblock_updown,
        use_fp16=use_fp16, num_classes=num_classes, p_uncond=p_uncond,
    )
    diffusion = _diffusion_from_flags(locals())
    return model, diffusion


@flag_errors()  # a flag value the network cannot be built with
def sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                    attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm,
                    dropout, resblock_updown, use_fp16, num_classes=NUM_CLASSES, p_uncond=0.0):
    """A SuperResModel producing large_size images from small_size ones."""
    if small_size >= large_size:
        raise UsageError(f"small_size ({small_size}) must be smaller than large_size ({large_size})")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=parse_channel_mult("", large_size, table=SR_CHANNEL_MULT),
        num_classes=label_embeddings(class_cond, num_classes, p_uncond),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def _diffusion_from_flags(flags):
    """create_gaussian_diffusion from the diffusion flags in a factory's arguments."""
    kwargs = {f.name: flags[f.name] for f in DIFFUSION_FLAGS if f.name != "diffusion_steps"}
    return create_gaussian_diffusion(steps=flags["diffusion_steps"], **kwargs)


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule="linear",
                              use_kl=False, predict_xstart=False, rescale_timesteps=False,
                              rescale_learned_sigmas=False, timestep_respacing=""):
    """A SpacedDiffusion from flags (all steps kept when timestep_respacing is '')."""
    with flag_errors(ValueError, NotImplementedError):  # an unknown schedule, an impossible respacing
        betas = gd.get_named_beta_schedule(noise_schedule, steps)
        use_timesteps = space_timesteps(steps, timestep_respacing or [steps])
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=use_timesteps,
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


# kind -> (defaults, factory returning (model, diffusion), the flag that asks for fp16)
MODEL_KINDS = {
    "diffusion": (model_and_diffusion_defaults, create_model_and_diffusion, "use_fp16"),
    "classifier": (classifier_and_diffusion_defaults, create_classifier_and_diffusion, "classifier_use_fp16"),
    "super_res": (sr_model_and_diffusion_defaults, sr_create_model_and_diffusion, "use_fp16"),
}


def create_from_flags(kind, flags):
    """(model, diffusion) of a kind ("diffusion", "classifier", "super_res") from a dict holding its flags."""
    defaults, factory, _ = MODEL_KINDS[kind]
    return factory(**{k: flags[k] for k in defaults()})


# --------------------------------------------------------------------------- argparse


def add_dict_to_argparser(parser, default_dict):
    """Add a --flag for every key, typed by its default (bools take yes/no/true/false/1/0)."""
    add_flags(parser, flags_of(default_dict))


def flags_of(*groups):
    """{name: Flag} of FlagGroups and {name: default} dicts; a later group's flag replaces an earlier one's.

    A dict's flags take their help text and check from the model, classifier and diffusion groups.
    """
    flags = {}
    for group in groups:
        if isinstance(group, dict):
            group = [replace(FLAG_BY_NAME.get(name, Flag(name, value, "")), default=value)
                     for name, value in group.items()]
        flags.update((flag.name, flag) for flag in group)
    return flags


def add_flags(parser, flags):
    """Add each Flag of {name: Flag} as --name, typed by its default, its help ending with the default."""
    for flag in flags.values():
        value = flag.default
        v_type = str if value is None else str2bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{flag.name}", default=value, type=_checked(v_type, flag.check), help=help_text(flag))


def _checked(v_type, check):
    """argparse type: v_type, then the flag's check; argparse names the flag in the error."""
    if check is None:
        return v_type

    def parse(text):
        value = v_type(text)
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    parse.__name__ = v_type.__name__  # argparse's message for a value v_type rejects names this
    return parse


def help_text(flag):
    """A flag's --help text: its description, then its default once ('%' escaped for argparse)."""
    text = f"{flag.help} (default: {flag.default!r})" if flag.help else f"default: {flag.default!r}"
    return text.replace("%", "%%")


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """argparse type for booleans: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r} (use true/false)")

