"""Classifier-free guidance: label dropout, the guided mix, layouts, and the scripts end to end."""

import argparse
import inspect
import math
import os
import sys

import numpy as np
import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.cfg import drop_labels, guided_model, has_null_class, label_dropout
from guided_diffusion.checkpoints import CheckpointMismatchError, load_model_state
from guided_diffusion.layout_flags import suggest_flags
from guided_diffusion.sampling import generate, model_fn_from_flags

sys.path.insert(0, os.path.dirname(__file__))
from test_sample_scripts import COND, args, load_npz, run, save_random_model  # noqa: E402


def test_label_dropout_rate_is_p_within_a_binomial_bound():
    n, p = 20000, 0.15
    th.manual_seed(0)
    y = drop_labels(th.randint(0, 10, (n,)), p, null_label=10)
    dropped = int((y == 10).sum())
    assert abs(dropped - n * p) < 4 * math.sqrt(n * p * (1 - p))  # 4 standard deviations
    assert set(y.tolist()) <= set(range(11))


def test_no_dropout_changes_no_label():
    y = th.arange(10)
    assert drop_labels(y, 0.0, null_label=10) is y
    batches = list(label_dropout(iter([(th.zeros(3), {"y": th.tensor([1, 2, 3])})]), 0.0, null_label=4))
    assert batches[0][1]["y"].tolist() == [1, 2, 3]


def test_p_zero_keeps_the_original_layout_and_p_above_zero_adds_one_null_class():
    flags = {**su.model_and_diffusion_defaults(), **dict(COND)}
    with th.device("meta"):
        plain = su.create_from_flags("diffusion", flags)[0]
        # the factory called as the original's code calls it, without p_uncond
        original_args = [k for k in inspect.signature(su.create_model).parameters if k != "p_uncond"]
        reference = su.create_model(**{k: flags[k] for k in original_args})
        nulled = su.create_from_flags("diffusion", {**flags, "p_uncond": 0.1})[0]
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    assert plain.label_emb.num_embeddings == 3 and nulled.label_emb.num_embeddings == 4
    assert has_null_class(nulled, 3) and not has_null_class(plain, 3)
    with pytest.raises(ValueError, match="--class_cond True"):
        su.create_from_flags("diffusion", {**flags, "class_cond": False, "p_uncond": 0.1})


def test_a_null_class_checkpoint_is_recognised_by_its_layout():
    flags = {**su.model_and_diffusion_defaults(), **dict(COND)}
    state = su.create_from_flags("diffusion", {**flags, "p_uncond": 0.2})[0].state_dict()
    model = su.create_from_flags("diffusion", flags)[0]
    with pytest.raises(CheckpointMismatchError, match="--p_uncond 0.1"):
        load_model_state(
            model,
            state,
            source="cfg.pt",
            flags=flags,
            build=lambda **f: su.create_from_flags("diffusion", f)[0],
            suggest=suggest_flags,
        )
    load_model_state(su.create_from_flags("diffusion", {**flags, "p_uncond": 0.5})[0], state, source="cfg.pt")


class LabelNet(th.nn.Module):
    """eps = x * (1 + y) / 10 on the mean channels, and variance channels = y; null label 3 -> 0.7 x."""

    def forward(self, x, t, y=None, low_res=None):
        scale = th.where(y == 3, th.full_like(y, 7), y + 1).float().view(-1, 1, 1, 1) / 10
        out = th.cat([x * scale, th.ones_like(x) * y.float().view(-1, 1, 1, 1)], dim=1)
        return out + (0 if low_res is None else low_res.mean())


def test_guided_eps_is_the_formula_and_keeps_the_conditional_variance():
    x, t, y = th.randn(4, 3, 2, 2), th.tensor([5, 6, 7, 8]), th.tensor([0, 1, 2, 0])
    w = 2.5
    out = guided_model(LabelNet(), w, null_label=3)(x, t, y=y)
    cond, uncond = LabelNet()(x, t, y), LabelNet()(x, t, th.full_like(y, 3))
    assert th.allclose(out[:, :3], (1 + w) * cond[:, :3] - w * uncond[:, :3])
    assert th.equal(out[:, 3:], cond[:, 3:])  # learned variance of the conditional pass
    low_res = th.randn(4, 3, 1, 1)
    with_low_res = guided_model(LabelNet(), w, null_label=3)(x, t, y=y, low_res=low_res)
    assert th.allclose(with_low_res, out + low_res.mean())  # batch kwargs go to both passes


def _sample(model_fn, seed=3):
    diffusion = su.create_gaussian_diffusion(
        steps=50, learn_sigma=True, noise_schedule="cosine", timestep_respacing="6"
    )
    kwargs_for = lambda indices: {"y": th.tensor([i % 3 for i in indices])}
    return generate(
        diffusion,
        model_fn,
        num_samples=4,
        batch_size=4,
        image_shape=(3, 2, 2),
        kwargs_for=kwargs_for,
        seed=seed,
        progress=False,
    )[0]


