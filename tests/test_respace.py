"""Timestep respacing: the original's documented examples and SpacedDiffusion invariants."""

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


def diffusion_kwargs(steps=100, rescale_timesteps=False, var=ModelVarType.FIXED_SMALL):
    return dict(
        betas=get_named_beta_schedule("linear", steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=var,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale_timesteps,
    )


def test_sections_of_300_steps():
    """300 steps with [10, 15, 20]: 10 of 0..99, 15 of 100..199, 20 of 200..299, ends included."""
    steps = sorted(space_timesteps(300, [10, 15, 20]))
    assert len(steps) == 45
    first, second, third = steps[:10], steps[10:25], steps[25:]
    assert first == [round(i * 99 / 9) for i in range(10)] == list(range(0, 100, 11))
    # The stride is accumulated in floats, as the original: 7 strides of 99/14 add up to
    # 49.4999..., not 49.5, so the 8th kept step is 149 where i * stride would round to 150.
    assert second == [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
    assert third == [200 + round(i * 99 / 19) for i in range(20)]
    assert (first[-1], second[-1], third[-1]) == (99, 199, 299)
    assert space_timesteps(300, "10,15,20") == set(steps)


def test_uneven_sections_give_the_extra_steps_to_the_first_ones():
    # 10 steps in 3 sections: sizes 4, 3, 3.
    assert sorted(space_timesteps(10, [2, 2, 2])) == [0, 3, 4, 6, 7, 9]


def test_ddim_strides():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))


def test_plain_count_keeps_both_ends():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert space_timesteps(1000, "1000") == set(range(1000))


@pytest.mark.parametrize(
    "spec, match", [("ddim43", "exactly 43 steps out of 1000"), ("2000", "2000"), ("ten", "timestep_respacing")]
)
def test_impossible_respacing_is_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(1000, spec)


def test_keeping_every_step_changes_nothing():
    kw = diffusion_kwargs(var=ModelVarType.LEARNED_RANGE)
    base, spaced = GaussianDiffusion(**kw), SpacedDiffusion(range(100), **kw)
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-9)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod, rtol=1e-12)
    model = lambda x, t: th.cat([0.3 * x + t.view(-1, 1, 1, 1) * 1e-3, th.zeros_like(x)], 1)
    x, t = th.randn(4, 3, 5, 5), th.tensor([0, 10, 50, 99])
    a, b = base.p_mean_variance(model, x, t), spaced.p_mean_variance(model, x, t)
    for k in a:
        th.testing.assert_close(a[k], b[k])
    noise = th.randn_like(x)
    la = base.training_losses(model, x.clamp(-1, 1), t, noise=noise)
    lb = spaced.training_losses(model, x.clamp(-1, 1), t, noise=noise)
    th.testing.assert_close(la["loss"], lb["loss"])


def test_respaced_process_keeps_the_marginals():
    kw = diffusion_kwargs(steps=1000)
    use = space_timesteps(1000, "ddim50")
    spaced = SpacedDiffusion(use, **kw)
    base = GaussianDiffusion(**kw)
    assert spaced.num_timesteps == 50 and spaced.original_num_steps == 1000
    assert spaced.timestep_map == sorted(use)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[sorted(use)], rtol=1e-10)


@pytest.mark.parametrize("rescale", [False, True])
def test_wrapped_model_receives_original_timesteps(rescale):
    spaced = SpacedDiffusion(space_timesteps(100, "10"), **diffusion_kwargs(rescale_timesteps=rescale))
    seen = []
    guided = []

    def model(x, t):
        seen.append(t[0].item())
        return 0.1 * x

    def cond_fn(x, t):
        guided.append(t[0].item())
        return th.zeros_like(x)

    spaced.p_sample_loop(model, (2, 1, 3, 3), cond_fn=cond_fn)
    kept = sorted(space_timesteps(100, "10"), reverse=True)
    expected = [k * 1000 / 100 for k in kept] if rescale else kept
    assert seen == pytest.approx(expected) and guided == pytest.approx(expected)
    guided.clear()
    spaced.ddim_sample_loop(model, (2, 1, 3, 3), cond_fn=cond_fn)
    assert guided == pytest.approx(expected)


def test_spaced_perfect_denoiser_returns_x0():
    kw = diffusion_kwargs(steps=1000)
    base = GaussianDiffusion(**kw)
    spaced = SpacedDiffusion(space_timesteps(1000, "25"), **kw)
    x0 = th.rand(2, 3, 4, 4) * 1.6 - 0.8
    ab = th.from_numpy(base.alphas_cumprod)

    def perfect(x, t):  # receives original timesteps thanks to the wrapper
        a = ab[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    for sample in (spaced.p_sample_loop(perfect, x0.shape), spaced.ddim_sample_loop(perfect, x0.shape)):
        np.testing.assert_allclose(sample.numpy(), x0.numpy(), atol=1e-4)
