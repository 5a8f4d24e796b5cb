"""
Image folder loading for diffusion and classifier training.

A data folder is searched recursively for images.  With ``class_cond`` each
image's class comes from one of two places, chosen by ``label_source``:

- ``"filename"`` (the default, as in the original): the file-name prefix,
  ``some/dir/<class>_<anything>.png`` -> ``<class>``;
- ``"folder"``: the name of the image's parent folder, ``<class>/123.png`` or
  ``root/train/<class>/123.png`` -> ``<class>``.  Every image must then sit in
  a folder below the data folder.

Labels are indices into the sorted class names (``class_names``).  That map
can be kept beside checkpoints as a JSON file, ``CLASS_NAMES_FILE``, holding
``{"class_names": [...]}`` (see ``save_class_names``, ``read_class_names`` and
``find_class_names``).  Folders may be local paths or any URL that
``blobfile`` understands.

Which folder a script trains on is settled here too: ``training_data_dir``
falls back to the built-in toy dataset (``toy_data``) when no folder is
given, and ``labeled_data_dir`` also checks the classes against the model and
saves the class map beside the checkpoints.
"""

import json
import math
import random

import blobfile as bf
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util, logger
from .errors import UsageError, UserError
from .files import read_bytes, save_text, uint8_to_float
from .toy_data import TOY_CLASSES, TOY_VALIDATION_SEED, ensure_toy_dataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
LABEL_SOURCES = ("filename", "folder")
# The class map that training writes beside its checkpoints.
CLASS_NAMES_FILE = "class_names.json"


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    label_source="filename",
):
    """
    Build an endless stream of ``(images, cond)`` batches from a folder.

    ``images`` is a float32 NCHW tensor scaled to [-1, 1]; ``cond`` is
    ``{"y": int64 labels}`` when ``class_cond`` is set and ``{}`` otherwise.
    ``label_source`` says where a class comes from: ``"filename"`` (the
    ``<class>_`` prefix) or ``"folder"`` (the parent folder's name).
    Each distributed rank reads a disjoint shard of the files.

    Input problems raise here, at call time, rather than on the first batch.
    """
    _check_label_source(label_source)
    paths = _list_data_dir(data_dir)
    classes = _class_indices(paths, data_dir, label_source) if class_cond else None
    dataset = _this_ranks_shard(image_size, paths, classes, random_crop, random_flip)
    _check_enough_images(dataset, batch_size, len(paths), dist_util.get_world_size())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not deterministic, num_workers=1, drop_last=True)
    return _forever(loader)


def _this_ranks_shard(image_size, paths, classes, random_crop, random_flip):
    """The ImageDataset of this rank's interleaved slice of the paths."""
    return ImageDataset(
        image_size,
        paths,
        classes=classes,
        shard=dist_util.get_rank(),
        num_shards=dist_util.get_world_size(),
        random_crop=random_crop,
        random_flip=random_flip,
    )


def class_names(data_dir, label_source="filename"):
    """The sorted class names of a labeled folder (see ``label_source``); index i is label i."""
    _check_label_source(label_source)
    paths = _list_data_dir(data_dir)
    return sorted(set(_class_names_of(paths, data_dir, label_source)))


def save_class_names(names, path):
    """Write ``{"class_names": names}`` (index i is label i) to ``path`` as JSON, atomically."""
    save_text(path, json.dumps({"class_names": list(names)}, ensure_ascii=False, indent=2) + "\n")


