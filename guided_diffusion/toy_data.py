"""
A small built-in labeled image dataset, so training runs without any data.

Each class is a distinct shape drawn in its own colour family on a jittered
background.  Images are written as ``<class>_<index:05d>.png`` into one
folder, which ``image_datasets.load_data`` then reads exactly like user data
(labels come from the file-name prefix, so the label of a class is its
position in ``TOY_CLASSES``).
"""

import json
import os
import shutil
import tempfile
import zlib

import numpy as np
from PIL import Image

from .errors import UsageError

# Sorted, so that load_data's sorted-prefix numbering matches the positions.
TOY_CLASSES = ("circle", "cross", "square", "triangle")

# The seed of the held-out (validation) toy set: the same classes, other images.
TOY_VALIDATION_SEED = 1

# Bump when rendering changes, so stale cached folders get regenerated.
TOY_FORMAT_VERSION = 1

MARKER_NAME = ".complete"

# Base RGB colour (0..1) of each class; per-image jitter is added on top.
_CLASS_COLOURS = {
    "circle": (0.88, 0.16, 0.14),  # red
    "cross": (0.16, 0.32, 0.92),  # blue
    "square": (0.16, 0.78, 0.22),  # green
    "triangle": (0.96, 0.82, 0.12),  # yellow
}


def default_toy_root():
    return os.environ.get("GUIDED_DIFFUSION_DATA", os.path.join(os.path.expanduser("~"), ".cache", "guided_diffusion"))


def toy_dataset_dir(root=None, image_size=32, num_per_class=256, seed=0):
    """The folder ``ensure_toy_dataset`` uses for these parameters."""
    name = f"toy_shapes_{image_size}px_{num_per_class}"
    if seed != 0:
        name += f"_seed{seed}"
    return os.path.join(root or default_toy_root(), name)


def ensure_toy_dataset(root=None, image_size=32, num_per_class=256, seed=0):
    """
    Return the folder of the toy dataset under ``root`` (default: the
    ``GUIDED_DIFFUSION_DATA`` environment variable, else
    ``~/.cache/guided_diffusion``), generating it first unless a complete copy
    is already there.  Safe against interrupted runs and concurrent callers.
    """
    folder = toy_dataset_dir(root, image_size, num_per_class, seed)
    params = _toy_params(image_size, num_per_class, seed, TOY_CLASSES)
    if _is_complete(folder, params):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    # Build beside the target and rename it in whole: the final path only
    # ever holds a finished set, whatever happens to this process.
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
    try:
        make_toy_dataset(tmp, image_size, num_per_class, seed)
        _write_marker(tmp, params)
        _move_into_place(tmp, folder, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _toy_params(image_size, num_per_class, seed, classes):
    return {
        "format": TOY_FORMAT_VERSION,
        "image_size": int(image_size),
        "num_per_class": int(num_per_class),
        "seed": int(seed),
        "classes": list(classes),
    }


def _is_complete(folder, params):
    try:
        with open(os.path.join(folder, MARKER_NAME)) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def _write_marker(folder, params):
    with open(os.path.join(folder, MARKER_NAME), "w") as f:
        json.dump(params, f, sort_keys=True)


def _move_into_place(tmp, folder, params):
    try:
        os.rename(tmp, folder)
        return
    except OSError:
        pass
    if _is_complete(folder, params):
        return  # another process (e.g. another rank) finished first
    # A stale folder (older format, or tampered with): swap ours in.
    trash = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".old-", dir=os.path.dirname(folder))
    try:
        os.rename(folder, os.path.join(trash, "old"))
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def make_toy_dataset(folder, image_size=32, num_per_class=256, seed=0, classes=TOY_CLASSES):
    """Write ``num_per_class`` PNGs per class into ``folder``; return it."""
    if image_size < 8:
        raise UsageError(f"toy images need image_size >= 8, got {image_size}")
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    os.makedirs(folder, exist_ok=True)
    for class_name in classes:
        rng = _class_rng(seed, class_name)
        for i in range(num_per_class):
            arr = render_toy_image(class_name, image_size, rng)
            _save_png(arr, os.path.join(folder, f"{class_name}_{i:05d}.png"))
    return folder


def _class_rng(seed, class_name):
    # Keyed by name, not position, so a class's images do not change when
    # the list of classes does; and index i is the same for any count > i.
    return np.random.default_rng([int(seed), zlib.crc32(class_name.encode())])


def _save_png(arr, path):
    Image.fromarray(arr).save(path, format="PNG")


def render_toy_image(class_name, image_size, rng):
    """Draw one random image of ``class_name`` as a uint8 HWC RGB array."""
    if class_name not in _SHAPES:
        raise ValueError(f"unknown toy class {class_name!r}; choose from {TOY_CLASSES}")
    x, y = _pixel_grid(image_size)
    image = _background(x, y, rng)
    dist = _SHAPES[class_name](*_shape_frame(x, y, rng))
    # Signed distance -> coverage over about one pixel: cheap anti-aliasing.
    alpha = np.clip(0.5 - dist * image_size, 0.0, 1.0)[..., None]
    image = image * (1.0 - alpha) + _shape_colour(class_name, rng) * alpha
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _pixel_grid(image_size):
    """Pixel-centre coordinates in [0, 1], as (x, y) arrays of shape HxW."""
    coords = (np.arange(image_size) + 0.5) / image_size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def _background(x, y, rng):
    """A dim, slightly tinted background with a gentle linear gradient."""
    level = rng.uniform(0.06, 0.42)
    tint = rng.normal(0.0, 0.04, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    slope = rng.uniform(-0.12, 0.12)
    ramp = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)
    return (level + slope * ramp)[..., None] + tint


def _shape_frame(x, y, rng):
    """
    Coordinates relative to a random centre, rotated by a small random angle
    and divided by a random half-size, so each shape lives in roughly
    [-1, 1]^2.  Returns (u, v, half_size); distances are scaled back by it.
    """
    half = rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(half + 0.04, 1.0 - half - 0.04, size=2)
    # Small angles only: a square must not turn into a diamond, nor a cross
    # into an X.
    theta = rng.uniform(-0.3, 0.3)
    dx, dy = x - cx, y - cy
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / half
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / half
    return u, v, half


def _shape_colour(class_name, rng):
    base = np.array(_CLASS_COLOURS[class_name])
    jitter = rng.normal(0.0, 0.05, size=3)
    return np.clip((base + jitter) * rng.uniform(0.82, 1.05), 0.0, 1.0)


def _box(u, v, hu, hv):
    """Exact signed distance to an axis-aligned box of half-sides hu, hv."""
    qu, qv = np.abs(u) - hu, np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0)


def _circle(u, v, half):
    return (np.hypot(u, v) - 1.0) * half


def _square(u, v, half):
    return _box(u, v, 0.85, 0.85) * half


def _cross(u, v, half):
    return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0)) * half


def _triangle(u, v, half):
    # Equilateral, apex up (image y grows downwards): the intersection of
    # three half-planes at the inradius.  Circumradius 1.2 gives it an area
    # comparable to the other shapes; the shift centres its bounding box.
    # Max of plane distances is exact inside and near edges, which is all
    # the anti-aliasing needs.
    radius = 1.2
    v = v - radius / 4.0
    normals = np.deg2rad([90.0, 210.0, 330.0])
    planes = [np.cos(a) * u + np.sin(a) * v for a in normals]
    return (np.maximum.reduce(planes) - radius / 2.0) * half


_SHAPES = {"circle": _circle, "cross": _cross, "square": _square, "triangle": _triangle}