def test_scale_zero_is_plain_conditional_sampling():
    net = LabelNet()
    assert np.array_equal(_sample(guided_model(net, 0.0, null_label=3)), _sample(net))


def test_any_scale_changes_nothing_when_conditional_and_unconditional_agree():
    same = lambda x, t, y=None: th.cat([0.3 * x, th.zeros_like(x)], dim=1)
    for w in (1.0, 4.0):
        assert np.array_equal(_sample(guided_model(same, w, null_label=3)), _sample(same))


def test_model_without_a_null_class_is_a_clear_error():
    model = su.create_from_flags("diffusion", {**su.model_and_diffusion_defaults(), **dict(COND)})[0]
    flags = argparse.Namespace(class_cond=True, num_classes=3, cfg_scale=2.0)
    with pytest.raises(ValueError, match="--p_uncond 0.1"):
        model_fn_from_flags(model, flags)


@pytest.fixture(scope="module")
def cfg_model(tmp_path_factory):
    return save_random_model("diffusion", {**COND, "p_uncond": 0.2}, tmp_path_factory.mktemp("cfg") / "cfg.pt")


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_image_sample_with_classifier_free_guidance(cfg_model, tmp_path, sampler):
    common = dict(model_path=cfg_model, p_uncond=0.2, num_samples=3, batch_size=3, timestep_respacing=4, seed=2)
    if sampler != "ddpm":
        common.update(sampler=sampler, sampling_steps=4, timestep_respacing="")
    run("image_sample.py", args(COND, cfg_scale=3.0, **common), tmp_path / "w3")
    run("image_sample.py", args(COND, cfg_scale=0.0, **common), tmp_path / "w0")
    w3, w0 = load_npz(tmp_path / "w3", 3), load_npz(tmp_path / "w0", 3)
    assert not np.array_equal(w3["arr_0"], w0["arr_0"]) and np.array_equal(w3["arr_1"], w0["arr_1"])


def test_classifier_free_and_classifier_guidance_together(cfg_model, tmp_path):
    from test_sample_scripts import CLASSIFIER

    clf = save_random_model("classifier", CLASSIFIER, tmp_path / "clf.pt")
    run(
        "classifier_sample.py",
        args(
            {**COND, **CLASSIFIER},
            model_path=cfg_model,
            p_uncond=0.2,
            cfg_scale=2.0,
            classifier_path=clf,
            classifier_scale=1.0,
            num_samples=2,
            batch_size=2,
            timestep_respacing=3,
            seed=1,
        ),
        tmp_path,
    )
    assert load_npz(tmp_path, 2)["arr_0"].shape == (2, 16, 16, 3)


def test_sampling_a_plain_model_with_cfg_fails_clearly(tmp_path):
    plain = save_random_model("diffusion", COND, tmp_path / "plain.pt")
    result = run(
        "image_sample.py",
        args(COND, model_path=plain, cfg_scale=2.0, num_samples=1, timestep_respacing=2),
        tmp_path / "out",
        check=False,
    )
    assert result.returncode != 0 and "--p_uncond 0.1" in result.stderr


def test_training_with_label_dropout_saves_and_loads(tmp_path):
    flags = dict(COND, num_classes=4, p_uncond=0.3)
    result = run(
        "image_train.py", args(flags, batch_size=4, lr_anneal_steps=2, save_interval=2, seed=0), tmp_path / "train"
    )
    assert "label dropout for classifier-free guidance: p_uncond 0.3, null class 4" in result.stdout
    state = th.load(tmp_path / "train" / "model000002.pt", weights_only=True)
    assert state["label_emb.weight"].shape[0] == 5
    run(
        "image_sample.py",
        args(
            flags,
            model_path=tmp_path / "train" / "model000002.pt",
            cfg_scale=1.0,
            num_samples=2,
            batch_size=2,
            timestep_respacing=2,
        ),
        tmp_path / "sample",
    )


def test_mpiexec_sampling_with_cfg(cfg_model, tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py, mpich) is not installed")
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.path.exists(beside) else "mpiexec"
    common = dict(
        model_path=cfg_model, p_uncond=0.2, cfg_scale=2.0, num_samples=3, batch_size=1, timestep_respacing=3, seed=5
    )
    run("image_sample.py", args(COND, **common), tmp_path / "two", launcher=(mpiexec, "-n", "2"))
    run("image_sample.py", args(COND, **common), tmp_path / "one")
    assert np.array_equal(load_npz(tmp_path / "two", 3)["arr_0"], load_npz(tmp_path / "one", 3)["arr_0"])
