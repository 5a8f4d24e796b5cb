"""Labels from folders end to end: training saves the class map beside its checkpoints, and sampling
writes the names of the samples' labels."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--image_size",
    "16",
    "--num_channels",
    "32",
    "--num_res_blocks",
    "1",
    "--attention_resolutions",
    "8",
    "--diffusion_steps",
    "20",
    "--noise_schedule",
    "cosine",
    "--class_cond",
    "True",
    "--num_classes",
    "3",
]


def run(script, argv):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script)] + argv,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_folder_labels_are_saved_and_named_in_samples(tmp_path):
    for i, name in enumerate(["zebra", "apple", "mango"]):  # sorted: apple 0, mango 1, zebra 2
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * i + j, np.uint8)).save(folder / f"{j}.png")
    run_dir = tmp_path / "run"
    train = run(
        "image_train.py",
        TINY
        + [
            "--data_dir",
            str(tmp_path / "data"),
            "--label_source",
            "folder",
            "--batch_size",
            "2",
            "--lr_anneal_steps",
            "1",
            "--log_dir",
            str(run_dir),
        ],
    )
    assert "0: apple, 1: mango, 2: zebra" in train.stdout
    assert json.loads((run_dir / "class_names.json").read_text()) == {"class_names": ["apple", "mango", "zebra"]}

    out = tmp_path / "samples"
    run(
        "image_sample.py",
        TINY
        + [
            "--model_path",
            str(run_dir / "model000001.pt"),
            "--num_samples",
            "4",
            "--batch_size",
            "4",
            "--balanced_classes",
            "True",
            "--timestep_respacing",
            "2",
            "--log_dir",
            str(out),
        ],
    )
    with np.load(out / "samples_4x16x16x3.npz") as npz:
        assert list(npz["arr_1"]) == [0, 1, 2, 0]
        assert list(npz["label_names"]) == ["apple", "mango", "zebra", "apple"]
