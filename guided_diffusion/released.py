"""The checkpoints released with the original guided-diffusion, and what a checkpoint file holds.

The original README gives, for each released file, the flags to sample it with; they are
written here as data (RELEASED), so the package can recognise a released layout and name
its flags without the files or tests/data. `describe` tells what a checkpoint file is
(model, EMA weights, optimizer state), its size, and the flags it fits: a released
record's flags when the layout is a released one, else the flags inferred from the shapes.
"""

import functools
import os
import re
import shlex
from dataclasses import dataclass, field
from types import MappingProxyType

import torch as th
from torch.overrides import TorchFunctionMode

from .checkpoints import is_state_dict, layout_of, read_checkpoint
from .layout_flags import shape_flags, suggest_flags, unreadable_flags
from .script_util import MODEL_KINDS, create_from_flags


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One released layout: its name, kind, the README's flags for it, and the released files that have it."""

    name: str
    kind: str
    flags: MappingProxyType = field(hash=False)
    files: tuple

    def __post_init__(self):
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))  # read-only: records are shared


# Flags the README repeats for every diffusion and upsampling model.
_COMMON = dict(
    attention_resolutions="32,16,8",
    diffusion_steps=1000,
    learn_sigma=True,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)
_256 = dict(
    _COMMON,
    class_cond=True,
    image_size=256,
    noise_schedule="linear",
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
)

# 15 released files, 11 layouts. The LSUN models were trained with dropout 0.1 (lsun_horse_nodropout.pt
# with 0), 256x256_diffusion_uncond.pt without: dropout does not change the layout nor sampling.
RELEASED = (
    ReleasedCheckpoint(
        "64x64_diffusion",
        "diffusion",
        dict(
            _COMMON,
            class_cond=True,
            dropout=0.1,
            image_size=64,
            noise_schedule="cosine",
            num_channels=192,
            num_head_channels=64,
            num_res_blocks=3,
            use_new_attention_order=True,
        ),
        ("64x64_diffusion.pt",),
    ),
    ReleasedCheckpoint(
        "128x128_diffusion",
        "diffusion",
        dict(
            _COMMON,
            class_cond=True,
            image_size=128,
            noise_schedule="linear",
            num_channels=256,
            num_heads=4,
            num_res_blocks=2,
        ),
        ("128x128_diffusion.pt",),
    ),
    ReleasedCheckpoint("256x256_diffusion", "diffusion", _256, ("256x256_diffusion.pt",)),
    ReleasedCheckpoint(
        "256x256_diffusion_uncond",
        "diffusion",
        dict(_256, class_cond=False),
        ("256x256_diffusion_uncond.pt", "lsun_bedroom.pt", "lsun_cat.pt", "lsun_horse.pt", "lsun_horse_nodropout.pt"),
    ),
    ReleasedCheckpoint(
        "512x512_diffusion", "diffusion", dict(_256, use_fp16=False, image_size=512), ("512x512_diffusion.pt",)
    ),
    ReleasedCheckpoint(
        "64x64_classifier", "classifier", dict(image_size=64, classifier_depth=4), ("64x64_classifier.pt",)
    ),
    ReleasedCheckpoint("128x128_classifier", "classifier", dict(image_size=128), ("128x128_classifier.pt",)),
    ReleasedCheckpoint("256x256_classifier", "classifier", dict(image_size=256), ("256x256_classifier.pt",)),
    ReleasedCheckpoint("512x512_classifier", "classifier", dict(image_size=512), ("512x512_classifier.pt",)),
    ReleasedCheckpoint(
        "64_256_upsampler",
        "super_res",
        dict(
            _COMMON,
            class_cond=True,
            large_size=256,
            small_size=64,
            noise_schedule="linear",
            num_channels=192,
            num_heads=4,
            num_res_blocks=2,
        ),
        ("64_256_upsampler.pt",),
    ),
    ReleasedCheckpoint(
        "128_512_upsampler",
        "super_res",
        dict(
            _COMMON,
            attention_resolutions="32,16",
            class_cond=True,
            large_size=512,
            small_size=128,
            noise_schedule="linear",
            num_channels=192,
            num_head_channels=64,
            num_res_blocks=2,
        ),
        ("128_512_upsampler.pt",),
    ),
)
_BY_NAME = {record.name: record for record in RELEASED}

KIND_NAMES = {
    "diffusion": "diffusion model",
    "super_res": "super-resolution model",
    "classifier": "noisy classifier",
    "optimizer": "optimizer state",
    "unknown": "not a model checkpoint",
}


# --------------------------------------------------------------------------- released layouts


