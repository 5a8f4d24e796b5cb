"""DPM-Solver++ against exact answers: Gaussian data with the closed-form denoiser.

For data x0 ~ N(mu, s^2) (each pixel), x_t = alpha_t x0 + sigma_t eps is N(alpha_t mu, v_t) with
v_t = alpha_t^2 s^2 + sigma_t^2, the exact predictors are E[x0 | x_t] = mu + alpha_t s^2 / v_t
(x_t - alpha_t mu) and E[eps | x_t] = (x_t - alpha_t E[x0 | x_t]) / sigma_t, and the probability-flow
ODE keeps z = (x_t - alpha_t mu) / sqrt(v_t) fixed. So from x_T the exact output of a sampler that
ends with a denoising step at t = 0 is E[x0 | x_0] with x_0 = alpha_0 mu + sqrt(v_0) z.
"""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.samplers import dynamic_threshold, log_snr, sample_dpmpp, solver_step, step_order, step_timesteps

SHAPE = (6, 1, 2, 2)


def _diffusion(schedule="linear", mean_type=ModelMeanType.EPSILON, steps=1000, respacing=None):
    kwargs = dict(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    if respacing:
        return SpacedDiffusion(space_timesteps(steps, respacing), **kwargs)
    return GaussianDiffusion(**kwargs)


class GaussianData:
    """The exact denoiser of N(mu, s^2) data under a diffusion's (original) schedule."""

    def __init__(self, alphas_cumprod, mu=0.3, s=0.5):
        self.abar = th.tensor(alphas_cumprod, dtype=th.float64)
        self.mu, self.s = mu, s

    def _coefficients(self, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        a = abar.sqrt()
        return a, (1 - abar).sqrt(), a * a * self.s**2 + (1 - abar)

    def x0(self, x, t):
        a, _, v = self._coefficients(t)
        return (self.mu + a * self.s**2 / v * (x.double() - a * self.mu)).float()

    def eps(self, x, t, y=None):
        a, sigma, _ = self._coefficients(t)
        return ((x.double() - a * self.x0(x, t).double()) / sigma).float()

    def exact_output(self, x_T):
        a_T, _, v_T = self._coefficients(th.tensor([len(self.abar) - 1]))
        a_0, _, v_0 = self._coefficients(th.tensor([0]))
        x_0 = a_0 * self.mu + v_0.sqrt() * (x_T.double() - a_T * self.mu) / v_T.sqrt()
        return self.x0(x_0.float(), th.zeros(len(x_T), dtype=th.long))


def _noise(seed=0):
    return th.randn(SHAPE, generator=th.Generator().manual_seed(seed))


def _error(diffusion, data, steps, order, schedule="logsnr", lower_order_final=True, **kwargs):
    x_T = _noise()
    out = sample_dpmpp(
        diffusion,
        data.eps,
        x_T,
        steps=steps,
        order=order,
        schedule=schedule,
        clip_denoised=False,
        lower_order_final=lower_order_final,
        **kwargs,
    )
    return float((out.double() - data.exact_output(x_T).double()).abs().max())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_solvers_converge_to_the_exact_answer(schedule):
    diffusion = _diffusion(schedule)
    data = GaussianData(diffusion.alphas_cumprod)
    assert _error(diffusion, data, 200, 1) < 0.03
    for order in (2, 3):
        assert _error(diffusion, data, 200, order) < 1e-3
        assert _error(diffusion, data, 10, order) < 0.2  # 10 evaluations: stable


@pytest.mark.parametrize("order,expected_slope", [(1, 1.0), (2, 2.0)])
def test_error_falls_at_the_expected_order(order, expected_slope):
    # Uniform-in-time steps on the linear schedule; error ~ N^-order as the number of steps N doubles
    diffusion = _diffusion("linear")
    data = GaussianData(diffusion.alphas_cumprod)
    errors = [_error(diffusion, data, n, order, schedule="time", lower_order_final=False) for n in (50, 100, 200)]
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(slope - expected_slope) < 0.35 for slope in slopes), (errors, slopes)


def test_second_order_beats_first_order_at_equal_cost():
    diffusion = _diffusion("cosine")
    data = GaussianData(diffusion.alphas_cumprod)
    for steps in (10, 15, 20):
        assert _error(diffusion, data, steps, 2) < _error(diffusion, data, steps, 1) / 2


def test_first_order_is_ddim_with_guidance():
    # DPM-Solver++(1) is DDIM (eta = 0): the same timesteps through a respaced diffusion give the same samples
    diffusion = _diffusion("linear", respacing="ddim10")
    data = GaussianData(_diffusion("linear").alphas_cumprod)

    def cond_fn(x, t, y=None):
        return 0.3 * th.ones_like(x)

    x_T = _noise(1)
    ddim = diffusion.ddim_sample_loop(data.eps, SHAPE, noise=x_T, clip_denoised=True, cond_fn=cond_fn)
    ours = sample_dpmpp(diffusion, data.eps, x_T, steps=10, order=1, clip_denoised=True, cond_fn=cond_fn)
    assert th.allclose(ours, ddim, atol=1e-5)


def test_classifier_guidance_reaches_the_exact_posterior():
    # p(y | x0) = N(y; x0, r^2) makes x0 | y Gaussian, and p(y | x_t) = N(y; E[x0|x_t], Var[x0|x_t] + r^2):
    # its gradient as cond_fn (scale 1) turns the solver into one for the posterior N(mu', s'^2).
    diffusion = _diffusion("cosine")
    data = GaussianData(diffusion.alphas_cumprod)
    y, r = 1.0, 0.4
    post_var = 1 / (1 / data.s**2 + 1 / r**2)
    posterior = GaussianData(
        diffusion.alphas_cumprod, mu=post_var * (data.mu / data.s**2 + y / r**2), s=math.sqrt(post_var)
    )

    def cond_fn(x, t, y=None):
        a, sigma, v = data._coefficients(t)
        slope = a * data.s**2 / v  # d E[x0|x_t] / d x_t
        var_x0 = data.s**2 * sigma**2 / v
        return ((1.0 - data.x0(x, t).double()) / (var_x0 + r**2) * slope).float()

    x_T = _noise(2)
    guided = sample_dpmpp(diffusion, data.eps, x_T, steps=50, clip_denoised=False, cond_fn=cond_fn)
    assert float((guided - posterior.exact_output(x_T)).abs().max()) < 0.01
    # over many draws the guided mean is the posterior mean
    many = sample_dpmpp(
        diffusion,
        data.eps,
        th.randn(4000, 1, 1, 1, generator=th.Generator().manual_seed(3)),
        steps=20,
        clip_denoised=False,
        cond_fn=cond_fn,
    )
    assert float(many.mean()) == pytest.approx(posterior.mu, abs=0.03)
    assert float(many.std()) == pytest.approx(posterior.s, rel=0.05)


def test_eps_and_x0_models_of_the_same_function_give_the_same_samples():
    eps_diffusion = _diffusion("cosine", ModelMeanType.EPSILON)
    x0_diffusion = _diffusion("cosine", ModelMeanType.START_X)
    data = GaussianData(eps_diffusion.alphas_cumprod)
    x_T = _noise(4)
    for kwargs in (dict(order=2), dict(order=3), dict(order=2, sde=True)):
        outs = []
        for diffusion, model in ((eps_diffusion, data.eps), (x0_diffusion, lambda x, t, y=None: data.x0(x, t))):
            outs.append(
                sample_dpmpp(
                    diffusion,
                    model,
                    x_T,
                    steps=12,
                    clip_denoised=True,
                    generator=th.Generator().manual_seed(5),
                    **kwargs,
                )
            )
        assert th.allclose(outs[0], outs[1], atol=1e-4)


def test_sde_variant_samples_the_data_distribution():
    diffusion = _diffusion("cosine")
    data = GaussianData(diffusion.alphas_cumprod)
    gen = th.Generator().manual_seed(6)
    out = sample_dpmpp(
        diffusion,
        data.eps,
        th.randn(4000, 1, 1, 1, generator=gen),
        steps=25,
        sde=True,
        clip_denoised=False,
        generator=gen,
    )
    assert float(out.mean()) == pytest.approx(data.mu, abs=0.03)
    assert float(out.std()) == pytest.approx(data.s, rel=0.05)


def test_respaced_diffusion_uses_its_own_timesteps():
    # Through a respaced diffusion the model still sees original timesteps, and the exact answer is the same
    full = _diffusion("linear")
    data = GaussianData(full.alphas_cumprod)
    spaced = _diffusion("linear", respacing="100")
    seen = set()

    def model(x, t, y=None):
        seen.update(t.tolist())
        return data.eps(x, t)

    x_T = _noise(7)
    out = sample_dpmpp(spaced, model, x_T, steps=20, clip_denoised=False, schedule="logsnr")
    assert seen <= set(spaced.timestep_map) and 0 in seen and 999 in seen
    assert float((out - data.exact_output(x_T)).abs().max()) < 0.03


@pytest.mark.parametrize("schedule", ["logsnr", "time"])
def test_step_timesteps_are_distinct_and_span_the_schedule(schedule):
    abar = _diffusion("cosine").alphas_cumprod
    for steps in (1, 2, 5, 10, 25, 100, 1000):
        ts = step_timesteps(abar, steps, schedule)
        assert len(ts) == steps and ts[0] == 999 and (steps == 1 or ts[-1] == 0)
        assert np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError, match="1 to 1000 steps"):
        step_timesteps(abar, 1001, schedule)


