"""What the sampling scripts share: models from flags and checkpoints, classifier guidance,
batched generation over all ranks, and the npz / PNG outputs.

Sample i of a run is always the same computation: with a seed it draws its label,
its x_T and its per-step noise from its own generator, so the images do not depend
on the batch size or the number of processes.
"""

import os

import numpy as np
import torch as th
import torch.nn.functional as F

from . import dist_util, logger
from .cfg import guided_model, has_null_class
from .checkpoints import CheckpointMismatchError, layout_of, load_model_state
from .errors import UsageError, flag_errors
from .files import save_image_grid, save_npz, to_uint8_nhwc
from .flags import given_flags
from .layout_flags import suggest_flags
from .samplers import SOLVERS, dynamic_threshold, initial_noise, sample_dpmpp, step_timesteps
from .script_util import MODEL_KINDS, args_to_dict, compile_if_asked, create_from_flags

# --------------------------------------------------------------------------- models


def load_model(kind, args, path, path_flag="model_path"):
    """Build a model of `kind` from the flags in args, load its checkpoint strictly, move it to this
    process's device (in fp16 when its flag says so) and set eval mode. Returns (model, diffusion).

    A checkpoint with the layout of a released one brings that checkpoint's flags when the command
    line gives no model flags (see flags_for_checkpoint); args is updated with them.
    """
    if not path:
        raise UsageError(f"--{path_flag} is required: the checkpoint of the {kind} model to sample with")
    logger.log(f"loading {kind} model from {path}...")
    state = dist_util.load_state_dict(path, map_location="cpu")
    flags, record = flags_for_checkpoint(kind, args, state, path)
    model, diffusion = create_from_flags(kind, flags)
    try:
        load_model_state(
            model,
            state,
            source=path,
            flags=flags,
            build=lambda **f: create_from_flags(kind, f)[0],
            suggest=suggest_flags,
        )
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{exc}\n{_released_hint(record)}" if record else str(exc)) from None
    model.to(dist_util.dev())
    if flags[MODEL_KINDS[kind][2]]:
        model.convert_to_fp16()
    return compile_if_asked(model.eval(), args), diffusion


# Flags that leave a network's layout and function alone: given on the command line, they still let a
# released checkpoint bring its flags.
RUNTIME_FLAGS = frozenset({"use_fp16", "classifier_use_fp16", "use_checkpoint", "timestep_respacing"})


def flags_for_checkpoint(kind, args, state, path):
    """The flags to build `kind` with, and the released record the checkpoint's layout matches (or None).

    Without model flags on the command line (RUNTIME_FLAGS aside), a released layout's flags replace
    the defaults, are set in args, and are logged in one line; flags on the command line always win.
    """
    from .released import command_line, match_released

    defaults = MODEL_KINDS[kind][0]()
    flags = args_to_dict(args, defaults)
    record = match_released(layout_of(state), kind)
    given = given_flags(args) & set(defaults)
    if record is None or given - RUNTIME_FLAGS:
        return flags, record
    chosen = {k: v for k, v in record.flags.items() if k not in given and k in flags}
    shown = command_line(chosen)
    note = _keep_fp32_on_cpu(chosen)
    _check_agreement(args, chosen, path)
    flags.update(chosen)
    for name, value in chosen.items():
        setattr(args, name, value)
    logger.log(
        f"{os.path.basename(path)} has the layout of the released {', '.join(record.files)}; using its "
        f"flags: {shown}{note}"
    )
    return flags, record


def _keep_fp32_on_cpu(chosen):
    """The released flags ask for fp16, which a CPU runs many times slower than float32: keep float32 there."""
    fp16 = [k for k in ("use_fp16", "classifier_use_fp16") if chosen.get(k)]
    if not fp16 or dist_util.dev().type == "cuda":
        return ""
    for name in fp16:
        chosen[name] = False
    return f" (but --{fp16[0]} False: fp16 is slow on a CPU; pass --{fp16[0]} True to force it)"


def _check_agreement(args, chosen, path):
    """Two checkpoints of one run (diffusion model and classifier) must agree on the flags they share."""
    inferred = getattr(args, "_inferred", {})
    for name, value in chosen.items():
        if name in inferred and inferred[name][0] != value:
            raise UsageError(
                f"{path} needs --{name} {value} but {inferred[name][1]} needs --{name} "
                f"{inferred[name][0]}: use checkpoints of the same resolution"
            )
    args._inferred = {**inferred, **{name: (value, path) for name, value in chosen.items()}}


def _released_hint(record):
    from .released import command_line

    return (
        f"It has the layout of the released {', '.join(record.files)}: give no model flags to use its flags, "
        f"or these: {command_line(record.flags)}"
    )


def class_conditional_model(model, class_cond):
    """The model as the samplers call it: it sees the labels y only when it is class-conditional."""

    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, y=y if class_cond else None, **kwargs)

    return model_fn


