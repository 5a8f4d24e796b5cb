"""Sampling helpers: guidance, per-sample randomness, batching over ranks, outputs."""

import argparse
import os

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import logger
from guided_diffusion import script_util as su
from guided_diffusion.evaluation import run_bpd_evaluation, save_bpd_terms
from guided_diffusion.sampling import (
    classifier_cond_fn,
    draw_labels,
    finish_sampling,
    generate,
    rank_batches,
    resolve_sampler,
    sample_generators,
    sample_loop,
    save_samples,
)


class BrightnessClassifier(th.nn.Module):
    """Two classes: 0 = bright images, 1 = dark images, with confidence growing with |mean pixel|."""

    def forward(self, x, t):
        m = x.mean(dim=(1, 2, 3))
        return th.stack([8 * m, -8 * m], dim=1)


def smooth_model(x, t, y=None):
    return 0.3 * x


def test_cond_fn_is_the_scaled_gradient_of_the_log_probability():
    x, t, y = th.randn(3, 3, 4, 4), th.tensor([1, 2, 3]), th.tensor([0, 1, 0])
    grad = classifier_cond_fn(BrightnessClassifier(), 2.5)(x, t, y=y)
    x_ref = x.clone().requires_grad_(True)
    logp = th.log_softmax(BrightnessClassifier()(x_ref, t), dim=-1)[th.arange(3), y].sum()
    th.testing.assert_close(grad, 2.5 * th.autograd.grad(logp, x_ref)[0])
    assert th.all(classifier_cond_fn(BrightnessClassifier(), 0.0)(x, t, y=y) == 0)


def test_strong_guidance_moves_samples_towards_the_preferred_class():
    diffusion = su.create_gaussian_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="25")
    shape = (16, 3, 8, 8)
    means = {}
    for name, target, scale in [("unguided", 0, 0.0), ("bright", 0, 10.0), ("dark", 1, 10.0)]:
        gens = [th.Generator().manual_seed(i) for i in range(16)]
        cond_fn = classifier_cond_fn(BrightnessClassifier(), scale) if scale else None
        x = diffusion.p_sample_loop(
            smooth_model, shape, cond_fn=cond_fn, generator=gens, model_kwargs={"y": th.full((16,), target)}
        )
        means[name] = x.mean().item()
    # Unguided the mean pixel is ~0 (+-0.01 for 16 samples); guidance shifts it by ~0.1 either way.
    assert means["bright"] > means["unguided"] + 0.05 and means["dark"] < means["unguided"] - 0.05


def test_sample_generators_are_per_index_and_reproducible():
    a = sample_generators(3, [0, 5], "cpu")
    b = sample_generators(3, [5], "cpu")
    assert th.equal(th.randn(4, generator=a[1]), th.randn(4, generator=b[0]))
    assert sample_generators(-1, [0], "cpu") is None
    labels = sample_generators(3, [5], "cpu", stream=1)
    assert not th.equal(th.randn(4, generator=labels[0]), th.randn(4, generator=sample_generators(3, [5], "cpu")[0]))


def test_draw_labels():
    assert draw_labels([0, 1, 2, 5], 0, 4, "cpu", balanced=True).tolist() == [0, 1, 2, 1]
    together = draw_labels(list(range(10)), 7, 4, "cpu")
    apart = th.cat([draw_labels([i], 7, 4, "cpu") for i in range(10)])
    assert th.equal(together, apart) and together.dtype == th.long and together.max() < 4
    assert draw_labels([], 7, 4, "cpu").shape == (0,)


def test_rank_batches_cover_every_index_once():
    for num, batch, world in [(10, 3, 1), (10, 3, 2), (7, 4, 3), (1, 5, 2)]:
        per_rank = [list(rank_batches(num, batch, r, world)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of rounds
        seen = [i for rounds in zip(*per_rank) for block in rounds for i in block]
        assert seen == list(range(num))  # in order when gathered round by round, rank by rank


def test_generate_is_independent_of_the_batch_size():
    diffusion = su.create_gaussian_diffusion(steps=50, noise_schedule="cosine", timestep_respacing="5")
    kwargs_for = lambda indices: {"y": draw_labels(indices, 1, 4, "cpu")}
    runs = [
        generate(
            diffusion,
            smooth_model,
            num_samples=5,
            batch_size=b,
            image_shape=(3, 4, 4),
            kwargs_for=kwargs_for,
            seed=1,
            progress=False,
        )
        for b in (2, 5)
    ]
    assert runs[0][0].shape == (5, 4, 4, 3) and runs[0][0].dtype == np.uint8
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m_sde", "dpm++3m"])
def test_fast_samplers_are_independent_of_the_batch_size(sampler):
    diffusion = su.create_gaussian_diffusion(steps=50, noise_schedule="cosine")
    kwargs_for = lambda indices: {"y": draw_labels(indices, 1, 2, "cpu")}
    cond_fn = classifier_cond_fn(BrightnessClassifier(), 2.0)
    runs = [
        generate(
            diffusion,
            smooth_model,
            num_samples=5,
            batch_size=b,
            image_shape=(3, 4, 4),
            cond_fn=cond_fn,
            kwargs_for=kwargs_for,
            seed=seed,
            progress=False,
            sample_fn=sample_loop(diffusion, sampler, 6),
        )
        for b, seed in ((2, 1), (5, 1), (5, 2))
    ]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])  # another seed, other images


