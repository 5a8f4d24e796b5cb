"""Timestep samplers: uniform, and loss-second-moment importance sampling."""

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
from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler


def diffusion(steps=20):
    return GaussianDiffusion(
        betas=get_named_beta_schedule("cosine", steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )


def test_named_samplers():
    d = diffusion()
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(NotImplementedError, match="unknown schedule sampler"):
        create_named_schedule_sampler("bogus", d)


def test_uniform_sampler_has_unit_weights():
    t, w = UniformSampler(diffusion()).sample(1000, "cpu")
    assert t.dtype == th.int64 and t.min() >= 0 and t.max() < 20 and len(set(t.tolist())) == 20
    assert th.all(w == 1.0) and w.dtype == th.float32


def test_second_moment_sampler_warms_up_then_follows_sqrt_mean_square():
    d = diffusion()
    s = LossSecondMomentResampler(d, history_per_term=3, uniform_prob=0.01)
    losses = np.arange(1, 21, dtype=np.float64)  # L_t = t + 1
    for _ in range(3):
        np.testing.assert_array_equal(s.weights(), np.ones(20))  # not warmed up yet
        s.update_with_local_losses(th.arange(20), th.from_numpy(losses))
    expected = losses / losses.sum() * 0.99 + 0.01 / 20
    np.testing.assert_allclose(s.weights(), expected)
    # History is a rolling window: a 4th loss pushes the oldest out.
    s.update_with_all_losses([0], [7.0])
    assert list(s._loss_history[0]) == [1.0, 1.0, 7.0]


def test_importance_weights_undo_the_bias():
    s = LossSecondMomentResampler(diffusion(), history_per_term=1, uniform_prob=0.0)
    s.update_with_all_losses(list(range(20)), [1.0] * 10 + [3.0] * 10)
    np.random.seed(0)
    t, w = s.sample(20000, "cpu")
    p = s.weights() / s.weights().sum()
    th.testing.assert_close(w, th.from_numpy(1 / (20 * p[t.numpy()])).float())
    # E_p[w f(t)] = mean_t f(t) for any f: check with f(t) = t.
    assert (w * t.float()).mean().item() == pytest.approx(9.5, rel=0.03)
    assert (t >= 10).float().mean().item() == pytest.approx(0.75, abs=0.02)


def _gather_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    s = LossSecondMomentResampler(diffusion(), history_per_term=2)
    # Ranks see different batch sizes: 3 on rank 0, 5 on rank 1.
    ts = th.arange(3) if rank == 0 else th.arange(10, 15)
    s.update_with_local_losses(ts, ts.double() + 0.5)
    th.save({"history": th.from_numpy(s._loss_history), "counts": th.from_numpy(s._loss_counts)}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_loss_aware_update_gathers_all_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, tmp_path / "init", tmp_path / "out"), nprocs=2)
    states = [th.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(2)]
    for key in ("history", "counts"):
        th.testing.assert_close(states[0][key], states[1][key])
    seen = sorted(th.nonzero(states[0]["counts"]).flatten().tolist())
    assert seen == [0, 1, 2, 10, 11, 12, 13, 14]
    assert states[0]["history"][12, 0].item() == 12.5