def model_fn_from_flags(model, args):
    """The model as the samplers call it (see class_conditional_model), mixed by classifier-free
    guidance when --cfg_scale is set."""
    model_fn = class_conditional_model(model, args.class_cond)
    if not args.cfg_scale:
        return model_fn
    if not args.class_cond or not has_null_class(model, args.num_classes):
        raise UsageError(
            f"--cfg_scale {args.cfg_scale} needs a class-conditional model trained with label dropout, "
            "which has a null class: train it with --class_cond True --p_uncond 0.1 and sample it with "
            "the same --p_uncond"
        )
    return guided_model(model_fn, args.cfg_scale, null_label=args.num_classes)


def classifier_cond_fn(classifier, scale):
    """cond_fn(x_t, t, y) = scale * grad_x log p_phi(y | x_t) (ADM, Alg. 1 and 2)."""

    def cond_fn(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier guidance needs target labels y")
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)  # (N, classes)
            selected = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


# --------------------------------------------------------------------------- samplers


SAMPLERS = ("ddpm", "ddim") + tuple(SOLVERS)
DEFAULT_SOLVER_STEPS = 20


def resolve_sampler(args):
    """Check the sampler flags and settle them in args before the diffusion is built.

    args.sampler becomes a name from SAMPLERS ('' keeps the original's meaning of
    --use_ddim). For ddpm and ddim, --sampling_steps N means --timestep_respacing N;
    for the solvers it defaults to 20 evaluations.
    """
    sampler = args.sampler or ("ddim" if args.use_ddim else "ddpm")
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if args.use_ddim and sampler != "ddim":
        raise UsageError(f"--use_ddim True contradicts --sampler {sampler}; drop one of them")
    if args.sampling_steps < 0:
        raise UsageError(f"--sampling_steps must be positive (or 0 for the default), got {args.sampling_steps}")
    if sampler in ("ddpm", "ddim") and args.sampling_steps:
        if args.timestep_respacing:
            raise UsageError(
                f"--sampling_steps {args.sampling_steps} and --timestep_respacing "
                f"{args.timestep_respacing!r} both set the steps of {sampler}; give one of them"
            )
        args.timestep_respacing = str(args.sampling_steps)
    if sampler in SOLVERS:
        args.sampling_steps = args.sampling_steps or DEFAULT_SOLVER_STEPS
    args.sampler = sampler
    return args


def sample_loop(
    diffusion, sampler="ddpm", steps=DEFAULT_SOLVER_STEPS, step_schedule="time", dynamic_threshold_percentile=0.0
):
    """The sampling loop of `sampler`, with p_sample_loop's signature (model, shape, clip_denoised=...,
    model_kwargs=..., cond_fn=..., device=..., generator=...)."""
    if sampler == "ddpm":
        return diffusion.p_sample_loop
    if sampler == "ddim":
        return diffusion.ddim_sample_loop
    order, sde = SOLVERS[sampler]
    with flag_errors():  # fail before any sampling when --sampling_steps or --step_schedule cannot work
        step_timesteps(diffusion.alphas_cumprod, steps, step_schedule)
    threshold = dynamic_threshold(dynamic_threshold_percentile) if dynamic_threshold_percentile else None

    def loop(model, shape, noise=None, clip_denoised=True, device=None, generator=None, **kwargs):
        x_T = initial_noise(model, shape, noise, device, generator)
        return sample_dpmpp(
            diffusion,
            model,
            x_T,
            steps=steps,
            order=order,
            sde=sde,
            schedule=step_schedule,
            clip_denoised=clip_denoised and threshold is None,
            denoised_fn=threshold,
            generator=generator,
            **kwargs,
        )

    return loop


def sample_loop_from_flags(diffusion, args):
    """sample_loop for the resolved flags of a sampling script (see resolve_sampler)."""
    return sample_loop(diffusion, args.sampler, args.sampling_steps, args.step_schedule, args.dynamic_threshold)


def sampler_description(args):
    if args.sampler in SOLVERS:
        return f"{args.sampler}, {args.sampling_steps} model evaluations ({args.step_schedule} steps)"
    steps = args.timestep_respacing or "all"
    return f"{args.sampler}, timesteps {steps}"


# --------------------------------------------------------------------------- randomness


NOISE_STREAM, LABEL_STREAM = 0, 1


def sample_generators(seed, indices, device, stream=NOISE_STREAM):
    """One torch.Generator per global sample index, seeded from (seed, index, stream); None when seed < 0.

    Labels and noise use separate streams, so a sample's noise is the same whether or
    not the run draws labels (image_sample.py of an unconditional model, or classifier_sample.py).
    """
    if seed is None or seed < 0:
        return None
    seeds = [int(np.random.SeedSequence([seed, i, stream]).generate_state(1, np.uint64)[0] >> 1) for i in indices]
    return [th.Generator(device=device).manual_seed(s) for s in seeds]