def read_class_names(path):
    """The class names (index i is label i) stored by ``save_class_names`` in ``path``."""
    raw = read_bytes(path, "class names file")
    try:
        names = json.loads(raw.decode("utf-8"))["class_names"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise _bad_class_names_file(path, exc) from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _bad_class_names_file(path, "'class_names' is not a list of strings")
    return names


def _bad_class_names_file(path, problem):
    return UserError(
        f"class names file {path!r} is not a JSON object "
        f'{{"class_names": ["<class 0>", "<class 1>", ...]}} ({problem}); '
        "delete it, or rewrite it with save_class_names."
    )


def find_class_names(checkpoint_path):
    """The class names in ``CLASS_NAMES_FILE`` beside ``checkpoint_path``, or None without one."""
    path = bf.join(bf.dirname(checkpoint_path), CLASS_NAMES_FILE)
    if not bf.exists(path):
        return None
    return read_class_names(path)


def class_names_beside(*checkpoint_paths):
    """The class names saved by training beside the first of these checkpoints that has them, or None."""
    for path in checkpoint_paths:
        names = find_class_names(path) if path else None
        if names:
            logger.log(f"class names from beside {path}: {len(names)} classes")
            return names
    return None


# --------------------------------------------------------------------------- which folder to train on


def training_data_dir(data_dir, image_size, validation=False):
    """data_dir, or the built-in toy dataset at image_size when it is empty (rank 0 creates it)."""
    if data_dir:
        return data_dir
    seed = TOY_VALIDATION_SEED if validation else 0
    if dist_util.is_main_process():
        ensure_toy_dataset(image_size=image_size, seed=seed)
    dist_util.barrier()
    folder = ensure_toy_dataset(image_size=image_size, seed=seed)
    if dist_util.is_main_process():
        kind = "validation" if validation else "training"
        logger.log(
            f"no --{'val_' if validation else ''}data_dir given: {kind} on the built-in toy shapes dataset "
            f"({len(TOY_CLASSES)} classes: {', '.join(TOY_CLASSES)}) at {folder}"
        )
    return folder


def labeled_data_dir(data_dir, image_size, num_classes, validation=False, label_source="filename"):
    """training_data_dir, checked to hold no more classes than the model has outputs. For the training
    set, the class-name-to-index map is logged and saved beside the checkpoints (CLASS_NAMES_FILE)."""
    folder = training_data_dir(data_dir, image_size, validation=validation)
    names = class_names(folder, label_source=label_source)
    if len(names) > num_classes:
        raise UsageError(
            f"{folder} holds {len(names)} classes ({', '.join(names[:5])}...) but --num_classes is "
            f"{num_classes}; pass --num_classes {len(names)}"
        )
    if not validation and dist_util.is_main_process():
        path = bf.join(logger.get_dir(), CLASS_NAMES_FILE)
        save_class_names(names, path)
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(names[:20]))
        more = ", ..." if len(names) > 20 else ""
        logger.log(f"classes (from the {label_source}s, saved to {path}): {shown}{more}")
    return folder


# --------------------------------------------------------------------------- listing and labels


def _check_label_source(label_source):
    if label_source not in LABEL_SOURCES:
        choices = " or ".join(repr(s) for s in LABEL_SOURCES)
        raise UsageError(
            f"--label_source {label_source!r} is not supported; use {choices} "
            "(the class from the '<class>_' file-name prefix, or from the "
            "image's parent folder)."
        )


def _forever(loader):
    try:
        while True:
            yield from loader
    except UserError as exc:
        raise _unwrapped(exc) from None


def _unwrapped(exc):
    """A UserError raised in a DataLoader worker, without the worker's traceback that the loader put
    into its message: only the original message (the last line, after the error's class name)."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback" not in text or marker not in text:
        return exc
    return type(exc)(text.rsplit(marker, 1)[1].strip())


def _list_data_dir(data_dir):
    if not data_dir:
        raise UserError(
            "--data_dir is required: pass the folder that holds your training "
            "images (searched recursively for "
            f"{_extension_text()} files)."
        )
    if not bf.isdir(data_dir):
        problem = "is not a directory" if bf.exists(data_dir) else "does not exist"
        raise UserError(f"--data_dir {data_dir!r} {problem}; point it at a folder of images.")
    paths = _list_image_files_recursively(data_dir)
    if not paths:
        raise UserError(
            f"--data_dir {data_dir!r} contains no images; accepted extensions "
            f"(any case, searched recursively) are {_extension_text()}."
        )
    return paths


def _extension_text():
    return ", ".join("." + ext for ext in IMAGE_EXTENSIONS)


def _list_image_files_recursively(data_dir):
    results = []
    try:
        entries = sorted(bf.listdir(data_dir))
    except OSError as exc:  # no permission, a folder removed while listing
        raise UserError(f"cannot list the data folder {data_dir!r} ({exc}); check its permissions") from exc
    for entry in entries:
        full_path = bf.join(data_dir, entry)
        ext = entry.split(".")[-1]
        if "." in entry and ext.lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif bf.isdir(full_path):
            results.extend(_list_image_files_recursively(full_path))
    return results


def _class_indices(paths, data_dir=None, label_source="filename"):
    """Map each path to the index of its class (see ``label_source``) among sorted classes."""
    names = _class_names_of(paths, data_dir, label_source)
    index_of = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index_of[name] for name in names]


def _class_names_of(paths, data_dir, label_source):
    if label_source == "folder":
        top = bf.dirname(bf.join(data_dir, "_"))
        return [_folder_class_name(path, top) for path in paths]
    return [_class_name(path) for path in paths]


def _folder_class_name(path, top):
    """The parent folder's name; ``top`` is the data folder as listed paths spell it."""
    parent = bf.dirname(path)
    if parent == top:
        raise UserError(
            f"--label_source folder takes each image's class from its parent "
            f"folder, but {path!r} sits directly in --data_dir {top!r}. Put it "
            f"in a class folder (e.g. '<class>/{bf.basename(path)}'), or use "
            "--label_source filename."
        )
    return bf.basename(parent)


