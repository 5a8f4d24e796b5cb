"""
Key/value and text logging for training runs.

Interface-compatible with the logger of OpenAI's guided-diffusion (which in
turn follows OpenAI baselines): accumulate scalars with ``logkv`` /
``logkv_mean``, write them all at once with ``dumpkvs``, and send free-form
text through ``log``. Only rank 0 writes anything; other ranks still take
part in the cross-rank averaging done at each dump.
"""

import contextlib
import csv
import functools
import json
import os
import sys
import tempfile
import time
from datetime import datetime

import numpy as np
import torch

from . import dist_util

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

VALID_FORMATS = ("stdout", "log", "json", "csv", "tensorboard")
_MAX_CELL_CHARS = 30


# ---------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------


class KVWriter:
    """An output that receives a whole dict of key/values per dump."""

    def writekvs(self, kvs):
        raise NotImplementedError

    def close(self):
        pass


class SeqWriter:
    """An output that receives free-form text lines from ``log``."""

    def writeseq(self, seq):
        raise NotImplementedError

    def close(self):
        pass


def _format_value(val):
    if isinstance(val, float):
        return "%-8.3g" % val
    return str(val)


def _truncate(text):
    if len(text) > _MAX_CELL_CHARS:
        return text[: _MAX_CELL_CHARS - 3] + "..."
    return text


def _render_table(kvs):
    rows = sorted(
        ((_truncate(str(k)), _truncate(_format_value(v))) for k, v in kvs.items()), key=lambda row: row[0].lower()
    )
    key_w = max(len(k) for k, _ in rows)
    val_w = max(len(v) for _, v in rows)
    bar = "-" * (key_w + val_w + 7)
    body = [f"| {k:<{key_w}} | {v:<{val_w}} |" for k, v in rows]
    return "\n".join([bar, *body, bar]) + "\n"