def released_record(name):
    """The ReleasedCheckpoint called `name` (e.g. "64x64_diffusion")."""
    if name not in _BY_NAME:
        raise KeyError(f"no released layout {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def released_flags(record, kind_defaults=None):
    """Every flag of the record's kind: the defaults (of its kind unless given), updated by the README's flags."""
    flags = dict(MODEL_KINDS[record.kind][0]() if kind_defaults is None else kind_defaults)
    flags.update(record.flags)
    return flags


def released_layout(record):
    """{key: shape} (read-only) of the model built from the record's flags; built once, on the meta device."""
    return _layout_by_name(record.name)


@functools.lru_cache(maxsize=None)
def _layout_by_name(name):
    record = _BY_NAME[name]
    return MappingProxyType(meta_layout(record.kind, released_flags(record)))


def meta_layout(kind, flags):
    """{key: shape} of the model of that kind built from `flags`, without memory for its weights."""
    with th.device("meta"), _SkipInit():
        model, _ = create_from_flags(kind, flags)
    return layout_of(model.state_dict())


class _SkipInit(TorchFunctionMode):
    """Skips what only fills values when building on the meta device: torch.nn.init's initialisers, and the
    scaling of a meta tensor by a number (an attention pool's positional embedding). On meta tensors both
    run torch._refs, which imports torch._dynamo: over a second the first time, ten times the build itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if (
            func in _SCALINGS
            and len(args) == 2
            and getattr(args[0], "is_meta", False)
            and isinstance(args[1], (int, float))
        ):
            return args[0]  # same shape; the values do not exist on the meta device anyway
        return func(*args, **kwargs)


_SCALINGS = (th.Tensor.div, th.Tensor.mul, th.div, th.mul)


def match_released(layout, kind=None):
    """The released record whose layout is exactly `layout` (same keys, same shapes), or None.

    Building a released layout takes a tenth of a second or more, so records are first ruled out
    by what the shapes say directly (kind, width, class_cond, learn_sigma...); usually one is built.
    """
    layout = {k: tuple(shape) for k, shape in layout.items()}
    kind = kind or layout_kind(layout)
    for record in RELEASED:
        if record.kind == kind and _plausible(record, layout) and _same_layout(released_layout(record), layout):
            return record
    return None


def _plausible(record, layout):
    """Whether the flags readable from the shapes agree with the record's (no model is built)."""
    flags = released_flags(record)
    try:
        inferred = shape_flags(layout, flags)
    except (IndexError, TypeError):  # shapes of an unexpected rank
        return False
    return all(flags[k] == v for k, v in inferred.items())


def _same_layout(expected, found):
    """Equal layouts; the count and the first and last shapes decide most mismatches before the full compare."""
    if len(expected) != len(found):
        return False
    for key in (next(iter(expected)), next(reversed(expected))):
        if found.get(key) != expected[key]:
            return False
    return dict(expected) == found


# --------------------------------------------------------------------------- what a checkpoint is


def checkpoint_kind(obj):
    """ "diffusion", "super_res", "classifier", "optimizer" or "unknown", for a loaded checkpoint object."""
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list):
        return "optimizer"  # an optimizer's state_dict(); TrainLoop may add lg_loss_scale
    if not is_state_dict(obj) or not obj:
        return "unknown"
    return layout_kind(layout_of(obj))