def test_logsnr_schedule_is_uniform_in_log_snr():
    abar = _diffusion("linear").alphas_cumprod
    lam = log_snr(abar[step_timesteps(abar, 10, "logsnr")])
    gaps = np.diff(lam)
    assert np.all(gaps > 0) and gaps.max() / gaps.min() < 1.2


def test_step_orders_warm_up_and_lower_at_the_end():
    assert [step_order(2, i, 9) for i in range(9)] == [1, 2, 2, 2, 2, 2, 2, 2, 1]
    assert [step_order(3, i, 9) for i in range(9)] == [1, 2, 3, 3, 3, 3, 3, 2, 1]
    assert [step_order(2, i, 20) for i in range(20)] == [1] + [2] * 18 + [1]
    assert [step_order(3, i, 9, lower_order_final=False) for i in range(3)] == [1, 2, 3]


def test_first_order_step_is_the_ddim_update():
    x, x0 = th.randn(3, 2), th.randn(3, 2)
    abar_s, abar_t = 0.3, 0.6
    lam = [0.5 * math.log(abar_t / (1 - abar_t)), 0.5 * math.log(abar_s / (1 - abar_s))]
    got = solver_step(x, [x0], lam, math.sqrt(abar_t), math.sqrt(1 - abar_t), math.sqrt(1 - abar_s), order=1)
    eps = (x - math.sqrt(abar_s) * x0) / math.sqrt(1 - abar_s)
    assert th.allclose(got, math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps, atol=1e-6)  # DDIM, Eq. 12


def test_dynamic_threshold():
    x0 = th.tensor([[0.5, -0.2, 0.1, 0.0], [3.0, -1.5, 0.5, 0.0]]).view(2, 1, 2, 2)
    out = dynamic_threshold(1.0)(x0)
    assert th.equal(out[0], x0[0])  # within [-1, 1]: untouched
    assert th.allclose(out[1].flatten(), th.tensor([1.0, -0.5, 0.5 / 3, 0.0]))


def test_the_loop_builds_no_autograd_graph():
    # Like the original's loops: model evaluations run without gradients (cond_fn enables its own)
    net = th.nn.Conv2d(1, 1, 1)
    diffusion = _diffusion("cosine", steps=50)

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            return th.autograd.grad(net(x_in).sum(), x_in)[0]

    out = sample_dpmpp(diffusion, lambda x, t, y=None: net(x), _noise(), steps=4, cond_fn=cond_fn)
    assert not out.requires_grad
