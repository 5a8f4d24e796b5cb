"""Reading checkpoints safely and explaining why one does not fit a model.

`read_state_dict` loads with `torch.load(weights_only=True)`: a checkpoint is
data, never code. `load_model_state` checks every key and shape before loading
strictly; on a mismatch it raises CheckpointMismatchError listing the missing,
unexpected and mis-shaped keys and, when it is given the flags and the factory
that built the model, the flag values under which the checkpoint's layout fits
(found by a suggestion function: layout_flags.suggest_flags, which knows the flags).
"""

import io

import blobfile as bf
import torch as th

from .errors import UsageError, UserError
from .files import require_file

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


def load_model_state(model, state_dict, *, source="checkpoint", flags=None, build=None, suggest=None):
    """Load state_dict into model strictly, or explain the mismatch.

    :param flags: the {flag: value} the model was built from (optional).
    :param build: a function build(**flags) -> model (optional); with flags, it
        lets the error name the flag values that fit the checkpoint.
    :param suggest: suggest(found, flags, build) -> the {flag: value} (differing from flags) under which
        build has the layout found ({key: shape}), {} if none (layout_flags.suggest_flags knows our flags).
    """
    expected = layout_of(model.state_dict())
    found = layout_of(check_is_state_dict(state_dict, source))
    if expected != found:
        hint = None
        if flags is not None and build is not None and suggest is not None:
            hint = suggest(found, flags, build)
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
        "Flags that do not change the layout (the attention heads and their order) must match too."
    )
    return "\n".join(lines)


def _listing(title, items, limit=8):
    if not items:
        return []
    shown = ", ".join(str(x) for x in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return [f"  {title} ({len(items)}): {shown}{more}"]
