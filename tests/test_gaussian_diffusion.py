"""The diffusion core against closed forms and invariants.

A "perfect denoiser" knows the single data point x0 and returns the exact noise
eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t) of any x_t; with it the
reverse process must land on x0 and the MSE loss must vanish.
"""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import samplers
from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    get_named_beta_schedule,
)

SHAPE = (3, 2, 4, 4)


def make_diffusion(
    steps=100,
    schedule="linear",
    mean=ModelMeanType.EPSILON,
    var=ModelVarType.FIXED_SMALL,
    loss=LossType.MSE,
    rescale_timesteps=False,
):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
        rescale_timesteps=rescale_timesteps,
    )


def fixed_x0(shape=SHAPE, seed=1):
    gen = th.Generator().manual_seed(seed)
    return th.rand(shape, generator=gen) * 1.6 - 0.8  # inside [-1, 1], away from the clip edges


class PerfectEps:
    """Returns the exact noise of x_t for the known x0 (optionally followed by variance channels)."""

    def __init__(self, diffusion, x0, var_channels=None):
        self.alphas_cumprod = th.from_numpy(diffusion.alphas_cumprod)
        self.x0, self.var_channels, self.calls = x0, var_channels, []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        ab = self.alphas_cumprod[t.long()].view(-1, *([1] * (x.ndim - 1)))
        eps = ((x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()).float()
        if self.var_channels is None:
            return eps
        return th.cat([eps, self.var_channels.expand_as(eps)], dim=1)


# ---------------------------------------------------------------- schedules


def test_linear_schedule_endpoints_and_scaling():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)
    short = get_named_beta_schedule("linear", 250)  # scaled by 1000/250
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_closed_form_alpha_bar():
    steps = 1000
    betas = get_named_beta_schedule("cosine", steps)
    assert betas.shape == (steps,) and np.all(np.diff(betas) >= 0) and betas.max() <= 0.999
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2  # IDDPM Eq. 17
    alpha_bar = np.cumprod(1 - betas)
    expected = np.array([f(t + 1) / f(0) for t in range(steps)])
    unclipped = betas < 0.999
    np.testing.assert_allclose(alpha_bar[unclipped], expected[unclipped], rtol=1e-9, atol=1e-12)
    assert betas[-1] == 0.999  # the last step is clipped


def test_betas_for_alpha_bar_clips_at_max_beta():
    betas = betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.5)
    assert betas[-1] == 0.5 and betas[0] == pytest.approx(0.1)


def test_unknown_schedule_is_rejected():
    with pytest.raises(NotImplementedError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_constants_match_their_definitions():
    d = make_diffusion(steps=50)
    ac = np.array([math.prod(1 - b for b in d.betas[: i + 1]) for i in range(50)])
    np.testing.assert_allclose(d.alphas_cumprod, ac, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], ac[:-1])
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod**2, 1 / ac - 1, rtol=1e-10)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    for name in [
        "betas",
        "alphas_cumprod",
        "posterior_variance",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
    ]:
        assert getattr(d, name).dtype == np.float64 and getattr(d, name).shape == (50,)


def test_invalid_betas_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(
            betas=np.array([0.1, 0.0]),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.MSE,
        )


def test_loss_type_is_vb():
    assert LossType.KL.is_vb() and LossType.RESCALED_KL.is_vb()
    assert not LossType.MSE.is_vb() and not LossType.RESCALED_MSE.is_vb()


# ---------------------------------------------------------------- forward process and posterior


def test_extract_into_tensor_broadcasts_float32():
    arr = np.arange(5, dtype=np.float64) / 3
    out = gd._extract_into_tensor(arr, th.tensor([4, 0]), (2, 3, 2, 2))
    assert out.shape == (2, 3, 2, 2) and out.dtype == th.float32
    assert out[0, 2, 1, 1].item() == pytest.approx(4 / 3) and out[1].abs().max() == 0


def test_q_sample_empirical_moments():
    d = make_diffusion(steps=100)
    x0 = th.tensor([0.5, -0.3]).repeat(40000, 1)
    t = th.full((40000,), 60)
    xt = d.q_sample(x0, t)
    ab = d.alphas_cumprod[60]
    np.testing.assert_allclose(xt.mean(0).numpy(), np.sqrt(ab) * np.array([0.5, -0.3]), atol=0.015)
    np.testing.assert_allclose(xt.var(0).numpy(), [1 - ab] * 2, rtol=0.03)
    mean, var, log_var = d.q_mean_variance(x0[:1], t[:1])
    assert var[0, 0].item() == pytest.approx(1 - ab) and log_var[0, 0].item() == pytest.approx(math.log(1 - ab))