class HumanOutputFormat(KVWriter, SeqWriter):
    """Boxed two-column table for dumps, plain lines for messages."""

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "at")
            self.own_file = True
        else:
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs):
        if not kvs:
            self.file.write("WARNING: tried to write empty key-value dict\n")
        else:
            self.file.write(_render_table(kvs))
        self.file.flush()

    def writeseq(self, seq):
        self.file.write(" ".join(str(elem) for elem in seq) + "\n")
        self.file.flush()

    def close(self):
        # Never close a stream we were handed, e.g. sys.stdout.
        if self.own_file:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dump, one per line."""

    def __init__(self, filename):
        self.file = open(filename, "at")

    def writekvs(self, kvs):
        # default=str keeps an odd value from aborting a whole training run.
        self.file.write(json.dumps(kvs, default=str) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """CSV table whose header grows when new keys show up."""

    def __init__(self, filename):
        self.filename = filename
        self.keys = []
        self.file = open(filename, "w+t", newline="")

    def writekvs(self, kvs):
        new_keys = [k for k in kvs if k not in self.keys]
        if new_keys:
            self.keys.extend(new_keys)
            self._rewrite_with_header()
        row = ["" if kvs.get(k) is None else kvs[k] for k in self.keys]
        csv.writer(self.file).writerow(row)
        self.file.flush()

    def _rewrite_with_header(self):
        # A CSV header cannot be extended in place, so re-emit every row
        # padded with empty cells for the columns it did not have.
        self.file.seek(0)
        old_rows = list(csv.reader(self.file))[1:]
        self.file.seek(0)
        self.file.truncate()
        writer = csv.writer(self.file)
        writer.writerow(self.keys)
        for row in old_rows:
            writer.writerow(row + [""] * (len(self.keys) - len(row)))

    def close(self):
        self.file.close()


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "The 'tensorboard' log format needs the tensorboard package: "
            "`pip install tensorboard`, or remove 'tensorboard' from "
            "OPENAI_LOG_FORMAT / format_strs."
        ) from err
    return SummaryWriter


class TensorBoardOutputFormat(KVWriter):
    """Scalar summaries, one step per dump."""

    def __init__(self, dir):
        self.writer = _import_summary_writer()(log_dir=dir)
        self.step = 0

    def writekvs(self, kvs):
        for key, val in kvs.items():
            # Event files only hold numbers; text values stay in the other formats.
            if isinstance(val, (int, float)):
                self.writer.add_scalar(key, float(val), global_step=self.step)
        self.writer.flush()
        self.step += 1

    def close(self):
        self.writer.close()


def make_output_format(format, ev_dir, log_suffix=""):
    """Build the writer named by ``format`` inside ``ev_dir``."""
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "tensorboard":
        return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(f"Unknown log format {format!r}; valid formats are {', '.join(VALID_FORMATS)}")


# ---------------------------------------------------------------------------
# Cross-rank averaging
# ---------------------------------------------------------------------------


def _to_python(val):
    """Turn tensors and numpy scalars into floats so every writer can serialise them."""
    if isinstance(val, torch.Tensor):
        return float(val.detach().item())
    if isinstance(val, (np.generic, np.ndarray)) and np.ndim(val) == 0:
        if val.dtype.kind in "biuf":
            return float(val)
    return val


def _weighted_mean(gathered):
    """Merge per-rank ``{key: (value, count)}`` dicts into count-weighted means.

    A key missing on some ranks is averaged over the ranks that logged it;
    non-numeric values cannot be averaged, so the first one seen is kept.
    """
    totals, counts, others = {}, {}, {}
    for local in gathered:
        for key, (val, cnt) in local.items():
            if isinstance(val, (int, float)):
                totals[key] = totals.get(key, 0.0) + val * cnt
                counts[key] = counts.get(key, 0) + cnt
            else:
                others.setdefault(key, val)
    order = dict.fromkeys(k for local in gathered for k in local)
    merged = {}
    for key in order:
        if key in totals and counts[key] > 0:
            merged[key] = totals[key] / counts[key]
        elif key in others:
            merged[key] = others[key]
    return merged


# ---------------------------------------------------------------------------
# Logger
# ---------------------------------------------------------------------------


class Logger:
    """Holds the pending key/values and the outputs they are written to."""

    # DEFAULT is the logger built lazily from the environment; CURRENT is the
    # one the module-level functions talk to (they differ inside configure()).
    DEFAULT = None
    CURRENT = None

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = {}
        self.name2cnt = {}
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = _to_python(val)
        self.name2cnt[key] = 1

    def logkv_mean(self, key, val):
        val = _to_python(val)
        old_val, cnt = self.name2val.get(key, 0.0), self.name2cnt.get(key, 0)
        self.name2val[key] = old_val * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self):
        merged = self._merge_across_ranks()
        if merged:
            for fmt in self.output_formats:
                if isinstance(fmt, KVWriter):
                    fmt.writekvs(merged)
        self.name2val.clear()
        self.name2cnt.clear()
        return merged

    def _merge_across_ranks(self):
        local = {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()}
        gathered = dist_util.gather_objects(local, comm=self.comm)
        if len(gathered) == 1:  # alone: the values as logged, without a round trip through sums
            return dict(self.name2val)
        return _weighted_mean(gathered)

    def log(self, *args, level=INFO):
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _default_dir():
    stamp = datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
    return os.path.join(tempfile.gettempdir(), stamp)


def _default_format_strs():
    raw = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv")
    return [s.strip() for s in raw.split(",") if s.strip()]


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Point the current logger at ``dir`` with the given output formats.

    Only rank 0 gets outputs; the others keep a silent logger so that they
    still join the averaging collective in ``dumpkvs``.
    """
    dir = os.path.expanduser(dir or os.getenv("OPENAI_LOGDIR") or _default_dir())
    if format_strs is None:
        format_strs = _default_format_strs()
    output_formats = []
    if dist_util.launch_rank(comm) == 0:
        os.makedirs(dir, exist_ok=True)
        output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs]
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def _configure_default_logger():
    configure()
    Logger.DEFAULT = Logger.CURRENT


def get_current():
    """The active logger, built from the environment on first use."""
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


def reset():
    """Close a logger set up by ``configure`` and go back to the default one."""
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        if Logger.CURRENT is not None:
            log("Reset logger")


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log somewhere else for the duration of a ``with`` block."""
    with restored():
        configure(dir=dir, format_strs=format_strs, comm=comm)
        yield


@contextlib.contextmanager
def restored():
    """The logger current before the ``with`` block is current after it, whatever configure() calls the
    block makes (a script's start_run, say); a logger configured inside is closed."""
    previous = Logger.CURRENT
    try:
        yield
    finally:
        if Logger.CURRENT is not previous:
            Logger.CURRENT.close()
            Logger.CURRENT = previous


# ---------------------------------------------------------------------------
# Module-level API
# ---------------------------------------------------------------------------


def logkv(key, val):
    """Set ``key`` for this dump; a later call in the same interval overwrites it."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Fold ``val`` into the running mean of ``key`` for this dump."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    for key, val in d.items():
        logkv(key, val)


def dumpkvs():
    """Write the pending key/values to every output, clear them, and return them."""
    return get_current().dumpkvs()


def getkvs():
    return get_current().name2val


def log(*args, level=INFO):
    """Write the args, space-separated, to the text outputs if ``level`` passes."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """The log directory, where other modules put checkpoints and samples."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(scopename):
    """Add the wall time spent in the block to the ``wait_<scopename>`` key."""
    key = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        current = get_current()
        current.name2val[key] = current.name2val.get(key, 0.0) + time.time() - start


def profile(n):
    """Decorator form of ``profile_kv``: ``@profile("name")``."""

    def decorator(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return wrapped

    return decorator
