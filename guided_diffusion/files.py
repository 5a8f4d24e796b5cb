"""Files and image arrays: atomic writes, existence checks, and the conversions between uint8 images
and the [-1, 1] floats the networks see.

Every file the library writes (checkpoints, samples, grids, statistics, class maps) goes through
atomic_write, so a run killed midway never leaves a truncated file under the final name.
"""

import math
import os
import tempfile

import blobfile as bf
import numpy as np
import torch as th

from .errors import MissingFileError


def require_file(path, what="file", hint=""):
    """Raise MissingFileError naming `what` (e.g. "checkpoint", "--base_samples") unless path exists."""
    if not bf.exists(path):
        raise MissingFileError(f"{what} not found: {path}{f' ({hint})' if hint else ''}")


def read_bytes(path, what="file", hint=""):
    """The bytes of a local path or blobfile URL, with require_file's message when it is missing."""
    require_file(path, what, hint)
    with bf.BlobFile(path, "rb") as f:
        return f.read()


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    A run killed midway leaves at most a stray temporary file, never a truncated
    `path`. Remote (blobfile URL) paths are written directly: their upload only
    becomes visible when complete.
    """
    if "://" in path:
        with bf.BlobFile(path, "wb") as f:
            write(f)
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_torch(obj, path):
    """torch.save `obj` to `path` atomically."""
    atomic_write(path, lambda f: th.save(obj, f))


def save_npz(path, *arrays, **named):
    """np.savez to `path` atomically (positional arrays become arr_0, arr_1, ...)."""
    atomic_write(path, lambda f: np.savez(f, *arrays, **named))


def save_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- image arrays


def uint8_to_float(images):
    """uint8 NHWC (numpy or tensor) -> float32 NCHW tensor in [-1, 1]."""
    x = th.as_tensor(images)
    return x.float().div(127.5).sub(1.0).permute(0, 3, 1, 2)


def to_uint8_nhwc(sample):
    """[-1, 1] float NCHW tensor -> uint8 NHWC tensor (the original's rounding: truncation after clamping)."""
    return ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous()


def image_grid(images, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 array on white."""
    n, h, w, c = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def save_image_grid(images, path, nrow=None, pad=2):
    """Tile uint8 NHWC images into one PNG, nrow images per row (default: a square-ish grid)."""
    from PIL import Image

    grid = image_grid(images, nrow=nrow, pad=pad)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