def test_q_posterior_matches_gaussian_product():
    d = make_diffusion(steps=100)
    x0, xt = fixed_x0(), fixed_x0(seed=2)
    for step in [1, 7, 50, 99]:
        t = th.full((SHAPE[0],), step)
        mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
        ab_prev, beta = d.alphas_cumprod[step - 1], d.betas[step]
        # q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions add, means combine by precision.
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        expected_mean = (
            np.sqrt(ab_prev) * x0.double() / (1 - ab_prev) + np.sqrt(1 - beta) * xt.double() / beta
        ) / precision
        np.testing.assert_allclose(mean.numpy(), expected_mean.numpy(), rtol=1e-5, atol=1e-6)
        assert var[0, 0, 0, 0].item() == pytest.approx(1 / precision, rel=1e-6)
        assert log_var[0, 0, 0, 0].item() == pytest.approx(math.log(1 / precision), rel=1e-6)


# ---------------------------------------------------------------- p_mean_variance


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
@pytest.mark.parametrize("var_type", list(ModelVarType))
def test_p_mean_variance_recovers_x0_from_a_perfect_prediction(mean_type, var_type):
    d = make_diffusion(steps=100, mean=mean_type, var=var_type)
    x0, xt = fixed_x0(), fixed_x0(seed=3)
    t = th.tensor([0, 40, 99])
    eps = (xt - th.from_numpy(d.sqrt_alphas_cumprod)[t].float().view(-1, 1, 1, 1) * x0) / th.from_numpy(
        d.sqrt_one_minus_alphas_cumprod
    )[t].float().view(-1, 1, 1, 1)
    true_mean = d.q_posterior_mean_variance(x0, xt, t)[0]
    output = {ModelMeanType.EPSILON: eps, ModelMeanType.START_X: x0, ModelMeanType.PREVIOUS_X: true_mean}[mean_type]
    var_values = th.full_like(x0, 0.3)
    if var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
        output = th.cat([output, var_values], dim=1)
    out = d.p_mean_variance(lambda x, ts: output, xt, t, clip_denoised=False)
    assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
    for value in out.values():
        assert value.shape == SHAPE
    np.testing.assert_allclose(out["pred_xstart"].numpy(), x0.numpy(), atol=2e-3)
    np.testing.assert_allclose(out["mean"].numpy(), true_mean.numpy(), atol=2e-4)
    # t > 0 only: FIXED_SMALL has variance 0 at t = 0 but logs the clipped beta_tilde_1.
    th.testing.assert_close(out["variance"][1:], out["log_variance"][1:].exp())


def test_variance_types():
    x, t = fixed_x0(), th.tensor([0, 10, 99])
    base = make_diffusion(steps=100)
    post, logpost = base.posterior_variance, base.posterior_log_variance_clipped
    expected_log = {
        ModelVarType.FIXED_SMALL: logpost[[0, 10, 99]],
        ModelVarType.FIXED_LARGE: np.log([post[1], base.betas[10], base.betas[99]]),
    }
    for var_type, logs in expected_log.items():
        d = make_diffusion(steps=100, var=var_type)
        out = d.p_mean_variance(lambda x, ts: x, x, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), logs, rtol=1e-6)
    d = make_diffusion(steps=100, var=ModelVarType.LEARNED_RANGE)
    for v, logs in [
        (-1.0, logpost[[0, 10, 99]]),
        (1.0, np.log(base.betas[[0, 10, 99]])),
        (0.0, (logpost[[0, 10, 99]] + np.log(base.betas[[0, 10, 99]])) / 2),
    ]:
        out = d.p_mean_variance(lambda x, ts, v=v: th.cat([x, th.full_like(x, v)], 1), x, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), logs, rtol=1e-5)
    d = make_diffusion(steps=100, var=ModelVarType.LEARNED)
    out = d.p_mean_variance(lambda x, ts: th.cat([x, th.full_like(x, -2.5)], 1), x, t)
    assert th.all(out["log_variance"] == -2.5)


def test_learned_sigma_needs_twice_the_channels():
    d = make_diffusion(var=ModelVarType.LEARNED_RANGE)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.p_mean_variance(lambda x, ts: x, fixed_x0(), th.tensor([1, 2, 3]))


