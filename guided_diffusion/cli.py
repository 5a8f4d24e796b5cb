"""Shared helpers of the command-line scripts, so each script's main() stays a few lines."""

import argparse
import difflib
import os
import sys
import time

import torch as th

from . import dist_util, logger
from .errors import UsageError, UserError, flag_errors
from .script_util import RUN_FLAGS, add_flags, flags_of
from .toy_data import TOY_CLASSES, ensure_toy_dataset

TOY_VALIDATION_SEED = 1  # the held-out toy set: same classes, other images


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


def parse_flags(description, *groups, argv=None):
    """Parse --flags defined by the given FlagGroups or defaults dicts (later ones win).

    A flag defined in two groups takes its default and help text from the later one,
    so each script's --help shows the text that belongs to it. The names given on the
    command line are kept for given_flags(args).
    """
    flags = flags_of(RUN_FLAGS, *groups)
    parser = FlagParser(description=description)
    add_flags(parser, flags)
    args = parser.parse_args(argv)
    args._given = given_names(flags, argv)
    return args


def given_names(flags, argv=None):
    """The flag names that appear on the command line argv (sys.argv[1:] when None)."""
    parser = FlagParser()
    for name in flags:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS)  # absent flags stay out of the namespace
    return frozenset(vars(parser.parse_known_args(argv)[0]))


def given_flags(args):
    """The names of the flags given on the command line (empty for args not made by parse_flags)."""
    return getattr(args, "_given", frozenset())


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors, so that run() prints them once for all ranks."""

    def error(self, message):
        usage = self.format_usage()
        if usage.count("\n") > 4:  # dozens of flags: the usage would bury the message
            usage = f"usage: {self.prog} [--flag value ...] (every flag: {self.prog} --help)\n"
        raise UsageError(message + self._did_you_mean(message), usage=usage)

    def _did_you_mean(self, message):
        """For misspelt flags, the closest known ones."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [option for action in self._actions for option in action.option_strings]
        hints = []
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("-") else []
            hints += [f"{close[0]} for {word}"] if close else []
        return f"; did you mean {', '.join(hints)}?" if hints else ""


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


def compile_if_asked(model, args, backend="inductor"):
    """model.compile() in place (state-dict keys unchanged) when --compile is set. A compilation that
    fails at the first call runs eagerly instead; a torch without a working compiler logs one line."""
    if not getattr(args, "compile", False):
        return model
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # fall back to eager, function by function
        model.compile(backend=backend)
        logger.log(f"torch.compile ({backend}): {type(model).__name__} compiles on its first call")
    except Exception as exc:  # no dynamo on this platform or Python version
        logger.log(f"torch.compile is not available here ({type(exc).__name__}: {exc}); running eagerly")
    return model


def finish_sampling(images, labels=None, class_names=None):
    """Save the samples on rank 0 (npz and PNG grid; with class_names, the names of the labels too), wait
    for every rank, and log the path last."""
    path = None
    if dist_util.is_main_process():
        from .sampling import save_samples

        path = save_samples(images, labels, class_names=class_names)
    dist_util.barrier()
    if path:
        logger.log(f"sampling complete: {len(images)} samples saved to {path}")
    return path


def training_data_dir(data_dir, image_size, validation=False):
    """data_dir, or the built-in toy dataset at image_size when it is empty (rank 0 creates it)."""
    if data_dir:
        return data_dir
    seed = TOY_VALIDATION_SEED if validation else 0
    if dist_util.is_main_process():
        ensure_toy_dataset(image_size=image_size, seed=seed)
    dist_util.barrier()
    folder = ensure_toy_dataset(image_size=image_size, seed=seed)
    if dist_util.is_main_process():
        kind = "validation" if validation else "training"
        logger.log(f"no --{'val_' if validation else ''}data_dir given: {kind} on the built-in toy shapes dataset "
                   f"({len(TOY_CLASSES)} classes: {', '.join(TOY_CLASSES)}) at {folder}")
    return folder


def labeled_data_dir(data_dir, image_size, num_classes, validation=False, label_source="filename"):
    """training_data_dir, checked to hold no more classes than the model has outputs. For the training
    set, the class-name-to-index map is logged and saved beside the checkpoints (CLASS_NAMES_FILE)."""
    from .image_datasets import CLASS_NAMES_FILE, class_names, save_class_names

    folder = training_data_dir(data_dir, image_size, validation=validation)
    names = class_names(folder, label_source=label_source)
    if len(names) > num_classes:
        raise UsageError(f"{folder} holds {len(names)} classes ({', '.join(names[:5])}...) but --num_classes is "
                         f"{num_classes}; pass --num_classes {len(names)}")
    if not validation and dist_util.is_main_process():
        path = os.path.join(logger.get_dir(), CLASS_NAMES_FILE)
        save_class_names(names, path)
        shown = ", ".join(f"{i}: {name}" for i, name in enumerate(names[:20]))
        more = ", ..." if len(names) > 20 else ""
        logger.log(f"classes (from the {label_source}s, saved to {path}): {shown}{more}")
    return folder


def class_names_beside(*checkpoint_paths):
    """The class names saved by training beside the first of these checkpoints that has them, or None."""
    from .image_datasets import find_class_names

    for path in checkpoint_paths:
        names = find_class_names(path) if path else None
        if names:
            logger.log(f"class names from beside {path}: {len(names)} classes")
            return names
    return None


def train_diffusion(args, model, diffusion, data):
    """Run TrainLoop with the training flags of image_train.py / super_res_train.py."""
    from .train_util import TrainLoop

    if args.p_uncond > 0:
        from .cfg import label_dropout

        logger.log(f"label dropout for classifier-free guidance: p_uncond {args.p_uncond}, null class {args.num_classes}")
        data = label_dropout(data, args.p_uncond, null_label=args.num_classes)
    logger.log("training...")
    TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=args.batch_size, microbatch=args.microbatch,
        lr=args.lr, ema_rate=args.ema_rate, log_interval=args.log_interval, save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint, use_fp16=args.use_fp16, fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler_from_flags(args, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, use_bf16=args.use_bf16,
    ).run_loop()


def schedule_sampler_from_flags(args, diffusion):
    """The timestep sampler named by --schedule_sampler."""
    from .resample import create_named_schedule_sampler

    with flag_errors(NotImplementedError):
        return create_named_schedule_sampler(args.schedule_sampler, diffusion)
