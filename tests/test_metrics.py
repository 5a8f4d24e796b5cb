"""FID, IS, precision and recall against closed forms and brute force."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from guided_diffusion.metrics import (
    FIDStatistics,
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)


def _random_stats(rng, n=60, d=5):
    return compute_statistics(rng.standard_normal((n, d)).astype(np.float32) @ rng.standard_normal((d, d)))


def test_statistics_as_the_original():
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    stats = compute_statistics(x)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64
    np.testing.assert_array_equal(stats.mu, x.mean(axis=0))
    np.testing.assert_array_equal(stats.sigma, np.cov(x, rowvar=False))


def test_frechet_distance_is_zero_for_identical_statistics():
    stats = _random_stats(np.random.default_rng(1))
    assert stats.frechet_distance(stats) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_closed_form_for_commuting_covariances():
    # Same eigenvectors Q: Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i), so d^2 = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_give_a_finite_distance():
    rng = np.random.default_rng(3)
    s1 = compute_statistics(rng.standard_normal((4, 10)))  # rank 3 in 10 dimensions
    s2 = compute_statistics(rng.standard_normal((4, 10)) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = s1.frechet_distance(s2)
    assert np.isfinite(d) and d > 0


def test_non_finite_square_root_takes_the_eps_fallback(monkeypatch):
    # Older scipy returns inf/nan for the root of a singular product; the original then adds eps to both diagonals.
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(m, *args, **kwargs):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = _random_stats(np.random.default_rng(4)), _random_stats(np.random.default_rng(5))
    with pytest.warns(UserWarning, match="adding 1e-06"):
        d = s1.frechet_distance(s2)
    offset = np.eye(5) * 1e-6
    np.testing.assert_array_equal(calls[1], (s1.sigma + offset).dot(s2.sigma + offset))
    assert np.isfinite(d)


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((50, 1008), 1 / 1008, dtype=np.float32)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_inception_score_of_n_equally_likely_one_hot_classes_is_n(n):
    probs = np.zeros((20 * n, 1008), dtype=np.float32)
    probs[np.arange(20 * n), np.arange(20 * n) % n] = 1
    assert inception_score(probs) == pytest.approx(n, rel=1e-5)


def test_inception_score_is_the_mean_over_consecutive_splits():
    probs = np.zeros((8, 10))
    probs[:4] = 0.1  # uniform: 1
    probs[np.arange(4, 8), np.arange(4)] = 1  # four classes: 4
    assert inception_score(probs, split_size=4) == pytest.approx(2.5)


def _brute_force_pr(ref, sample, k=3):
    def dist(a, b):
        return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)

    ref_radii = np.sort(dist(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(dist(sample, sample), axis=1)[:, k]
    d = dist(ref, sample)
    return (d <= ref_radii[:, None]).any(0).mean(), (d <= sample_radii[None]).any(1).mean()


def _two_sets(seed, n_ref=40, n_sample=30, d=8):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n_ref, d)).astype(np.float32)
    sample = (rng.standard_normal((n_sample, d)) * 1.3 + 0.8).astype(np.float32)
    return ref, sample


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_agree_with_brute_force(seed):
    ref, sample = _two_sets(seed)
    precision, recall = precision_recall(ref, sample, half=False)
    expected = _brute_force_pr(ref, sample)
    assert (precision, recall) == pytest.approx(expected)
    assert 0 < precision < 1 and 0 < recall < 1


@pytest.mark.parametrize("half", [False, True])
def test_identical_sets_give_one_and_far_sets_give_zero(half):
    ref, _ = _two_sets(3)
    assert precision_recall(ref, ref.copy(), half=half) == (1.0, 1.0)
    assert precision_recall(ref, ref + 100, half=half) == (0.0, 0.0)


def test_chunking_does_not_change_the_result():
    ref, sample = _two_sets(4, n_ref=53, n_sample=41)
    for half in (False, True):
        whole = precision_recall(ref, sample, half=half, block=10_000)
        assert precision_recall(ref, sample, half=half, block=7) == whole
        # the matmul of a block may sum in another order: equal up to float32 rounding
        np.testing.assert_allclose(
            manifold_radii(ref, block=5, half=half), manifold_radii(ref, block=999, half=half), rtol=1e-5
        )


def test_half_precision_distances_fall_back_to_float32_on_overflow():
    import torch as th

    u = th.full((3, 2048), 10.0)  # |u|^2 = 204800 > float16's 65504
    v = th.zeros((2, 2048))
    d = pairwise_distances(u, v, half=True)
    assert th.isfinite(d).all()
    assert th.equal(d, pairwise_distances(u, v, half=False))


def test_half_precision_rounds_like_float16():
    import torch as th

    u, v = th.tensor([[0.0, 0.0]]), th.tensor([[1.0 + 2**-12, 0.0]])  # 1 + 2^-12 is 1 in float16
    assert pairwise_distances(u, v, half=True).item() == 1.0
    assert pairwise_distances(u, v, half=False).item() == pytest.approx((1 + 2**-12) ** 2)


def test_too_few_rows_for_k_is_a_clear_error():
    with pytest.raises(ValueError, match="more than 3 feature rows"):
        precision_recall(np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32))


def test_fid_statistics_dataclass_matches_the_function():
    rng = np.random.default_rng(6)
    a, b = _random_stats(rng), _random_stats(rng)
    assert isinstance(a, FIDStatistics)
    assert a.frechet_distance(b) == frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