def test_clip_and_denoised_fn():
    d = make_diffusion(steps=100, mean=ModelMeanType.START_X)
    x, t = fixed_x0(), th.tensor([5, 5, 5])
    big = lambda x, ts: 3 * th.ones_like(x)
    assert d.p_mean_variance(big, x, t)["pred_xstart"].max() == 1.0
    assert d.p_mean_variance(big, x, t, clip_denoised=False)["pred_xstart"].max() == 3.0
    halve = d.p_mean_variance(big, x, t, clip_denoised=False, denoised_fn=lambda z: z / 2)
    assert th.all(halve["pred_xstart"] == 1.5)


def test_rescale_timesteps_scales_model_input():
    seen = []
    d = make_diffusion(steps=250, rescale_timesteps=True)
    d.p_mean_variance(lambda x, ts: seen.append(ts) or x, fixed_x0(), th.tensor([0, 100, 249]))
    np.testing.assert_allclose(seen[0].numpy(), [0.0, 400.0, 996.0])


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_perfect_denoiser_ddpm_and_ddim_return_x0(schedule):
    d = make_diffusion(steps=100, schedule=schedule)
    x0 = fixed_x0()
    ddpm = d.p_sample_loop(PerfectEps(d, x0), SHAPE)
    ddim = d.ddim_sample_loop(PerfectEps(d, x0), SHAPE, eta=0.0)
    ddim_eta = d.ddim_sample_loop(PerfectEps(d, x0), SHAPE, eta=1.0)
    for sample in (ddpm, ddim, ddim_eta):
        assert sample.shape == SHAPE
        np.testing.assert_allclose(sample.numpy(), x0.numpy(), atol=1e-4)


def test_progressive_loops_yield_every_step_in_reverse_order():
    d = make_diffusion(steps=20, schedule="cosine")
    model = PerfectEps(d, fixed_x0())
    outs = list(d.p_sample_loop_progressive(model, SHAPE))
    assert len(outs) == 20 and all(set(o) == {"sample", "pred_xstart"} for o in outs)
    assert [int(t[0]) for t in model.calls] == list(range(19, -1, -1))
    th.manual_seed(5)
    final = d.ddim_sample_loop(model, SHAPE)
    th.manual_seed(5)
    *_, last = d.ddim_sample_loop_progressive(model, SHAPE)
    th.testing.assert_close(final, last["sample"])


def test_ddim_eta0_is_deterministic_given_noise_and_ddpm_is_not():
    d = make_diffusion(steps=30)
    model = lambda x, t: 0.5 * x
    noise = th.randn(SHAPE)
    a = d.ddim_sample_loop(model, SHAPE, noise=noise.clone())
    b = d.ddim_sample_loop(model, SHAPE, noise=noise.clone())
    th.testing.assert_close(a, b, rtol=0, atol=0)
    c = d.p_sample_loop(model, SHAPE, noise=noise.clone())
    e = d.p_sample_loop(model, SHAPE, noise=noise.clone())
    assert (c - e).abs().max() > 1e-3


def smooth_eps_model(x, t):
    # An imperfect but smooth noise predictor, for ODE invertibility checks.
    return 0.7 * x + 0.05 * th.sin(3 * x)


def test_ddim_reverse_then_sample_recovers_xt_for_a_small_step():
    d = make_diffusion(steps=1000)
    x = fixed_x0() * 0.5
    for step in [10, 500, 900]:
        t = th.full((SHAPE[0],), step)
        up = d.ddim_reverse_sample(smooth_eps_model, x, t, clip_denoised=False)["sample"]
        back = d.ddim_sample(smooth_eps_model, up, t + 1, clip_denoised=False)["sample"]
        assert (back - x).abs().max() < 2e-3


