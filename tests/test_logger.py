import csv
import importlib.util
import json
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion import logger
from guided_diffusion.logger import Logger

FORMATS = ["stdout", "log", "csv", "json"]


@pytest.fixture(autouse=True)
def isolated_logger(monkeypatch):
    """Keep the global logger and the env vars it reads from leaking between tests."""
    for var in ("OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    saved = (Logger.CURRENT, Logger.DEFAULT)
    yield
    for made in {Logger.CURRENT, Logger.DEFAULT}:
        if made is not None and made not in saved:
            made.close()
    Logger.CURRENT, Logger.DEFAULT = saved


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_logkv_and_logkv_mean(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])
    for v in (1, 2, 3):
        logger.logkv_mean("loss", v)
    logger.logkv("step", 7)
    logger.logkv("step", 8)
    logger.logkvs({"lr": 1e-4, "name": "adm"})
    assert logger.getkvs() == {"loss": 2.0, "step": 8, "lr": 1e-4, "name": "adm"}
    assert logger.dumpkvs() == {"loss": 2.0, "step": 8, "lr": 1e-4, "name": "adm"}
    assert logger.getkvs() == {}


def test_tensors_and_numpy_scalars_become_floats(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["json"])
    logger.logkv("t", torch.tensor(1.5))
    logger.logkv("n", np.float32(0.25))
    logger.logkv("i", np.int64(3))
    logger.logkv_mean("m", torch.tensor(2.0))
    logger.logkv_mean("m", np.float64(4.0))
    out = logger.dumpkvs()
    assert out == {"t": 1.5, "n": 0.25, "i": 3.0, "m": 3.0}
    assert all(type(v) is float for v in out.values())
    assert read_json_lines(tmp_path / "progress.json") == [out]


def test_dump_writes_all_formats(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=FORMATS)
    logger.logkv("loss", 0.125)
    logger.logkv("step", 3)
    logger.logkv("a_very_long_key_name_that_goes_past_thirty_chars", 1)
    logger.dumpkvs()
    logger.get_current().close()

    rows = read_csv(tmp_path / "progress.csv")
    header, row = rows
    assert dict(zip(header, row))["loss"] == "0.125"
    assert dict(zip(header, row))["step"] == "3"
    (line,) = read_json_lines(tmp_path / "progress.json")
    assert line["loss"] == 0.125 and line["step"] == 3

    table = (tmp_path / "log.txt").read_text()
    assert "| loss" in table and "0.125" in table
    assert "| a_very_long_key_name_that_g... |" in table
    assert table == capsys.readouterr().out


def test_csv_header_grows_and_pads_old_rows(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.logkv("a", 2)
    logger.logkv("b", 20)
    logger.dumpkvs()
    logger.logkv("c", 300)
    logger.dumpkvs()
    assert read_csv(tmp_path / "progress.csv") == [["a", "b", "c"], ["1", "", ""], ["2", "20", ""], ["", "", "300"]]


def test_log_lines_and_level_filtering(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    logger.log("hello", 42)
    logger.debug("hidden debug")
    logger.set_level(logger.WARN)
    logger.info("hidden info")
    logger.warn("shown warn")
    logger.error("shown error")
    logger.set_level(logger.DISABLED)
    logger.error("hidden error")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines == [f"Logging to {tmp_path}", "hello 42", "shown warn", "shown error"]


def test_env_vars_are_honoured(tmp_path, monkeypatch):
    log_dir = tmp_path / "from_env"
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "csv,json")
    logger.configure()
    assert logger.get_dir() == str(log_dir)
    logger.logkv("x", 1)
    logger.dumpkvs()
    assert sorted(os.listdir(log_dir)) == ["progress.csv", "progress.json"]


def test_get_current_builds_default_from_env(tmp_path, monkeypatch):
    Logger.CURRENT = Logger.DEFAULT = None
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "log")
    assert logger.get_current() is Logger.DEFAULT
    assert logger.get_dir() == str(tmp_path)
    assert (tmp_path / "log.txt").exists()


def test_default_dir_is_timestamped_and_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    logger.configure(format_strs=["stdout"])
    log_dir = logger.get_dir()
    assert os.path.dirname(log_dir) == str(tmp_path)
    assert os.path.basename(log_dir).startswith("openai-")
    assert os.path.isdir(log_dir)
    assert capsys.readouterr().out == f"Logging to {log_dir}\n"


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    logger.configure(dir="~/runs", format_strs=[])
    assert logger.get_dir() == str(tmp_path / "runs")


def test_nonzero_rank_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log_dir = tmp_path / "rank1"
    logger.configure(dir=str(log_dir), format_strs=FORMATS)
    logger.log("message")
    logger.logkv("x", 1)
    assert logger.dumpkvs() == {"x": 1}
    assert not log_dir.exists()
    assert capsys.readouterr().out == ""


def test_unknown_format_raises(tmp_path):
    with pytest.raises(ValueError, match="bogus") as info:
        logger.configure(dir=str(tmp_path), format_strs=["stdout", "bogus"])
    assert "csv" in str(info.value)