def _class_name(path):
    base = bf.basename(path)
    prefix, sep, _ = base.partition("_")
    if not sep or not prefix:
        raise UserError(
            f"class_cond=True needs the class in each file name, but {path!r} "
            "has no '<class>_' prefix. Name files '<class>_<anything>.png' "
            "(e.g. 'dog_0001.png'; the class is the text before the first "
            "'_'), pass --label_source folder to take the class from each "
            "image's parent folder, or train without --class_cond."
        )
    return prefix


def _check_enough_images(dataset, batch_size, total, world):
    # With drop_last=True a shard smaller than one batch would make the
    # endless loop spin forever without yielding anything.
    if len(dataset) < batch_size:
        raise UserError(
            f"this rank's shard has {len(dataset)} images ({total} found, split "
            f"across {world} ranks) but batch_size is {batch_size}; add images, "
            "lower the batch size, or use fewer ranks."
        )


class ImageDataset(Dataset):
    """
    The ``shard``-th of ``num_shards`` interleaved slices of ``image_paths``,
    returned as (CHW float32 array in [-1, 1], {"y": label} or {}).
    """

    def __init__(
        self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True
    ):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard::num_shards]
        self.local_classes = None if classes is None else classes[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        pil_image = _read_rgb_image(self.local_images[idx])
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        chw = uint8_to_float(np.ascontiguousarray(arr)[None])[0].numpy()  # (C, H, W) float32 in [-1, 1]
        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return chw, out_dict


def _read_rgb_image(path):
    try:
        with bf.BlobFile(path, "rb") as f:
            pil_image = Image.open(f)
            # Decode now: PIL is lazy and the file closes when we leave.
            pil_image.load()
        return pil_image.convert("RGB")
    except Exception as exc:
        raise UserError(
            f"could not read image {path!r} ({exc}); the file is corrupt or not "
            "a supported image; delete or replace it."
        ) from exc


def center_crop_arr(pil_image, image_size):
    """Resize the short side to ``image_size`` and take the central square."""
    arr = np.array(_resize_short_side(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """
    Resize the short side to a random length so that the square crop covers
    between ``min_crop_frac`` and ``max_crop_frac`` of it, then crop at a
    random offset.
    """
    min_smaller_dim = math.ceil(image_size / max_crop_frac)
    max_smaller_dim = math.ceil(image_size / min_crop_frac)
    smaller_dim = random.randrange(min_smaller_dim, max_smaller_dim + 1)
    arr = np.array(_resize_short_side(pil_image, smaller_dim))
    top = random.randrange(arr.shape[0] - image_size + 1)
    left = random.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def _resize_short_side(pil_image, target):
    # BICUBIC alone aliases badly on big downscales, so first halve with a
    # box filter (a proper average) while the image is still >= 2x too big.
    while min(*pil_image.size) >= 2 * target:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = target / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False, label_source="filename"):
    """Batches of large_size images whose cond also holds `low_res`: the same images area-downsampled to small_size."""
    import torch.nn.functional as F

    for large_batch, model_kwargs in load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=large_size,
        class_cond=class_cond,
        label_source=label_source,
    ):
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs
