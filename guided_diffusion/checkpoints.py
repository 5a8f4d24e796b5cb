"""Reading checkpoints safely and explaining why one does not fit a model.

`read_state_dict` loads with `torch.load(weights_only=True)`: a checkpoint is
data, never code. `load_model_state` checks every key and shape before loading
strictly; on a mismatch it raises CheckpointMismatchError listing the missing,
unexpected and mis-shaped keys and, when it is given the flags and the factory
that built the model, the flag values under which the checkpoint's layout fits.
"""

import io

import blobfile as bf
import torch as th

from .errors import UsageError, UserError
from .files import require_file

# Flags that leave the state-dict layout unchanged, so a checkpoint cannot reveal them.
LAYOUT_FREE_FLAGS = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order", "dropout",
                     "use_fp16", "classifier_use_fp16", "use_checkpoint")

# Values tried, one flag at a time, when searching for the flags a checkpoint was built with.
_CANDIDATES = {
    "image_size": (16, 32, 64, 128, 256, 512),
    "large_size": (16, 32, 64, 128, 256, 512),
    "num_res_blocks": (1, 2, 3, 4, 5, 6),
    "classifier_depth": (1, 2, 3, 4, 5, 6),
    "attention_resolutions": ("32,16,8", "16,8", "32,16", "16", "8", "64,32,16,8", ""),
    "classifier_attention_resolutions": ("32,16,8", "16,8", "32,16", "16", "8", "64,32,16,8", ""),
    "resblock_updown": (False, True),
    "classifier_resblock_updown": (False, True),
    "classifier_pool": ("adaptive", "attention", "spatial", "spatial_v2"),
}


CHECKPOINT_HINT = "check --model_path / --classifier_path"


class CheckpointMismatchError(UsageError):
    """A checkpoint whose keys or shapes do not fit the model built from the flags."""


def read_state_dict(path):
    """Load a model state dict from a local path or blobfile URL onto the CPU, tensors only."""
    return check_is_state_dict(read_checkpoint(path), path)


def read_checkpoint(path):
    """Load any checkpoint (a state dict, an optimizer state) with weights_only=True, onto the CPU."""
    require_file(path, "checkpoint", CHECKPOINT_HINT)
    if "://" not in path:
        return _load(path, source=path)
    with bf.BlobFile(path, "rb") as f:
        return checkpoint_from_bytes(f.read(), source=path)


def checkpoint_from_bytes(data, source="checkpoint"):
    """A checkpoint from the bytes of its file (as broadcast between ranks)."""
    return _load(io.BytesIO(data), source=source)


def _load(file, source):
    try:
        return th.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, objects other than tensors
        raise UserError(
            f"cannot read {source} as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "the file may be truncated, or hold objects other than tensors"
        ) from exc


def is_state_dict(obj):
    """A mapping of names to tensors (what a model's state_dict() is)."""
    return isinstance(obj, dict) and all(isinstance(v, th.Tensor) for v in obj.values())


def check_is_state_dict(state, source="checkpoint"):
    if not is_state_dict(state):
        raise UserError(f"{source} is not a model state dict (a mapping of parameter names to tensors)")
    return state


def layout_of(state_dict):
    """{key: shape} of a state dict."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def layout_differences(expected, found):
    """Missing, unexpected and mis-shaped keys between two {key: shape} layouts."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis_shaped = [(k, found[k], expected[k]) for k in expected if k in found and found[k] != expected[k]]
    return missing, unexpected, mis_shaped


def load_model_state(model, state_dict, *, source="checkpoint", flags=None, build=None):
    """Load state_dict into model strictly, or explain the mismatch.

    :param flags: the {flag: value} the model was built from (optional).
    :param build: a function build(**flags) -> model (optional); with flags, it
        lets the error name the flag values that fit the checkpoint.
    """
    expected = layout_of(model.state_dict())
    found = layout_of(check_is_state_dict(state_dict, source))
    if expected != found:
        hint = suggest_flags(found, flags, build) if flags is not None and build is not None else None
        raise CheckpointMismatchError(mismatch_message(source, expected, found, flags, hint))
    model.load_state_dict(state_dict, strict=True)
    return model