def layout_kind(layout):
    """The kind of model a {key: shape} layout belongs to (see checkpoint_kind)."""
    first = layout.get("input_blocks.0.0.weight")
    has_decoder = any(k.startswith("output_blocks.") for k in layout)
    if first is None or len(first) < 2:
        return "unknown"
    if not has_decoder:
        return "classifier" if any(k.startswith("out.") for k in layout) else "unknown"
    head = layout.get("out.2.weight")
    # A super-resolution model also sees the upsampled low-resolution image: twice the image channels in.
    if head and first[1] % 2 == 0 and head[0] in (first[1] // 2, first[1]):
        return "super_res"
    return "diffusion"


# --------------------------------------------------------------------------- describing a file


def describe(path):
    """A dict saying what the checkpoint file at `path` holds (see describe_state); ValueError if unreadable."""
    return describe_state(read_checkpoint(path), path)


def describe_state(obj, name):
    """What a loaded checkpoint `obj` (read from the file `name`) is, its size, and the flags it fits."""
    kind = checkpoint_kind(obj)
    out = {"file": name, "kind": kind, "what": KIND_NAMES[kind], **_origin(os.path.basename(name))}
    if kind == "optimizer":
        out.update(_optimizer_summary(obj))
    elif is_state_dict(obj) and obj:
        out.update(_tensor_summary(obj.values()))
    else:
        out["type"] = type(obj).__name__
    if kind in MODEL_KINDS:
        out.update(_fitting_flags(layout_of(obj), kind))
    return out


def _origin(basename):
    """The training step (and EMA rate) that our TrainLoop's file names encode, if any."""
    match = re.fullmatch(r"ema_(\d*\.?\d+)_(\d+)\.pt", basename)
    if match:
        rate, step = float(match.group(1)), int(match.group(2))
        return {"ema_rate": rate, "step": step, "origin": f"EMA weights (rate {rate}) of step {step}"}
    match = re.fullmatch(r"(model|opt)(\d+)\.pt", basename)
    if match:
        step = int(match.group(2))
        what = "model checkpoint" if match.group(1) == "model" else "saved"
        return {"step": step, "origin": f"{what} after {step} steps"}
    return {}


def _tensor_summary(tensors):
    tensors = list(tensors)
    return {
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
    }


def _optimizer_summary(state):
    """Parameter groups, tensors (moments, steps) and learning rates of an optimizer's state_dict()."""
    groups = [g for g in state["param_groups"] if isinstance(g, dict)]
    tensors = [
        v
        for per_param in state["state"].values()
        if isinstance(per_param, dict)
        for v in per_param.values()
        if isinstance(v, th.Tensor)
    ]
    out = {
        "param_groups": len(groups),
        "optimized_parameters": sum(len(g.get("params", ())) for g in groups),
        "lr": sorted({float(g["lr"]) for g in groups if "lr" in g}),
        **_tensor_summary(tensors),
    }
    out["elements"] = out.pop("parameters")  # moments and steps, not model parameters
    if "lg_loss_scale" in state:
        out["lg_loss_scale"] = float(state["lg_loss_scale"])
    return out


# --------------------------------------------------------------------------- the flags a layout fits

# Layout-free flags set, only while searching, to values that build with any other flag.
_SEARCH_PLACEHOLDERS = {"small_size": 1}


def _fitting_flags(layout, kind):
    """The released record a layout matches, and the flags (those differing from the kind's defaults) it fits."""
    defaults = MODEL_KINDS[kind][0]()
    record = match_released(layout, kind)
    if record is not None:
        flags, source = released_flags(record, defaults), "released"
    else:
        flags = _inferred(layout, kind)
        source = "inferred" if flags is not None else "none"
    changed = None if flags is None else {k: v for k, v in flags.items() if defaults[k] != v}
    return {
        "released": None if record is None else {"name": record.name, "files": list(record.files)},
        "flags_source": source,
        "flags": changed,
        "command": None if changed is None else command_line(changed),
        "unreadable_flags": [] if record is not None else unreadable_flags(kind),
    }


def _inferred(layout, kind):
    """All flags of that kind, searched from its defaults with layout_flags.suggest_flags; None when none build
    `layout`. The search builds dozens of models: an EMA file and its model file share the result."""
    flags = _inferred_by_layout(kind, tuple(layout.items()))
    return None if flags is None else dict(flags)


@functools.lru_cache(maxsize=8)
def _inferred_by_layout(kind, items):
    layout, defaults = dict(items), MODEL_KINDS[kind][0]()
    # small_size leaves the layout alone but must stay below large_size: out of the way while searching,
    # else every large_size up to the default small_size (64) fails to build.
    start = {**defaults, **{k: v for k, v in _SEARCH_PLACEHOLDERS.items() if k in defaults}}
    build = lambda **f: create_from_flags(kind, f)[0]
    with _SkipInit():  # suggest_flags builds on the meta device, many times
        flags = {**start, **suggest_flags(layout, start, build)}
    try:
        fits = meta_layout(kind, flags) == layout
    except Exception:  # an impossible combination of flags
        return None
    return {**flags, **{k: defaults[k] for k in _SEARCH_PLACEHOLDERS if k in defaults}} if fits else None


def command_line(flags):
    """Flags as the README writes them: --name value (booleans True/False), quoted for a shell."""
    return " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items())


# --------------------------------------------------------------------------- as text


def format_description(d):
    """The lines of text that print a describe() dict."""
    origin = f" ({d['origin']})" if "origin" in d else ""
    lines = [f"{d['file']}: {d['what']}{origin}"]
    if d["kind"] == "optimizer":
        lr = ", ".join(f"{x:g}" for x in d["lr"]) or "?"
        lines.append(
            f"  {d['param_groups']} parameter group(s), lr {lr}, over {d['optimized_parameters']} "
            f"parameters: {d['tensors']} tensors ({d['elements']:,} elements, {', '.join(d['dtypes'])})"
        )
        if "lg_loss_scale" in d:
            lines.append(f"  fp16 loss scale: 2^{d['lg_loss_scale']:g}")
    elif "tensors" in d:
        lines.append(f"  {d['tensors']} tensors, {d['parameters']:,} parameters ({', '.join(d['dtypes'])})")
    else:
        lines.append(f"  holds a {d['type']}, not a dict of tensors")
    if d["kind"] in MODEL_KINDS:
        lines += _format_fit(d)
    return lines


def _format_fit(d):
    released = d["released"]
    if released:
        lines = [
            f"  released checkpoint: {released['name']} ({', '.join(released['files'])})",
            f"  flags (the original README's): {d['command'] or '(the defaults)'}",
        ]
    elif d["flags"] is None:
        lines = ["  released checkpoint: none", "  flags: no flag values found that build this layout"]
    else:
        lines = [
            "  released checkpoint: none",
            f"  flags (inferred from the shapes): {d['command'] or '(the defaults)'}",
        ]
    if d["unreadable_flags"]:
        lines.append(
            f"  not readable from the layout, pass the values it was trained with: {', '.join(d['unreadable_flags'])}"
        )
    return lines
