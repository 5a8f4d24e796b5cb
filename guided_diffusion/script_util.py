"""The factories that build models and diffusions from flags, and the flags' *_defaults() dicts.

The flags themselves are defined in flags.py. The create_* factories keep the original's
signatures, which take the flags' string forms ("32,16,8", channel_mult ""); unet_settings
and create_classifier turn those into a typed UNetSettings once, at the entry, and the
networks are built from it (UNetModel.from_settings, SuperResModel.from_settings,
EncoderUNetModel.from_settings).
"""

from . import gaussian_diffusion as gd
from . import logger
from .errors import UsageError, flag_errors

# The original's argparse helpers and NUM_CLASSES stay importable from here; the flags themselves live in flags.py.
from .flags import (  # noqa: F401
    CLASSIFIER_FLAGS,
    DIFFUSION_FLAGS,
    MODEL_FLAGS,
    NUM_CLASSES,
    SR_FLAGS,
    add_dict_to_argparser,
    args_to_dict,
    str2bool,
)
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel, UNetSettings

CLASSIFIER_HEAD_CHANNELS = 64  # the classifier's attention head width, fixed as in the original
# Model flags a super-resolution model has no use for (its sizes come from large/small_size).
_SR_DROPPED = ("image_size", "channel_mult", "use_new_attention_order")

# Default width multipliers per level, by image size (the original's table, plus 32 and 16).
CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}
SR_CHANNEL_MULT = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}


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


def label_embeddings(class_cond, num_classes, p_uncond=0.0):
    """Rows of a UNet's label embedding: None unconditional, num_classes (+ 1 null class when p_uncond > 0)."""
    if not 0 <= p_uncond < 1:
        raise UsageError(f"--p_uncond {p_uncond} is not a probability in [0, 1)")
    if not class_cond:
        if p_uncond > 0:
            raise UsageError(f"--p_uncond {p_uncond} drops labels of a class-conditional model: add --class_cond True")
        return None
    return num_classes + 1 if p_uncond > 0 else num_classes


def unet_settings(
    image_size,
    num_channels,
    num_res_blocks,
    *,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    attention_resolutions="16",
    num_classes=NUM_CLASSES,
    p_uncond=0.0,
    **same_named,
):
    """The typed UNetSettings of a diffusion or super-resolution model's flags.

    attention_resolutions in pixels become downsample rates, channel_mult '' the table's tuple
    for image_size, learn_sigma doubles the 3 output channels (the variance's interpolation v,
    IDDPM Eq. 15), class_cond and p_uncond give the label embedding's rows (label_embeddings).
    same_named: the flags that are UNetSettings fields under their own name (use_fp16, dropout, ...).
    """
    return UNetSettings(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=label_embeddings(class_cond, num_classes, p_uncond),
        **same_named,
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


# --------------------------------------------------------------------------- networks


@flag_errors()  # a flag value the network cannot be built with
def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    p_uncond=0.0,
):
    """A UNetModel from flags (the defaults of this signature are the original's).

    p_uncond > 0 (classifier-free guidance) adds the null class: num_classes + 1 label embeddings.
    """
    settings = unet_settings(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        attention_resolutions=attention_resolutions,
        num_classes=num_classes,
        p_uncond=p_uncond,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )
    return UNetModel.from_settings(settings)


@flag_errors()  # a flag value the network cannot be built with
def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    p_uncond=0.0,
):
    """A SuperResModel producing large_size images from small_size ones (its own channel_mult table)."""
    if small_size >= large_size:
        raise UsageError(f"small_size ({small_size}) must be smaller than large_size ({large_size})")
    options = dict(
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        dropout=dropout,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
    )
    settings = unet_settings(
        large_size,
        num_channels,
        num_res_blocks,
        channel_mult=parse_channel_mult("", large_size, SR_CHANNEL_MULT),
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        attention_resolutions=attention_resolutions,
        num_classes=num_classes,
        p_uncond=p_uncond,
        **options,
    )
    return SuperResModel.from_settings(settings)


@flag_errors()  # a flag value the network cannot be built with
def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
):
    """The noisy-image classifier: an EncoderUNetModel with num_classes outputs (channel_mult from the table)."""
    channel_mult = parse_channel_mult("", image_size)
    attention_ds = parse_attention_resolutions(classifier_attention_resolutions, image_size)
    _check_head_channels(classifier_width, channel_mult, attention_ds)
    settings = UNetSettings(
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
    return EncoderUNetModel.from_settings(settings)


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
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


# --------------------------------------------------------------------------- (model, diffusion) pairs


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    p_uncond=0.0,
):
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
        p_uncond=p_uncond,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
):
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return classifier, diffusion


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    p_uncond=0.0,
):
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        num_classes=num_classes,
        p_uncond=p_uncond,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


# --------------------------------------------------------------------------- from a dict of flags


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


def diffusion_from_flags(flags):
    """create_gaussian_diffusion from a dict holding the diffusion flags (DIFFUSION_FLAGS)."""
    kwargs = {f.name: flags[f.name] for f in DIFFUSION_FLAGS if f.name != "diffusion_steps"}
    return create_gaussian_diffusion(steps=flags["diffusion_steps"], **kwargs)


def compile_if_asked(model, args, backend="inductor"):
    """model.compile() in place (state-dict keys unchanged) when --compile is set. A compilation that
    fails at the first call runs eagerly instead; a torch without a working compiler logs one line."""
    if not getattr(args, "compile", False):
        return model
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # fall back to eager, function by function
        model.compile(backend=backend)
        logger.log(f"torch.compile ({backend}): {type(model).__name__} compiles on its first call")
    except Exception as exc:  # no dynamo on this platform or Python version
        logger.log(f"torch.compile is not available here ({type(exc).__name__}: {exc}); running eagerly")
    return model