def test_scoped_configure_restores_previous(tmp_path):
    logger.configure(dir=str(tmp_path / "outer"), format_strs=["csv"])
    outer = logger.get_current()
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["json"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.logkv("inner_key", 1)
        logger.dumpkvs()
    assert logger.get_current() is outer
    assert logger.get_dir() == str(tmp_path / "outer")
    assert read_json_lines(tmp_path / "inner" / "progress.json") == [{"inner_key": 1}]


def test_restored_closes_what_the_block_configured_and_brings_back_the_caller(tmp_path):
    logger.configure(dir=str(tmp_path / "outer"), format_strs=["csv"])
    outer = logger.get_current()
    with logger.restored():
        logger.configure(dir=str(tmp_path / "a"), format_strs=["log"])
        logger.configure(dir=str(tmp_path / "b"), format_strs=["log"])  # a second run in the same block
        inner = logger.get_current()
        logger.log("inside")
    assert logger.get_current() is outer and inner is not outer
    assert all(f.file.closed for f in inner.output_formats)
    assert "inside" in (tmp_path / "b" / "log.txt").read_text()
    with logger.restored():  # a block that configures nothing leaves the current logger open
        pass
    assert logger.get_current() is outer and not any(
        getattr(f, "file", None) and f.file.closed for f in outer.output_formats
    )


def test_reset_returns_to_default(tmp_path):
    default = Logger(dir=str(tmp_path), output_formats=[])
    Logger.CURRENT = Logger.DEFAULT = default
    logger.configure(dir=str(tmp_path / "other"), format_strs=["log"])
    assert logger.get_current() is not default
    logger.reset()
    assert logger.get_current() is default


def test_profile_accumulates_wait_time(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[])

    @logger.profile("step")
    def work():
        return "done"

    assert work() == "done"
    with logger.profile_kv("step"):
        pass
    assert logger.getkvs()["wait_step"] >= 0.0
    assert set(logger.getkvs()) == {"wait_step"}


def test_levels_filter_messages_and_the_original_aliases_log(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=["stdout"])
    try:
        logger.set_level(logger.ERROR)
        logger.warn("quiet warning")
        logger.error("loud error")
        logger.set_level(logger.DEBUG)
        logger.debug("now visible")
        logger.record_tabular("k", 3)  # the original's names for logkv and dumpkvs
        assert logger.dump_tabular() == {"k": 3}
    finally:
        logger.reset()
    out = capsys.readouterr().out
    assert "quiet warning" not in out and "loud error" in out and "now visible" in out


class FakeComm:
    """Pretends a second rank logged ``other`` at every dump."""

    rank = 0

    def __init__(self, other):
        self.other = other

    def allgather(self, local):
        return [local, self.other]


def test_comm_weighted_mean_across_ranks(tmp_path):
    other = {"loss": (4.0, 3), "only_there": (7.0, 1)}
    logger.configure(dir=str(tmp_path), format_strs=["json"], comm=FakeComm(other))
    logger.logkv_mean("loss", 0.0)
    logger.logkv("only_here", 5)
    out = logger.dumpkvs()
    # (0.0 * 1 + 4.0 * 3) / 4
    assert out == {"loss": 3.0, "only_here": 5.0, "only_there": 7.0}
    assert read_json_lines(tmp_path / "progress.json") == [out]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, log_dir, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logger.configure(dir=log_dir, format_strs=["json"])
        for _ in range(rank + 1):
            logger.logkv_mean("loss", float(rank))
        if rank == 1:
            logger.logkv("rank1_only", 9.0)
        results[rank] = logger.dumpkvs()
    finally:
        logger.get_current().close()
        dist.destroy_process_group()


def test_torch_distributed_average(tmp_path):
    log_dir = str(tmp_path / "dist")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_dist_worker, args=(_free_port(), log_dir, results), nprocs=2)
        results = dict(results)
    # Rank 0 logged 0.0 once, rank 1 logged 1.0 twice: (0 + 2) / 3.
    expected = {"loss": 2.0 / 3.0, "rank1_only": 9.0}
    assert results[0] == pytest.approx(expected)
    assert results[1] == pytest.approx(expected)
    assert os.listdir(log_dir) == ["progress.json"]
    assert read_json_lines(os.path.join(log_dir, "progress.json")) == [pytest.approx(expected)]


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_format_writes_events(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])
    logger.logkv("loss", 1.0)
    logger.logkv("note", "text is skipped")
    logger.dumpkvs()
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_missing_gives_clear_error(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])


class FakeSummaryWriter:
    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.scalars = []
        self.flushes = 0

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushes += 1

    def close(self):
        pass


def test_tensorboard_writer_logic_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setattr(logger, "_import_summary_writer", lambda: FakeSummaryWriter)
    logger.configure(dir=str(tmp_path), format_strs=["tensorboard"], log_suffix="-x")
    for step in range(2):
        logger.logkv("loss", float(step))
        logger.logkv("note", "not a scalar")
        logger.dumpkvs()
    (fmt,) = logger.get_current().output_formats
    assert fmt.writer.log_dir == str(tmp_path / "tb-x")
    assert fmt.writer.scalars == [("loss", 0.0, 0), ("loss", 1.0, 1)]
    assert fmt.writer.flushes == 2