def _sampler_flags(**kw):
    return argparse.Namespace(**{**dict(sampler="", use_ddim=False, sampling_steps=0, timestep_respacing=""), **kw})


def test_resolve_sampler_keeps_the_originals_meaning():
    assert resolve_sampler(_sampler_flags()).sampler == "ddpm"
    assert resolve_sampler(_sampler_flags(use_ddim=True, timestep_respacing="ddim25")).sampler == "ddim"
    steps = resolve_sampler(_sampler_flags(sampler="ddim", sampling_steps=25))
    assert steps.timestep_respacing == "25"
    assert resolve_sampler(_sampler_flags(sampler="dpm++2m")).sampling_steps == 20
    diffusion = su.create_gaussian_diffusion(steps=100)
    assert sample_loop(diffusion, "ddpm") == diffusion.p_sample_loop
    assert sample_loop(diffusion, "ddim") == diffusion.ddim_sample_loop


@pytest.mark.parametrize(
    "flags,message",
    [
        (dict(sampler="euler"), "'euler' is not one of ddpm, ddim"),
        (dict(sampler="dpm++2m", use_ddim=True), "--use_ddim True contradicts"),
        (dict(sampler="ddpm", sampling_steps=10, timestep_respacing="250"), "give one of them"),
        (dict(sampling_steps=-1), "must be positive"),
    ],
)
def test_resolve_sampler_rejects_contradictions(flags, message):
    with pytest.raises(ValueError, match=message):
        resolve_sampler(_sampler_flags(**flags))


def test_save_samples_writes_npz_and_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    path = save_samples(images, np.arange(5), out_dir=str(tmp_path))
    assert path.endswith("samples_5x6x6x3.npz")
    with np.load(path) as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].dtype == np.int64
    grid = np.array(Image.open(tmp_path / "samples_5x6x6x3.png"))
    assert grid.shape == (2 + 2 * 8, 2 + 3 * 8, 3)
    assert np.array_equal(grid[2:8, 10:16], images[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples_5x6x6x3.npz", "samples_5x6x6x3.png"]


def test_finish_sampling_saves_the_label_names_and_logs_the_path(tmp_path):
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["log"]):
        path = finish_sampling(images, np.array([0, 1, 5]), class_names=["cat", "dog"])
    assert path == str(tmp_path / "samples_3x4x4x3.npz")
    with np.load(path) as f:
        assert f["label_names"].tolist() == ["cat", "dog", "class 5"]  # 5: past the map, e.g. the null class
    assert f"3 samples saved to {path}" in (tmp_path / "log.txt").read_text()


def test_bpd_evaluation_matches_calc_bpd_loop():
    diffusion = su.create_gaussian_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)
    model = lambda x, t: th.cat([0.2 * x, th.zeros_like(x)], 1)
    images = th.rand(4, 3, 4, 4) * 2 - 1

    def data():
        while True:
            yield images, {}

    th.manual_seed(0)
    means, bpd, prior = run_bpd_evaluation(model, diffusion, data(), num_samples=4, clip_denoised=True)
    th.manual_seed(0)
    direct = diffusion.calc_bpd_loop(model, images, clip_denoised=True)
    assert bpd == pytest.approx(direct["total_bpd"].mean().item(), rel=1e-5)
    assert prior == pytest.approx(direct["prior_bpd"].mean().item(), rel=1e-5)
    np.testing.assert_allclose(means["vb"], direct["vb"].mean(0).numpy(), rtol=1e-5)


def test_save_bpd_terms_writes_one_npz_per_term(tmp_path):
    means = {"vb": np.arange(3.0), "mse": np.ones(3)}
    paths = save_bpd_terms(means, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["mse_terms.npz", "vb_terms.npz"]
    with np.load(tmp_path / "vb_terms.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], means["vb"])
