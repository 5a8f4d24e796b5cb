"""The sampling scripts and the main job, run as a user would, on tiny models saved here."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import script_util as su

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

UNCOND = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    diffusion_steps=50,
    noise_schedule="cosine",
)
COND = dict(UNCOND, class_cond=True, num_classes=3, learn_sigma=True)
CLASSIFIER = dict(
    image_size=16,
    classifier_width=64,
    classifier_depth=1,
    classifier_attention_resolutions="8",
    num_classes=3,
    diffusion_steps=50,
    noise_schedule="cosine",
)
SUPER_RES = dict(
    large_size=16,
    small_size=8,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    diffusion_steps=50,
    noise_schedule="cosine",
    class_cond=True,
    num_classes=3,
)


def args(flags, **more):
    return [x for k, v in {**flags, **more}.items() for x in (f"--{k}", str(v))]


def save_random_model(kind, flags, path):
    """A model of that kind with every weight random (the zero-initialised layers too), saved as a state dict."""
    th.manual_seed(0)
    model, _ = su.create_from_flags(kind, {**su.MODEL_KINDS[kind][0](), **flags})
    with th.no_grad():
        for p in model.parameters():
            p.copy_(th.randn_like(p) * 0.05)
    th.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "uncond": save_random_model("diffusion", UNCOND, d / "uncond.pt"),
        "cond": save_random_model("diffusion", COND, d / "cond.pt"),
        "classifier": save_random_model("classifier", CLASSIFIER, d / "classifier.pt"),
        "super_res": save_random_model("super_res", SUPER_RES, d / "sr.pt"),
    }


def run(script, argv, log_dir, launcher=(), check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = list(launcher) + [sys.executable, os.path.join(SCRIPTS, script)] + argv + ["--log_dir", str(log_dir)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load_npz(log_dir, n, size=16):
    path = os.path.join(log_dir, f"samples_{n}x{size}x{size}x3.npz")
    assert os.path.exists(path[:-4] + ".png")  # the grid beside it
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_image_sample_ddpm_unconditional(models, tmp_path):
    result = run(
        "image_sample.py",
        args(UNCOND, model_path=models["uncond"], num_samples=5, batch_size=2, timestep_respacing=10),
        tmp_path,
    )
    out = load_npz(tmp_path, 5)
    assert set(out) == {"arr_0"} and out["arr_0"].dtype == np.uint8 and out["arr_0"].shape == (5, 16, 16, 3)
    assert out["arr_0"].std() > 5  # not a constant image
    final = [line for line in result.stdout.splitlines() if line.strip()][-1]
    assert final.startswith("sampling complete") and str(tmp_path / "samples_5x16x16x3.npz") in final
    grid = np.array(Image.open(tmp_path / "samples_5x16x16x3.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)


def test_image_sample_ddim_class_conditional(models, tmp_path):
    run(
        "image_sample.py",
        args(
            COND,
            model_path=models["cond"],
            num_samples=6,
            batch_size=4,
            use_ddim=True,
            timestep_respacing="ddim10",
            seed=1,
        ),
        tmp_path,
    )
    out = load_npz(tmp_path, 6)
    assert out["arr_1"].dtype == np.int64 and out["arr_1"].shape == (6,) and set(out["arr_1"]) <= {0, 1, 2}


@pytest.mark.parametrize("model, use_ddim", [("cond", False), ("uncond", True)])
def test_classifier_sample(models, tmp_path, model, use_ddim):
    flags = {**(COND if model == "cond" else UNCOND), **CLASSIFIER}
    run(
        "classifier_sample.py",
        args(
            flags,
            model_path=models[model],
            classifier_path=models["classifier"],
            classifier_scale=4.0,
            num_samples=4,
            batch_size=4,
            use_ddim=use_ddim,
            timestep_respacing=10,
            seed=2,
        ),
        tmp_path,
    )
    out = load_npz(tmp_path, 4)
    assert out["arr_0"].shape == (4, 16, 16, 3) and out["arr_1"].dtype == np.int64


def test_a_seed_gives_the_same_images_for_any_batch_size(models, tmp_path):
    common = dict(model_path=models["cond"], num_samples=5, timestep_respacing=10, seed=7)
    outs = []
    for i, batch_size in enumerate((5, 5, 2)):
        run("image_sample.py", args(COND, batch_size=batch_size, **common), tmp_path / str(i))
        outs.append(load_npz(tmp_path / str(i), 5))
    for out in outs[1:]:
        assert np.array_equal(out["arr_0"], outs[0]["arr_0"]) and np.array_equal(out["arr_1"], outs[0]["arr_1"])


@pytest.mark.parametrize("model", ["cond", "uncond"])
def test_classifier_scale_zero_reproduces_unguided_sampling(models, tmp_path, model):
    flags = {**(COND if model == "cond" else UNCOND), **CLASSIFIER}
    common = dict(model_path=models[model], num_samples=4, batch_size=4, timestep_respacing=10, seed=3)
    run(
        "classifier_sample.py",
        args(flags, classifier_path=models["classifier"], classifier_scale=0.0, **common),
        tmp_path / "guided",
    )
    run("image_sample.py", args(COND if model == "cond" else UNCOND, **common), tmp_path / "plain")
    assert np.array_equal(load_npz(tmp_path / "guided", 4)["arr_0"], load_npz(tmp_path / "plain", 4)["arr_0"])


def test_super_res_sample_consumes_image_sample_output(models, tmp_path):
    small = {**COND, "image_size": 8, "attention_resolutions": "4", "channel_mult": "1,2"}
    base_model = save_random_model("diffusion", small, tmp_path / "small.pt")
    run(
        "image_sample.py",
        args(small, model_path=base_model, num_samples=3, batch_size=3, timestep_respacing=5),
        tmp_path / "base",
    )
    base = tmp_path / "base" / "samples_3x8x8x3.npz"
    run(
        "super_res_sample.py",
        args(
            SUPER_RES,
            model_path=models["super_res"],
            base_samples=base,
            num_samples=3,
            batch_size=2,
            timestep_respacing=5,
        ),
        tmp_path / "sr",
    )
    out = load_npz(tmp_path / "sr", 3)
    assert out["arr_0"].shape == (3, 16, 16, 3)
    with np.load(base) as f:
        assert np.array_equal(out["arr_1"], f["arr_1"])  # each upsample keeps its base image's class
    wrong = run(
        "super_res_sample.py",
        args({**SUPER_RES, "small_size": 4}, model_path=models["super_res"], base_samples=base, num_samples=3),
        tmp_path / "bad",
        check=False,
    )
    assert wrong.returncode != 0 and "--small_size 4" in wrong.stderr


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m_sde", "dpm++3m"])
def test_scripts_run_with_the_fast_samplers(models, tmp_path, sampler):
    # Guided (learned variances, class-conditional) and unguided; seeded runs repeat exactly at another batch size
    flags = {**COND, **CLASSIFIER}
    common = dict(
        model_path=models["cond"],
        classifier_path=models["classifier"],
        classifier_scale=2.0,
        num_samples=3,
        sampler=sampler,
        sampling_steps=4,
        seed=5,
    )
    result = run("classifier_sample.py", args(flags, batch_size=3, **common), tmp_path / "a")
    assert f"{sampler}, 4 model evaluations" in result.stdout
    run("classifier_sample.py", args(flags, batch_size=2, **common), tmp_path / "b")
    a, b = load_npz(tmp_path / "a", 3), load_npz(tmp_path / "b", 3)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].std() > 5
    run(
        "image_sample.py",
        args(
            UNCOND,
            model_path=models["uncond"],
            num_samples=2,
            batch_size=2,
            sampler=sampler,
            sampling_steps=3,
            step_schedule="time",
            dynamic_threshold=0.99,
        ),
        tmp_path / "c",
    )
    assert load_npz(tmp_path / "c", 2)["arr_0"].shape == (2, 16, 16, 3)


def test_fast_sampler_with_guidance_in_fp16(models, tmp_path):
    flags = {**COND, **CLASSIFIER, "use_fp16": True, "classifier_use_fp16": True}
    run(
        "classifier_sample.py",
        args(
            flags,
            model_path=models["cond"],
            classifier_path=models["classifier"],
            classifier_scale=2.0,
            num_samples=2,
            batch_size=2,
            sampler="dpm++2m_sde",
            sampling_steps=3,
            seed=1,
        ),
        tmp_path,
    )
    out = load_npz(tmp_path, 2)
    assert out["arr_0"].std() > 5 and out["arr_1"].shape == (2,)


def test_super_res_sample_with_a_fast_sampler(models, tmp_path):
    base = tmp_path / "base.npz"
    rng = np.random.default_rng(0)
    np.savez(base, rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), np.array([0, 2]))
    run(
        "super_res_sample.py",
        args(
            SUPER_RES,
            model_path=models["super_res"],
            base_samples=base,
            num_samples=2,
            batch_size=2,
            sampler="dpm++2m",
            sampling_steps=3,
        ),
        tmp_path / "sr",
    )
    assert load_npz(tmp_path / "sr", 2)["arr_1"].tolist() == [0, 2]


def test_sampler_flag_selects_the_originals_samplers(models, tmp_path):
    common = dict(model_path=models["cond"], num_samples=2, batch_size=2, seed=4)
    run("image_sample.py", args(COND, use_ddim=True, timestep_respacing="ddim10", **common), tmp_path / "orig")
    run("image_sample.py", args(COND, sampler="ddim", sampling_steps=10, **common), tmp_path / "new")
    # "10" and "ddim10" keep different timesteps, so compare against the same respacing given both ways
    run("image_sample.py", args(COND, sampler="ddim", timestep_respacing="ddim10", **common), tmp_path / "named")
    assert np.array_equal(load_npz(tmp_path / "orig", 2)["arr_0"], load_npz(tmp_path / "named", 2)["arr_0"])
    assert load_npz(tmp_path / "new", 2)["arr_0"].shape == (2, 16, 16, 3)
    clash = run("image_sample.py", args(COND, sampler="ddpm", use_ddim=True, **common), tmp_path / "bad", check=False)
    assert clash.returncode != 0 and "--use_ddim True contradicts --sampler ddpm" in clash.stderr


def test_image_nll_gives_finite_bits_per_dim_close_to_calc_bpd_loop(models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(4):
        half = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
        img = np.concatenate([half, half[:, ::-1]], axis=1)  # mirror-symmetric: random flips change nothing
        Image.fromarray(img).save(data / f"img_{i}.png")
        images.append(img)
    result = run(
        "image_nll.py",
        args(UNCOND, model_path=models["uncond"], data_dir=data, num_samples=4, batch_size=2, seed=0),
        tmp_path / "nll",
    )
    reported = float(result.stdout.split("evaluation complete: ")[1].split(" bits/dim")[0])
    with np.load(tmp_path / "nll" / "vb_terms.npz") as f:
        assert f["arr_0"].shape == (50,) and np.isfinite(f["arr_0"]).all()
    model, diffusion = su.create_from_flags("diffusion", {**su.model_and_diffusion_defaults(), **UNCOND})
    model.load_state_dict(th.load(models["uncond"], weights_only=True))
    x = th.from_numpy(np.stack(images)).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    th.manual_seed(1)
    with th.no_grad():
        direct = diffusion.calc_bpd_loop(model, x, clip_denoised=True)["total_bpd"].mean().item()
    assert np.isfinite(reported) and reported == pytest.approx(direct, rel=0.05)


def test_mpiexec_sampling_saves_exactly_num_samples(models, tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py, mpich) is not installed")
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.path.exists(beside) else "mpiexec"
    common = dict(model_path=models["cond"], num_samples=5, batch_size=2, timestep_respacing=5, seed=11)
    run("image_sample.py", args(COND, **common), tmp_path / "two", launcher=(mpiexec, "-n", "2"))
    run("image_sample.py", args(COND, **common), tmp_path / "one")
    two, one = load_npz(tmp_path / "two", 5), load_npz(tmp_path / "one", 5)
    assert len({img.tobytes() for img in two["arr_0"]}) == 5  # the ranks made different samples
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["arr_1"], one["arr_1"])


def test_bad_inputs_fail_clearly(models, tmp_path):
    missing = run("image_sample.py", args(UNCOND, num_samples=1), tmp_path / "a", check=False)
    assert missing.returncode != 0 and "--model_path is required" in missing.stderr
    mismatch = run(
        "image_sample.py", args(UNCOND, model_path=models["cond"], num_samples=1), tmp_path / "b", check=False
    )
    assert (
        mismatch.returncode != 0 and "--class_cond True" in mismatch.stderr and "--learn_sigma True" in mismatch.stderr
    )


def test_main_job_runs_in_its_quick_form(tmp_path):
    env = {**os.environ, "GUIDED_DIFFUSION_DATA": str(tmp_path / "data_cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "toy_guidance.py"), "--quick", "--out_dir", str(tmp_path / "job")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "judged as target class" in result.stdout and "scale 10" in result.stdout
    assert all(column in result.stdout for column in ("FID", "precision", "recall"))
    for name in ("grid_scale0.png", "grid_scale10.png", "table.txt", "results.json"):
        assert (tmp_path / "job" / name).exists()


def test_main_job_cfg_mode_runs_in_its_quick_form(tmp_path):
    env = {**os.environ, "GUIDED_DIFFUSION_DATA": str(tmp_path / "data_cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(SCRIPTS, "toy_guidance.py"),
            "--quick",
            "--mode",
            "cfg",
            "--out_dir",
            str(tmp_path / "job"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "classifier-free guidance" in result.stdout and "w 3" in result.stdout and "FID" in result.stdout
    assert not (tmp_path / "job" / "classifier").exists()  # no noisy classifier in this mode
    for name in ("grid_w0.png", "grid_w3.png", "table.txt", "results.json"):
        assert (tmp_path / "job" / name).exists()
