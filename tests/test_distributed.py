"""Two processes on the CPU (gloo), launched by mpiexec and by torchrun, train in lockstep."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

WORKER = os.path.join(os.path.dirname(__file__), "dist_train_worker.py")


def write_images(folder, n=8):
    """Image i has the constant value 10 * i in its red channel, so a batch tells which images it holds."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        pixels[:, :, 0] = 10 * i
        Image.fromarray(pixels).save(f"{folder}/img_{i:02d}.png")


def mpiexec():
    pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py, mpich) is not installed")
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside_python if os.path.exists(beside_python) else shutil.which("mpiexec")


LAUNCHERS = {
    "mpiexec": lambda: [mpiexec(), "-n", "2", sys.executable],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_end_with_identical_parameters(launcher, tmp_path):
    write_images(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = LAUNCHERS[launcher]() + [WORKER, str(tmp_path / "data"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [th.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["moved"] > 1e-4  # training happened
    assert ranks[0]["resume_ok"] and ranks[1]["resume_ok"]
    assert ranks[0]["missing_ok"] and ranks[1]["missing_ok"]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert th.equal(a, b)
    seen = [set(r["seen"]) for r in ranks]  # 3 steps of 2 cover each rank's 4 images
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(8))