def draw_labels(indices, seed, num_classes, device, balanced=False):
    """Target classes of the samples `indices`: i mod num_classes when balanced, else drawn from each
    sample's label generator (or, unseeded, from torch's global RNG before any noise, as the original)."""
    if balanced or not indices:
        return th.tensor([i % num_classes for i in indices], dtype=th.long, device=device)
    generators = sample_generators(seed, indices, device, stream=LABEL_STREAM)
    if generators is None:
        return th.randint(low=0, high=num_classes, size=(len(indices),), device=device)
    return th.cat([th.randint(num_classes, (1,), generator=g, device=g.device) for g in generators]).to(device)


# --------------------------------------------------------------------------- generation


def rank_batches(num_samples, batch_size, rank, world):
    """The global sample indices this rank handles, batch by batch.

    Round k covers indices [k B W, (k+1) B W), rank r the block starting at k B W + r B.
    Every rank yields the same number of batches (possibly empty ones at the end),
    so the gathers stay in step.
    """
    for start in range(0, num_samples, batch_size * world):
        first = start + rank * batch_size
        yield list(range(first, min(first + batch_size, num_samples)))


def generate(
    diffusion,
    model_fn,
    *,
    num_samples,
    batch_size,
    image_shape,
    kwargs_for,
    cond_fn=None,
    use_ddim=False,
    clip_denoised=True,
    seed=-1,
    progress=True,
    sample_fn=None,
):
    """Sample num_samples images over all ranks; rank 0 returns (images uint8 NHWC, labels or None).

    :param image_shape: (C, H, W) of one sample.
    :param kwargs_for: kwargs_for(indices) -> model_kwargs of that batch of global sample indices
        (tensors on the device); its "y" entry, if any, is returned as the labels.
    :param sample_fn: the sampling loop (p_sample_loop's signature, see sample_loop); default:
        DDIM with use_ddim, else DDPM.
    """
    device, rank, world = dist_util.dev(), dist_util.get_rank(), dist_util.get_world_size()
    sample_fn = sample_fn or sample_loop(diffusion, "ddim" if use_ddim else "ddpm")
    images, labels = [], []
    bar = _progress_bar(num_samples) if progress and rank == 0 else None
    for indices in rank_batches(num_samples, batch_size, rank, world):
        batch, y = _sample_batch(
            sample_fn, model_fn, indices, image_shape, kwargs_for, cond_fn, clip_denoised, seed, device
        )
        images.append(dist_util.gather_rows(batch))
        labels.append(dist_util.gather_rows(y) if y is not None else None)
        if bar is not None:
            bar.update(images[-1].shape[0])
    if bar is not None:
        bar.close()
    if rank != 0:
        return None, None
    all_images = th.cat(images).cpu().numpy()
    all_labels = th.cat(labels).cpu().numpy() if labels and labels[0] is not None else None
    return all_images, all_labels


def _sample_batch(sample_fn, model_fn, indices, image_shape, kwargs_for, cond_fn, clip_denoised, seed, device):
    """One batch of samples as uint8 NHWC, and its labels; empty tensors for an empty batch."""
    model_kwargs = kwargs_for(indices)
    generators = sample_generators(seed, indices, device)
    y = model_kwargs.get("y")
    if not indices:
        return th.zeros((0, *image_shape[1:], image_shape[0]), dtype=th.uint8, device=device), y
    sample = sample_fn(
        model_fn,
        (len(indices), *image_shape),
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        device=device,
        generator=generators,
    )
    return to_uint8_nhwc(sample), y


def _progress_bar(total):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="sampling")


# --------------------------------------------------------------------------- outputs


def save_samples(images, labels=None, out_dir=None, grid_size=64, class_names=None):
    """Write samples_{N}x{H}x{W}x{C}.npz (arr_0 images, arr_1 labels) and a PNG grid beside it, on rank 0.

    With class_names (index i names label i) the npz also holds `label_names`, the name of each
    sample's label. Both files are written atomically; returns the npz path.
    """
    out_dir = out_dir or logger.get_dir()
    shape_str = "x".join(str(x) for x in images.shape)
    path = os.path.join(out_dir, f"samples_{shape_str}.npz")
    arrays = [images] if labels is None else [images, labels.astype(np.int64)]
    named = {}
    if labels is not None and class_names:
        named["label_names"] = np.array([_label_name(class_names, i) for i in labels.tolist()])
    save_npz(path, *arrays, **named)
    save_image_grid(images[:grid_size], path[: -len(".npz")] + ".png")
    return path


def _label_name(class_names, label):
    # A label past the saved names is the null class of classifier-free guidance, or a map of another model.
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"


def finish_sampling(images, labels=None, class_names=None):
    """Save the samples on rank 0 (npz and PNG grid; with class_names, the names of the labels too), wait
    for every rank, and log the path last."""
    path = None
    if dist_util.is_main_process():
        path = save_samples(images, labels, class_names=class_names)
    dist_util.barrier()
    if path:
        logger.log(f"sampling complete: {len(images)} samples saved to {path}")
    return path
