"""Shared helpers of the command-line scripts, so each script's main() stays a few lines."""

import argparse

import torch as th

from . import dist_util, logger
from .script_util import RUN_FLAGS, add_dict_to_argparser
from .toy_data import TOY_CLASSES, ensure_toy_dataset

TOY_VALIDATION_SEED = 1  # the held-out toy set: same classes, other images


def parse_flags(description, *groups, argv=None):
    """Parse --flags whose defaults come from the given dicts or FlagGroups (later ones win)."""
    defaults = dict(RUN_FLAGS.defaults())
    for group in groups:
        defaults.update(group if isinstance(group, dict) else group.defaults())
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    return parser.parse_args(argv)


def start_run(args, seed=-1):
    """Set up the process group and the logger (into --log_dir, $OPENAI_LOGDIR or a new folder).

    With seed >= 0 the run is reproducible: torch's RNG gets the seed on every rank (the same
    initial weights), numpy's and Python's get seed + rank (timestep draws, flips).
    """
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    if seed is not None and seed >= 0:
        import random

        import numpy as np

        th.manual_seed(seed)
        np.random.seed(seed + dist_util.get_rank())
        random.seed(seed + dist_util.get_rank())
    if dist_util.is_main_process():
        logger.log(f"devices: {dist_util.get_world_size()} process(es), this one on {dist_util.dev()}")


def finish_sampling(images, labels=None):
    """Save the samples on rank 0 (npz and PNG grid), wait for every rank, and log the path last."""
    path = None
    if dist_util.is_main_process():
        from .sampling import save_samples

        path = save_samples(images, labels)
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


def labeled_data_dir(data_dir, image_size, num_classes, validation=False):
    """training_data_dir, checked to hold no more classes than the model has outputs."""
    from .image_datasets import class_names

    folder = training_data_dir(data_dir, image_size, validation=validation)
    names = class_names(folder)
    if len(names) > num_classes:
        raise ValueError(f"{folder} holds {len(names)} classes ({', '.join(names[:5])}...) but --num_classes is "
                         f"{num_classes}; pass --num_classes {len(names)}")
    return folder


def train_diffusion(args, model, diffusion, data):
    """Run TrainLoop with the training flags of image_train.py / super_res_train.py."""
    from .resample import create_named_schedule_sampler
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
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, use_bf16=args.use_bf16,
    ).run_loop()