def mismatch_message(source, expected, found, flags, hint):
    missing, unexpected, mis_shaped = layout_differences(expected, found)
    lines = [f"{source} does not fit the model built from the flags:"]
    lines += _listing("missing keys", missing)
    lines += _listing("unexpected keys", unexpected)
    lines += _listing("mis-shaped keys", [f"{k}: checkpoint {a} vs model {b}" for k, a, b in mis_shaped])
    if hint:
        changes = " ".join(f"--{k} {v}" for k, v in hint.items())
        lines.append(f"The checkpoint fits these flags (differing from yours): {changes}")
    elif flags is not None:
        lines.append("No single flag change explains it; compare the flags the checkpoint was trained with.")
    lines.append(
        "Fix: pass the flags the checkpoint was trained with (for released checkpoints, the README lists them). "
        f"Flags that do not change the layout ({', '.join(LAYOUT_FREE_FLAGS[:4])}) must match too."
    )
    return "\n".join(lines)


def _listing(title, items, limit=8):
    if not items:
        return []
    shown = ", ".join(str(x) for x in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return [f"  {title} ({len(items)}): {shown}{more}"]


def suggest_flags(found, flags, build):
    """The flag values (that differ from `flags`) under which build() has the layout `found`.

    Values readable from shapes are inferred directly; the others are searched
    greedily, one flag at a time, keeping each change that brings the layout closer.
    Returns {} when no match is found.
    """
    current = dict(flags)
    current.update(shape_flags(found, flags))
    score = _distance(found, current, build)
    while score:
        scored = [(_distance(found, cand, build), i, cand) for i, cand in enumerate(_neighbours(current))]
        if not scored or min(scored)[0] >= score:
            return {}
        score, _, current = min(scored)
    return {k: v for k, v in current.items() if flags.get(k) != v}


def _neighbours(flags):
    for name, values in _CANDIDATES.items():
        if name in flags:
            for value in values:
                if value != flags[name]:
                    yield {**flags, name: value}


def _distance(found, flags, build):
    """Number of differing keys between `found` and the model build(**flags) (on the meta device)."""
    try:
        with th.device("meta"):
            expected = layout_of(build(**flags).state_dict())
    except Exception:  # an impossible combination of flags
        return float("inf")
    missing, unexpected, mis_shaped = layout_differences(expected, found)
    return len(missing) + len(unexpected) + len(mis_shaped)


def shape_flags(found, flags):
    """Flags that can be read directly off the checkpoint's shapes."""
    out = {}
    width = found.get("time_embed.0.weight")
    for name in ("num_channels", "classifier_width"):
        if width and name in flags:
            out[name] = width[1]
    if "class_cond" in flags:
        out["class_cond"] = "label_emb.weight" in found
    classes = found.get("label_emb.weight") or found.get("out.2.c_proj.weight")  # UNet embedding, attention-pool head
    if "num_classes" in flags and classes:
        out["num_classes"] = classes[0]
        if "p_uncond" in flags and "label_emb.weight" in found:
            out.update(_null_class_flags(classes[0], flags))
    head = found.get("out.2.weight")
    if "learn_sigma" in flags and head and len(head) >= 3 and head[0] in (3, 6):
        out["learn_sigma"] = head[0] == 6
    emb, conv = found.get("input_blocks.1.0.emb_layers.1.weight"), found.get("input_blocks.1.0.in_layers.2.weight")
    for name in ("use_scale_shift_norm", "classifier_use_scale_shift_norm"):
        if name in flags and emb and conv:
            out[name] = emb[0] == 2 * conv[0]
    return out


def _null_class_flags(rows, flags):
    """num_classes and p_uncond of a label embedding with `rows` rows: one more than --num_classes is the
    null class of classifier-free guidance (any p_uncond > 0 builds it; 0.1 stands for them)."""
    if rows == flags["num_classes"] + 1:
        return {"num_classes": flags["num_classes"], "p_uncond": flags["p_uncond"] or 0.1}
    if rows == flags["num_classes"]:
        return {"p_uncond": 0.0}
    return {}
