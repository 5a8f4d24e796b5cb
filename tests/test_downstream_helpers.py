"""The original's private helpers that downstream projects call (DESIGN.md asks to keep them).

They are not public API, so tests/test_api.py does not pin their signatures; these tests check
that they still exist and compute what their names promise.
"""

import numpy as np
import torch as th

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
    get_named_beta_schedule,
)


def make_diffusion(rescale_timesteps=False):
    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 100),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale_timesteps,
    )


def test_extract_into_tensor_picks_per_sample_values_and_broadcasts():
    arr = np.arange(10, dtype=np.float64) * 0.5
    out = _extract_into_tensor(arr, th.tensor([0, 3, 9]), (3, 2, 4, 4))  # (N, C, H, W)
    assert out.shape == (3, 2, 4, 4) and out.dtype == th.float32
    assert out[:, 0, 0, 0].tolist() == [0.0, 1.5, 4.5]


def test_eps_and_xstart_predictions_invert_each_other():
    diffusion = make_diffusion()
    x_start, noise = th.randn(4, 3, 8, 8, generator=th.Generator().manual_seed(0)).chunk(2)
    t = th.tensor([5, 80])
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    # q_sample is x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (Ho et al. 2020, Eq. 4), so each helper inverts it.
    assert th.allclose(diffusion._predict_xstart_from_eps(x_t, t, noise), x_start, atol=1e-4)
    assert th.allclose(diffusion._predict_eps_from_xstart(x_t, t, x_start), noise, atol=1e-3)


def test_scale_timesteps_maps_onto_1000_steps_only_when_asked():
    t = th.tensor([0, 50, 99])
    assert th.equal(make_diffusion()._scale_timesteps(t), t)
    assert make_diffusion(rescale_timesteps=True)._scale_timesteps(t).tolist() == [0.0, 500.0, 990.0]


def test_prior_bpd_is_small_for_data_the_forward_process_destroys():
    diffusion = GaussianDiffusion(
        betas=get_named_beta_schedule("cosine", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )
    prior = diffusion._prior_bpd(th.zeros(2, 3, 4, 4))
    assert prior.shape == (2,) and (prior >= 0).all() and (prior < 1e-3).all()


def test_vb_terms_bpd_returns_the_original_keys():
    diffusion = make_diffusion()
    x_start = th.rand(2, 3, 4, 4) * 2 - 1
    t = th.tensor([0, 50])
    x_t = diffusion.q_sample(x_start, t)
    out = diffusion._vb_terms_bpd(lambda x, ts: th.zeros_like(x), x_start, x_t, t)
    assert set(out) == {"output", "pred_xstart"} and out["output"].shape == (2,)
