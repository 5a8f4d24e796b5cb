"""dist_util in a single process: a world of one, devices, checkpoint loading."""

import os
import subprocess
import sys
import textwrap

import torch as th

from guided_diffusion import dist_util


def test_setup_dist_makes_a_world_of_one_without_mpi_or_torchrun():
    code = textwrap.dedent("""
        import torch.distributed as dist
        from guided_diffusion import dist_util
        dist_util.setup_dist()
        dist_util.setup_dist()  # a second call is a no-op
        import torch
        x = torch.ones(2)
        dist.all_reduce(x)  # collectives work, as the original's scripts expect
        print(dist.get_world_size(), dist.get_rank(), dist.get_backend(), dist_util.dev(), x.tolist())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "gloo", "cpu", "[1.0,", "1.0]"]


def test_load_state_dict_with_map_location_and_nested_states(tmp_path):
    opt = th.optim.AdamW([th.nn.Parameter(th.ones(3))])
    opt.param_groups[0]["params"][0].grad = th.ones(3)
    opt.step()
    th.save(opt.state_dict(), tmp_path / "opt.pt")
    state = dist_util.load_state_dict(str(tmp_path / "opt.pt"), map_location="cpu")
    assert th.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert dist_util.get_world_size() == 1 and dist_util.is_main_process()


