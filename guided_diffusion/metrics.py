"""The paper's sample-quality metrics on plain feature arrays: FID, sFID, IS, precision and recall.

Each function takes numpy arrays of features (rows = images), so any feature
extractor works: Inception-v3 for the paper's numbers (`inception.py`), or a
small classifier's features for toy data. The arithmetic follows the original
`evaluations/evaluator.py` of guided-diffusion, dtype choices included, so the
same features give the same numbers.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch as th

from .errors import UserError

IS_SPLIT_SIZE = 5000  # the original splits IS into consecutive groups of 5000 samples
DEFAULT_K = 3  # neighbourhood size of the precision/recall manifolds (Kynkaanniemi et al. 2019)
DEFAULT_BLOCK = 5000  # rows/columns of one distance block: 5000^2 float32 = 100 MB


# --------------------------------------------------------------------------- Frechet distance


@dataclass
class FIDStatistics:
    """Mean (D,) and covariance (D, D) of a set of features."""

    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(self, other, eps=1e-6):
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def compute_statistics(features):
    """FIDStatistics of (N, D) features: float32 mean and float64 covariance, as the original."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise UserError(f"statistics need a (N, D) array with N >= 2 rows, got shape {features.shape}")
    return FIDStatistics(np.mean(features, axis=0), np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, Eq. 6 of arXiv 1706.08500).

    As the original: when the square root of S1 S2 is not finite, eps is added
    to both diagonals; a complex root whose diagonal has an imaginary part above
    1e-3 is an error, a smaller one is numerical noise and dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of covariances is singular; adding {eps} to their diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(
                f"FID: the square root of the covariance product has an imaginary component "
                f"{np.max(np.abs(covmean.imag))}; use more samples than feature dimensions"
            )
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# --------------------------------------------------------------------------- Inception Score


def inception_score(probs, split_size=IS_SPLIT_SIZE):
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, Sec. 4), the mean over consecutive splits.

    probs: (N, classes) class probabilities. A zero probability contributes
    0 log 0 = 0 (the original's formula gives nan there).
    """
    probs = np.asarray(probs)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# --------------------------------------------------------------------------- precision and recall


def pairwise_distances(u, v, half=True):
    """Squared Euclidean distances (len(u), len(v)) as float32: max(|u|^2 - 2 u.v + |v|^2, 0).

    With half=True, as the original: the sum is formed in float16 (inputs and
    each partial result rounded to float16; the products accumulate in float32,
    as a GPU's half-precision matmul does) unless some distance overflows float16,
    in which case the block is computed in float32.
    """
    if half:
        d = _distances(u.half().float(), v.half().float(), round_to_half=True)
        if th.isfinite(d).all():
            return d
    return _distances(u.float(), v.float(), round_to_half=False)


def _distances(u, v, round_to_half):
    r = (lambda x: x.half().float()) if round_to_half else (lambda x: x)
    # float32 then float16 rounds each step correctly: float32 holds 2 * 11 + 2 bits of precision
    norm_u = r((u * u).sum(dim=1))[:, None]
    norm_v = r((v * v).sum(dim=1))[None, :]
    return r(r(norm_u - 2 * r(u @ v.T)) + norm_v).clamp(min=0)


def manifold_radii(features, k=DEFAULT_K, block=DEFAULT_BLOCK, half=True):
    """Distance from each row to its k-th nearest neighbour in the same set (the point itself counts as 0-th).

    features: (N, D). Computed in blocks of `block` x `block` distances, keeping a
    running k + 1 smallest per row, so memory does not grow with N^2.
    """
    x = _as_tensor(features)
    if len(x) <= k:
        raise UserError(f"precision/recall with k={k} need more than {k} feature rows, got {len(x)}")
    radii = th.empty(len(x))
    for r0 in range(0, len(x), block):
        rows = x[r0 : r0 + block]
        best = th.full((len(rows), 0), float("inf"))
        for c0 in range(0, len(x), block):
            d = pairwise_distances(rows, x[c0 : c0 + block], half)
            best = th.cat([best, d], dim=1).topk(min(k + 1, best.shape[1] + d.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + block] = best[:, k]
    return radii.numpy()


def precision_recall(ref_features, sample_features, k=DEFAULT_K, block=DEFAULT_BLOCK, half=True):
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-2 of arXiv 1904.06991).

    Precision: the fraction of samples inside the reference manifold (within the
    k-NN radius of some reference). Recall: the fraction of references inside the
    sample manifold. Returns (precision, recall) as floats.
    """
    ref, sample = _as_tensor(ref_features), _as_tensor(sample_features)
    ref_radii = th.from_numpy(manifold_radii(ref, k, block, half))
    sample_radii = th.from_numpy(manifold_radii(sample, k, block, half))
    sample_inside = th.zeros(len(sample), dtype=th.bool)
    ref_inside = th.zeros(len(ref), dtype=th.bool)
    for r0 in range(0, len(ref), block):
        for s0 in range(0, len(sample), block):
            d = pairwise_distances(ref[r0 : r0 + block], sample[s0 : s0 + block], half)  # (refs, samples)
            sample_inside[s0 : s0 + block] |= (d <= ref_radii[r0 : r0 + block, None]).any(dim=0)
            ref_inside[r0 : r0 + block] |= (d <= sample_radii[None, s0 : s0 + block]).any(dim=1)
    return float(sample_inside.double().mean()), float(ref_inside.double().mean())


def _as_tensor(features):
    x = features if isinstance(features, th.Tensor) else th.from_numpy(np.ascontiguousarray(features))
    if x.ndim != 2:
        raise ValueError(f"features must be a (N, D) array, got shape {tuple(x.shape)}")
    return x.float()
