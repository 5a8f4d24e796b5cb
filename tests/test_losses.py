"""normal_kl and the discretised Gaussian likelihood against independent computations."""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_matches_torch_distributions():
    m1, m2 = th.randn(50), th.randn(50)
    lv1, lv2 = th.randn(50), th.randn(50)
    p = th.distributions.Normal(m1, (0.5 * lv1).exp())
    q = th.distributions.Normal(m2, (0.5 * lv2).exp())
    th.testing.assert_close(normal_kl(m1, lv1, m2, lv2), th.distributions.kl_divergence(p, q), rtol=1e-5, atol=1e-5)


def test_normal_kl_scalars_and_zero():
    m = th.randn(10)
    assert th.all(normal_kl(m, 0.3, m, 0.3).abs() < 1e-7)
    th.testing.assert_close(normal_kl(m, 0.0, 0.0, 0.0), 0.5 * m**2)
    with pytest.raises(TypeError):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_cdf_approximation_is_close_to_erf():
    x = th.linspace(-5, 5, 101)
    exact = 0.5 * (1 + th.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 2e-3
    assert approx_standard_normal_cdf(th.tensor(0.0)).item() == 0.5


@pytest.mark.parametrize("mean, log_scale", [(0.0, math.log(0.01)), (0.3, math.log(0.1)), (-0.95, math.log(0.5))])
def test_bin_probabilities_sum_to_one(mean, log_scale):
    """The 256 bins partition the real line (edges run to +-inf), so their masses add to 1."""
    x = th.linspace(-1, 1, 256, dtype=th.float64)
    logp = discretized_gaussian_log_likelihood(x, means=th.full_like(x, mean), log_scales=th.full_like(x, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_narrow_gaussian_puts_its_mass_in_its_own_bin():
    x = th.linspace(-1, 1, 256, dtype=th.float64)
    logp = discretized_gaussian_log_likelihood(
        x, means=th.full_like(x, x[200].item()), log_scales=th.full_like(x, -7.0)
    )
    assert th.argmax(logp).item() == 200 and logp[200].exp().item() > 0.99


def test_likelihood_of_a_bin_matches_numpy():
    x, mean, std = 0.2, 0.19, 0.05
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    expected = np.log(cdf((x - mean + 1 / 255) / std) - cdf((x - mean - 1 / 255) / std))
    got = discretized_gaussian_log_likelihood(
        th.tensor([x]), means=th.tensor([mean]), log_scales=th.tensor([math.log(std)])
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        discretized_gaussian_log_likelihood(th.zeros(3), means=th.zeros(2), log_scales=th.zeros(3))
