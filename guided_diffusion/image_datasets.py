"""
Image folder loading for diffusion and classifier training.

A data folder is searched recursively for images; with ``class_cond`` the
label of ``some/dir/<class>_<anything>.png`` is ``<class>``.  Folders may be
local paths or any URL that ``blobfile`` understands.
"""

import math
import random

import blobfile as bf
import numpy as np
from PIL import Image
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
):
    """
    Build an endless stream of ``(images, cond)`` batches from a folder.

    ``images`` is a float32 NCHW tensor scaled to [-1, 1]; ``cond`` is
    ``{"y": int64 labels}`` when ``class_cond`` is set and ``{}`` otherwise.
    Each distributed rank reads a disjoint shard of the files.

    Input problems raise here, at call time, rather than on the first batch.
    """
    paths = _list_data_dir(data_dir)
    classes = _class_indices(paths) if class_cond else None
    rank, world = _rank_and_world()
    dataset = ImageDataset(
        image_size,
        paths,
        classes=classes,
        shard=rank,
        num_shards=world,
        random_crop=random_crop,
        random_flip=random_flip,
    )
    _check_enough_images(dataset, batch_size, len(paths), world)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=1,
        drop_last=True,
    )
    return _forever(loader)


def class_names(data_dir):
    """The sorted class names of a labeled folder (file-name prefixes); index i is label i."""
    return sorted({_class_name(path) for path in _list_data_dir(data_dir)})


def _forever(loader):
    while True:
        yield from loader


def _list_data_dir(data_dir):
    if not data_dir:
        raise ValueError(
            "--data_dir is required: pass the folder that holds your training "
            "images (searched recursively for "
            f"{_extension_text()} files)."
        )
    if not bf.isdir(data_dir):
        problem = "is not a directory" if bf.exists(data_dir) else "does not exist"
        raise ValueError(
            f"--data_dir {data_dir!r} {problem}; point it at a folder of images."
        )
    paths = _list_image_files_recursively(data_dir)
    if not paths:
        raise ValueError(
            f"--data_dir {data_dir!r} contains no images; accepted extensions "
            f"(any case, searched recursively) are {_extension_text()}."
        )
    return paths


def _extension_text():
    return ", ".join("." + ext for ext in IMAGE_EXTENSIONS)


def _list_image_files_recursively(data_dir):
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        full_path = bf.join(data_dir, entry)
        ext = entry.split(".")[-1]
        if "." in entry and ext.lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif bf.isdir(full_path):
            results.extend(_list_image_files_recursively(full_path))
    return results


def _class_indices(paths):
    """Map each path to the index of its file-name prefix among sorted classes."""
    names = [_class_name(path) for path in paths]
    index_of = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index_of[name] for name in names]


def _class_name(path):
    base = bf.basename(path)
    prefix, sep, _ = base.partition("_")
    if not sep or not prefix:
        raise ValueError(
            f"class_cond=True needs the class in each file name, but {path!r} "
            "has no '<class>_' prefix. Name files '<class>_<anything>.png' "
            "(e.g. 'dog_0001.png'; the class is the text before the first "
            "'_'), or train without --class_cond."
        )
    return prefix


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_enough_images(dataset, batch_size, total, world):
    # With drop_last=True a shard smaller than one batch would make the
    # endless loop spin forever without yielding anything.
    if len(dataset) < batch_size:
        raise ValueError(
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
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        random_crop=False,
        random_flip=True,
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
        arr = arr.astype(np.float32) / 127.5 - 1
        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict


def _read_rgb_image(path):
    try:
        with bf.BlobFile(path, "rb") as f:
            pil_image = Image.open(f)
            # Decode now: PIL is lazy and the file closes when we leave.
            pil_image.load()
        return pil_image.convert("RGB")
    except Exception as exc:
        raise ValueError(
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
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )
    scale = target / min(*pil_image.size)
    return pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False):
    """Batches of large_size images whose cond also holds `low_res`: the same images area-downsampled to small_size."""
    import torch.nn.functional as F

    for large_batch, model_kwargs in load_data(data_dir=data_dir, batch_size=batch_size, image_size=large_size,
                                               class_cond=class_cond):
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs
