"""The three training scripts, run as a user would, on the built-in toy dataset with tiny models."""

import csv
import os
import subprocess
import sys

import pytest
import torch as th

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
# The default --log_interval (10) is longer than these runs: they log their first and last steps.
TINY_UNET = [
    "--num_channels",
    "32",
    "--num_res_blocks",
    "1",
    "--diffusion_steps",
    "50",
    "--batch_size",
    "4",
    "--save_interval",
    "2",
]


@pytest.fixture
def env(tmp_path):
    """Toy data cached under tmp_path, one thread per process."""
    return {**os.environ, "GUIDED_DIFFUSION_DATA": str(tmp_path / "data_cache"), "OMP_NUM_THREADS": "1"}


def run(script, args, env):
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, script)] + args, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def checkpoint_names(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".pt"))


def logged_steps_and_losses(log_dir):
    with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
        return [(row["step"], float(row["loss"])) for row in csv.DictReader(f)]


def test_image_train_runs_saves_and_resumes(tmp_path, env):
    log_dir = str(tmp_path / "run")
    args = TINY_UNET + [
        "--image_size",
        "16",
        "--attention_resolutions",
        "8",
        "--class_cond",
        "True",
        "--learn_sigma",
        "True",
        "--log_dir",
        log_dir,
    ]
    out = run("image_train.py", args + ["--lr_anneal_steps", "3"], env)
    assert "built-in toy shapes dataset" in out and "samples_per_sec" in out and "| loss " in out
    assert [step for step, _ in logged_steps_and_losses(log_dir)] == ["1", "3"]  # shorter than --log_interval
    assert checkpoint_names(log_dir) == [
        "ema_0.9999_000002.pt",
        "ema_0.9999_000003.pt",
        "model000002.pt",
        "model000003.pt",
        "opt000002.pt",
        "opt000003.pt",
    ]
    out = run(
        "image_train.py", args + ["--lr_anneal_steps", "4", "--resume_checkpoint", f"{log_dir}/model000003.pt"], env
    )
    assert "loading EMA from checkpoint" in out and "loading optimizer state" in out
    assert [step for step, _ in logged_steps_and_losses(log_dir)] == ["4"]  # the resumed run's first and last step
    assert "model000004.pt" in checkpoint_names(log_dir)
    state = th.load(f"{log_dir}/model000004.pt", weights_only=True)
    assert state["label_emb.weight"].shape[0] == 1000 and state["out.2.weight"].shape[0] == 6


def test_classifier_train_runs_saves_and_resumes(tmp_path, env):
    log_dir = str(tmp_path / "clf")
    args = [
        "--image_size",
        "16",
        "--classifier_width",
        "64",
        "--classifier_depth",
        "1",
        "--classifier_attention_resolutions",
        "8",
        "--diffusion_steps",
        "50",
        "--batch_size",
        "4",
        "--log_interval",
        "2",
        "--save_interval",
        "2",
        "--log_dir",
        log_dir,
    ]
    out = run("classifier_train.py", args + ["--iterations", "3"], env)
    assert "validation on the built-in toy shapes dataset" in out and "val_acc@1" in out
    assert checkpoint_names(log_dir) == ["model000002.pt", "model000003.pt", "opt000002.pt", "opt000003.pt"]
    run("classifier_train.py", args + ["--iterations", "4", "--resume_checkpoint", f"{log_dir}/model000003.pt"], env)
    assert "model000004.pt" in checkpoint_names(log_dir)


def test_super_res_train_runs(tmp_path, env):
    log_dir = str(tmp_path / "sr")
    run(
        "super_res_train.py",
        TINY_UNET
        + [
            "--large_size",
            "16",
            "--small_size",
            "8",
            "--attention_resolutions",
            "8",
            "--lr_anneal_steps",
            "2",
            "--log_dir",
            log_dir,
        ],
        env,
    )
    state = th.load(f"{log_dir}/model000002.pt", weights_only=True)
    assert state["input_blocks.0.0.weight"].shape[1] == 6  # the image and its upsampled low-res version


def test_bad_data_dir_fails_with_a_clear_message(tmp_path, env):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(SCRIPTS, "image_train.py"),
            "--data_dir",
            str(tmp_path / "nowhere"),
            "--log_dir",
            str(tmp_path / "x"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "nowhere" in result.stderr and "does not exist" in result.stderr


def test_too_few_num_classes_for_the_data_fails_clearly(tmp_path, env):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(SCRIPTS, "classifier_train.py"),
            "--num_classes",
            "3",
            "--image_size",
            "16",
            "--log_dir",
            str(tmp_path / "x"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "holds 4 classes" in result.stderr and "--num_classes 4" in result.stderr


def test_a_seeded_training_run_is_reproducible(tmp_path, env):
    args = TINY_UNET + ["--image_size", "16", "--attention_resolutions", "8", "--lr_anneal_steps", "2", "--seed", "5"]
    for name in ("a", "b"):
        run("image_train.py", args + ["--log_dir", str(tmp_path / name)], env)
    a, b = (th.load(tmp_path / name / "model000002.pt", weights_only=True) for name in ("a", "b"))
    assert all(th.equal(a[k], b[k]) for k in a)
