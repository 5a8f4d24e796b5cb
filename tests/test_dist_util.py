"""dist_util in a single process: a world of one, devices, checkpoint loading."""

import os
import subprocess
import sys
import textwrap

import pytest
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


def test_collectives_in_a_world_of_one_return_this_ranks_values():
    x = th.arange(6).view(3, 2)
    assert dist_util.gather_rows(x) is x
    assert dist_util.gather_objects({"a": 1}) == [{"a": 1}]
    y = th.tensor([2.0])
    assert th.equal(dist_util.mean_over_ranks(y), y) and dist_util.mean_over_ranks(y) is not y


class FakeComm:
    rank = 3

    def allgather(self, obj):
        return [obj, "other"]


def test_a_communicator_decides_the_rank_and_the_object_gather(monkeypatch):
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_util.launch_rank() == 0
    monkeypatch.setenv("PMI_RANK", "2")
    assert dist_util.launch_rank() == 2  # before any process group, from the launcher
    assert dist_util.launch_rank(FakeComm()) == 3
    assert dist_util.gather_objects("mine", comm=FakeComm()) == ["mine", "other"]
    with pytest.raises(TypeError, match="allgather"):
        dist_util.gather_objects("mine", comm=object())


def _collectives_worker(rank, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = th.full((1 + 2 * rank, 2), float(rank))  # uneven: 1 row on rank 0, 3 on rank 1
    result = {
        "rows": dist_util.gather_rows(rows),
        "empty": dist_util.gather_rows(th.zeros(0, 2) if rank else rows),
        "objects": dist_util.gather_objects({"rank": rank}),
        "mean": dist_util.mean_over_ranks(th.tensor([float(rank)])),
    }
    th.save(result, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_gathers_of_uneven_batches_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_worker, args=(tmp_path / "init", tmp_path / "out"), nprocs=2)
    for rank in range(2):
        got = th.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        assert got["rows"].tolist() == [[0.0, 0.0]] + [[1.0, 1.0]] * 3  # rank order, padding cut off
        assert got["empty"].tolist() == [[0.0, 0.0]]  # a rank with no rows adds none
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["mean"].tolist() == [0.5]
