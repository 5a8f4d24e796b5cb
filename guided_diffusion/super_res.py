"""Low-resolution inputs of super-resolution sampling, read from an npz of samples."""

import blobfile as bf
import numpy as np
import torch as th

from .errors import UsageError, UserError
from .files import require_file, uint8_to_float


class BaseSamples:
    """The images (and labels) of a samples npz, served as SuperResModel kwargs by global sample index.

    Sample i upsamples base image i mod len(base), so num_samples may exceed the file's count.
    """

    def __init__(self, path, small_size, class_cond):
        if not path:
            raise UsageError("--base_samples is required: the npz of low-resolution samples (from image_sample.py)")
        require_file(path, "--base_samples", "the npz of low-resolution samples written by image_sample.py")
        with bf.BlobFile(path, "rb") as f, np.load(f) as obj:
            self.images = obj["arr_0"]
            self.labels = obj["arr_1"] if "arr_1" in obj else None
        expected = (small_size, small_size, 3)
        if self.images.ndim != 4 or self.images.shape[1:] != expected or self.images.dtype != np.uint8:
            raise UserError(
                f"--base_samples {path}: arr_0 must be uint8 of shape (N, {small_size}, {small_size}, 3) "
                f"to match --small_size {small_size}, got {self.images.dtype} {self.images.shape}"
            )
        if class_cond and self.labels is None:
            raise UserError(
                f"--base_samples {path} has no labels (arr_1) but --class_cond is True; sample the "
                "base images with a class-conditional model, or pass --class_cond False"
            )
        self.class_cond = class_cond

    def model_kwargs(self, indices, device):
        """{"low_res": (N, 3, small, small) in [-1, 1]} plus {"y": labels} when class-conditional."""
        rows = [i % len(self.images) for i in indices]
        low_res = uint8_to_float(self.images[rows])
        kwargs = {"low_res": low_res.to(device)}
        if self.class_cond:
            kwargs["y"] = th.from_numpy(self.labels[rows].astype(np.int64)).to(device)
        return kwargs