def gaussian_data_eps_model(diffusion, data_var=0.25):
    """The exact E[eps | x_t] when the data is N(0, data_var): sqrt(1-ab) x_t / (ab data_var + 1 - ab)."""
    alpha_bar = th.from_numpy(diffusion.alphas_cumprod).float()

    def model(x, t):
        ab = alpha_bar[t].view(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * x / (ab * data_var + 1 - ab)

    return model


def ddim_round_trip_error(steps):
    d = make_diffusion(steps=steps, schedule="cosine")
    model = gaussian_data_eps_model(d)
    x0 = fixed_x0() * 0.5
    x = x0
    for step in range(steps):  # the reverse ODE: x_0 -> x_T
        x = d.ddim_reverse_sample(model, x, th.full((SHAPE[0],), step), clip_denoised=False)["sample"]
    decoded = d.ddim_sample_loop(model, SHAPE, noise=x, clip_denoised=False)
    return (decoded - x0).abs().max().item()


def test_ddim_encode_decode_round_trip_converges():
    """Encoding with the reverse ODE and decoding recovers x0, with first-order error in 1/T."""
    coarse, fine = ddim_round_trip_error(200), ddim_round_trip_error(1000)
    assert coarse < 0.01 and fine < 0.002
    assert fine < coarse / 3


def test_ddim_reverse_refuses_eta():
    d = make_diffusion()
    with pytest.raises(ValueError, match="eta"):
        d.ddim_reverse_sample(smooth_eps_model, fixed_x0(), th.tensor([1, 1, 1]), eta=0.5)


def test_p_sample_draws_noise_before_cond_fn():
    """The original's random draw order: a seeded run must reproduce its samples."""
    d = make_diffusion(steps=50)
    x, t = fixed_x0(), th.full((SHAPE[0],), 20)
    model = lambda x, ts: 0.3 * x

    def cond_fn(x, ts):
        th.randn(100)  # consumes random numbers after the noise was drawn
        return th.ones_like(x)

    th.manual_seed(11)
    got = d.p_sample(model, x, t, cond_fn=cond_fn)["sample"]
    th.manual_seed(11)
    noise = th.randn_like(x)
    out = d.p_mean_variance(model, x, t)
    expected = out["mean"] + out["variance"] + th.exp(0.5 * out["log_variance"]) * noise
    th.testing.assert_close(got, expected)


def test_no_noise_on_the_last_step():
    d = make_diffusion(steps=50)
    x, t = fixed_x0(), th.tensor([0, 0, 0])
    a = d.p_sample(smooth_eps_model, x, t)["sample"]
    b = d.p_sample(smooth_eps_model, x, t)["sample"]
    th.testing.assert_close(a, b, rtol=0, atol=0)


def test_progress_bar(capsys):
    d = make_diffusion(steps=5, schedule="cosine")
    d.p_sample_loop(smooth_eps_model, SHAPE, progress=True)
    assert "5/5" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_plain_loop_is_the_last_step_of_the_progressive_one(sampler):
    """One loop behind both: with the same generator seed the plain loop returns the progressive one's last sample."""
    d = make_diffusion(steps=15, schedule="cosine")
    plain, progressive = {
        "ddpm": (d.p_sample_loop, d.p_sample_loop_progressive),
        "ddim": (d.ddim_sample_loop, d.ddim_sample_loop_progressive),
    }[sampler]
    extra = {"eta": 1.0} if sampler == "ddim" else {}  # eta = 1: DDIM draws noise at every step too
    final = plain(smooth_eps_model, SHAPE, generator=th.Generator().manual_seed(3), **extra)
    steps = list(progressive(smooth_eps_model, SHAPE, generator=th.Generator().manual_seed(3), **extra))
    assert len(steps) == 15
    th.testing.assert_close(final, steps[-1]["sample"], rtol=0, atol=0)
    # The flat functions of samplers.py are the same computation from the same x_T.
    flat = getattr(samplers, f"sample_{sampler}")
    gen = th.Generator().manual_seed(3)
    x_T = th.randn(SHAPE, generator=gen)
    th.testing.assert_close(flat(d, smooth_eps_model, x_T, generator=gen, **extra), final, rtol=0, atol=0)


# ---------------------------------------------------------------- guidance


def test_condition_mean_shifts_by_variance_times_gradient():
    d = make_diffusion(steps=100)
    x, t = fixed_x0(), th.tensor([3, 30, 90])
    out = d.p_mean_variance(smooth_eps_model, x, t)
    grad = fixed_x0(seed=9)
    new_mean = d.condition_mean(lambda x, ts: grad, out, x, t)
    th.testing.assert_close(new_mean - out["mean"], out["variance"] * grad)
    th.testing.assert_close(d.condition_mean(lambda x, ts: th.zeros_like(x), out, x, t), out["mean"])


def test_condition_score_shifts_eps_by_sqrt_one_minus_alpha_bar():
    d = make_diffusion(steps=100)
    x, t = fixed_x0(), th.tensor([3, 30, 90])
    out = d.p_mean_variance(smooth_eps_model, x, t, clip_denoised=False)
    grad = fixed_x0(seed=9)
    new = d.condition_score(lambda x, ts, **kw: grad, out, x, t)
    ab = th.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    coef1 = th.from_numpy(d.posterior_mean_coef1)[t].float().view(-1, 1, 1, 1)
    # x0 = (x - sqrt(1-ab) eps)/sqrt(ab), so eps -= sqrt(1-ab) g moves x0 by (1-ab)/sqrt(ab) g.
    dx0 = (1 - ab) / ab.sqrt() * grad
    th.testing.assert_close(new["pred_xstart"] - out["pred_xstart"], dx0, rtol=1e-4, atol=1e-4)
    th.testing.assert_close(new["mean"] - out["mean"], coef1 * dx0, rtol=1e-4, atol=1e-4)
    assert new["variance"] is out["variance"]  # the variance is untouched
    same = d.condition_score(lambda x, ts: th.zeros_like(x), out, x, t)
    th.testing.assert_close(same["mean"], out["mean"], rtol=1e-5, atol=1e-5)


def test_cond_fn_receives_model_kwargs_and_scaled_t():
    d = make_diffusion(steps=100, rescale_timesteps=True)
    seen = {}

    def cond_fn(x, ts, y=None):
        seen.update(ts=ts, y=y)
        return th.zeros_like(x)

    d.ddim_sample(
        lambda x, ts, y=None: x,
        fixed_x0(),
        th.tensor([10, 10, 10]),
        cond_fn=cond_fn,
        model_kwargs={"y": th.tensor([1, 2, 3])},
    )
    assert th.all(seen["ts"] == 100.0) and seen["y"].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("var_type", [ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE])
def test_mse_loss_vanishes_for_the_perfect_model(var_type):
    d = make_diffusion(steps=100, var=var_type)
    x0, t = fixed_x0(), th.tensor([0, 50, 99])
    terms = d.training_losses(PerfectEps(d, x0), x0, t)
    assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (SHAPE[0],)
    assert terms["loss"].max() < 1e-8
    assert d.training_losses(smooth_eps_model, x0, t)["loss"].min() > 1e-3


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_mse_targets(mean_type):
    d = make_diffusion(steps=100, mean=mean_type)
    x0, t, noise = fixed_x0(), th.tensor([1, 50, 99]), th.randn(SHAPE)
    xt = d.q_sample(x0, t, noise=noise)
    target = {
        ModelMeanType.EPSILON: noise,
        ModelMeanType.START_X: x0,
        ModelMeanType.PREVIOUS_X: d.q_posterior_mean_variance(x0, xt, t)[0],
    }[mean_type]
    terms = d.training_losses(lambda x, ts: target, x0, t, noise=noise)
    assert terms["mse"].max() < 1e-10


@pytest.mark.parametrize("loss_type", list(LossType))
def test_each_loss_type_has_its_keys(loss_type):
    d = make_diffusion(steps=100, var=ModelVarType.LEARNED_RANGE, loss=loss_type)
    model = lambda x, ts: th.cat([0.5 * x, th.zeros_like(x)], 1)
    terms = d.training_losses(model, fixed_x0(), th.tensor([0, 20, 99]))
    expected = {"loss"} if loss_type.is_vb() else {"loss", "mse", "vb"}
    assert set(terms) == expected
    assert th.isfinite(terms["loss"]).all() and (terms["loss"] > 0).all()
    if not loss_type.is_vb():
        th.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_rescaled_losses_scale_the_vb_term():
    kw = dict(steps=100, var=ModelVarType.LEARNED_RANGE)
    model = lambda x, ts: th.cat([0.5 * x, th.full_like(x, 0.2)], 1)
    x0, t, noise = fixed_x0(), th.tensor([0, 20, 99]), th.randn(SHAPE)
    plain = make_diffusion(loss=LossType.MSE, **kw).training_losses(model, x0, t, noise=noise)
    scaled = make_diffusion(loss=LossType.RESCALED_MSE, **kw).training_losses(model, x0, t, noise=noise)
    th.testing.assert_close(scaled["vb"], plain["vb"] * 100 / 1000)
    kl = make_diffusion(loss=LossType.KL, **kw).training_losses(model, x0, t, noise=noise)
    rkl = make_diffusion(loss=LossType.RESCALED_KL, **kw).training_losses(model, x0, t, noise=noise)
    th.testing.assert_close(rkl["loss"], kl["loss"] * 100)
    th.testing.assert_close(kl["loss"], plain["vb"])


def test_vb_term_does_not_train_the_mean():
    d = make_diffusion(steps=100, var=ModelVarType.LEARNED_RANGE)
    mean_w = th.tensor(0.5, requires_grad=True)
    var_w = th.tensor(0.1, requires_grad=True)
    model = lambda x, ts: th.cat([mean_w * x, var_w * th.ones_like(x)], 1)
    terms = d.training_losses(model, fixed_x0(), th.tensor([5, 50, 95]))
    terms["vb"].sum().backward()
    assert (mean_w.grad is None or mean_w.grad == 0) and var_w.grad.abs() > 0
    d.training_losses(model, fixed_x0(), th.tensor([5, 50, 95]))["mse"].sum().backward()
    assert mean_w.grad.abs() > 0


def numpy_decoder_nll_bits(x0, log_var):
    """-log2 of the Gaussian mass of each 1/255 bin around x0 itself (mean = x0), averaged."""
    std = math.exp(0.5 * log_var)
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    x = x0.double().numpy()
    upper = np.where(x > 0.999, 1.0, cdf((1 / 255) / std))
    lower = np.where(x < -0.999, 0.0, cdf(-(1 / 255) / std))
    return (-np.log(upper - lower) / np.log(2)).reshape(x.shape[0], -1).mean(1)


def test_calc_bpd_loop_for_the_perfect_model():
    d = make_diffusion(steps=40)
    x0 = th.round(fixed_x0() * 127.5) / 127.5  # on the 8-bit grid
    out = d.calc_bpd_loop(PerfectEps(d, x0), x0, clip_denoised=False)
    assert set(out) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    assert out["vb"].shape == (SHAPE[0], 40) and out["total_bpd"].shape == (SHAPE[0],)
    th.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1))
    # The exact posterior gives KL = 0 for t > 0; the decoder term (last column, t = 0) is the bin mass.
    assert out["vb"][:, :-1].abs().max() < 1e-3
    expected = numpy_decoder_nll_bits(x0, d.posterior_log_variance_clipped[0])
    np.testing.assert_allclose(out["vb"][:, -1].numpy(), expected, rtol=1e-4)
    assert out["mse"].max() < 1e-4 and out["xstart_mse"].max() < 1e-6


