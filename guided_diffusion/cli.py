"""Running a command-line script: its errors without tracebacks (once per run, whatever the launcher), and
the process group, logger and seeds it starts with. Flags are parsed by flags.py."""

import os
import sys
import time

import torch as th

from . import dist_util, logger
from .errors import UsageError, UserError

TRACEBACK_VAR = "GUIDED_DIFFUSION_TRACEBACK"  # set to 1 to see the traceback of an anticipated error too
RANK_GRACE_S = 5.0  # how long the other ranks wait for rank 0 to report an error and end the run


def run(main):
    """Run a script's main(). An anticipated error (errors.UserError) prints one line, prefixed with the
    script's name, and exits with its code (2 for flags, as argparse); any other exception is a bug and
    keeps its traceback. Under mpiexec or torchrun the message is printed once and every rank exits."""
    try:
        main()
    except UserError as exc:
        if os.environ.get(TRACEBACK_VAR, "") not in ("", "0"):
            raise
        _exit_with_error(str(exc), exc.exit_code, getattr(exc, "usage", ""))
    except KeyboardInterrupt:
        _exit_with_error("interrupted", 130)


def _exit_with_error(message, code, usage=""):
    """Rank 0 reports and ends the run. Another rank waits, so that rank 0's report (of the same error,
    usually) ends it first; it reports only an error rank 0 did not have (its own data shard, say)."""
    prog = os.path.basename(sys.argv[0]) or "guided_diffusion"
    rank = dist_util.launch_rank()
    if rank != 0:
        time.sleep(RANK_GRACE_S)
        if dist_util.get_world_size() == 1:  # before the process group: every rank parses the same flags
            sys.exit(code)
        prog = f"{prog} (rank {rank})"
    sys.stderr.write(f"{usage}{prog}: error: {message}\n")
    dist_util.abort_run(code)


def start_run(args, seed=-1):
    """Set up the process group and the logger (into --log_dir, $OPENAI_LOGDIR or a new folder).

    With seed >= 0 the run is reproducible: torch's RNG gets the seed on every rank (the same
    initial weights), numpy's and Python's get seed + rank (timestep draws, flips).
    """
    dist_util.setup_dist()
    try:
        logger.configure(dir=args.log_dir or None)
    except OSError as exc:  # a folder that cannot be created or written
        raise UsageError(f"cannot write the logs to --log_dir {args.log_dir!r} ({exc}); pick another folder") from exc
    if seed is not None and seed >= 0:
        import random

        import numpy as np

        th.manual_seed(seed)
        np.random.seed(seed + dist_util.get_rank())
        random.seed(seed + dist_util.get_rank())
    if dist_util.is_main_process():
        logger.log(f"devices: {dist_util.get_world_size()} process(es), this one on {dist_util.dev()}")