def test_prior_bpd_closed_form():
    d = make_diffusion(steps=40)
    x0 = fixed_x0()
    ab = d.alphas_cumprod[-1]
    # KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) = 0.5 (-1 - log(1-ab) + (1-ab) + ab x0^2)
    kl = 0.5 * (-1 - np.log(1 - ab) + (1 - ab) + ab * x0.double().numpy() ** 2)
    expected = kl.reshape(SHAPE[0], -1).mean(1) / np.log(2)
    np.testing.assert_allclose(d._prior_bpd(x0).numpy(), expected, rtol=1e-4)


def test_calc_bpd_loop_is_finite_for_an_imperfect_model():
    d = make_diffusion(steps=20, schedule="cosine", var=ModelVarType.LEARNED_RANGE)
    model = lambda x, ts: th.cat([0.5 * x, th.zeros_like(x)], 1)
    out = d.calc_bpd_loop(model, fixed_x0())
    assert all(th.isfinite(v).all() for v in out.values())
    th.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1))


def test_per_sample_generators_make_samples_independent_of_the_batch():
    """Row i's noise comes from generator i only, so a sample is the same alone or in any batch."""
    d = make_diffusion(steps=20, schedule="cosine")
    model = lambda x, t: 0.5 * x
    gens = lambda seeds: [th.Generator().manual_seed(s) for s in seeds]
    for loop in (d.p_sample_loop, lambda *a, **k: d.ddim_sample_loop(*a, eta=1.0, **k)):
        together = loop(model, (3, 2, 4, 4), generator=gens([7, 8, 9]))
        alone = loop(model, (1, 2, 4, 4), generator=gens([8]))
        th.testing.assert_close(together[1:2], alone, rtol=1e-6, atol=1e-6)
        assert (together[0] - together[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        d.p_sample_loop(model, (2, 2, 4, 4), generator=gens([1, 2, 3]))


def test_a_single_generator_reproduces_and_none_uses_the_global_rng():
    d = make_diffusion(steps=10, schedule="cosine")
    model = lambda x, t: 0.5 * x
    a = d.p_sample_loop(model, SHAPE, generator=th.Generator().manual_seed(3))
    b = d.p_sample_loop(model, SHAPE, generator=th.Generator().manual_seed(3))
    th.testing.assert_close(a, b, rtol=0, atol=0)
    th.manual_seed(4)
    c = d.p_sample_loop(model, SHAPE)
    th.manual_seed(4)
    e = d.p_sample_loop(model, SHAPE)
    th.testing.assert_close(c, e, rtol=0, atol=0)
