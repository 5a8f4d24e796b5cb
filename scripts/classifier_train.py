"""Train a noisy-image classifier for guidance (the built-in toy shapes when --data_dir is not given)."""

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import run, start_run
from guided_diffusion.flags import CLASSIFIER_TRAIN_FLAGS, parse_flags
from guided_diffusion.image_datasets import labeled_data_dir, load_data
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    compile_if_asked,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import train_classifier_from_flags


def parse_args(argv=None):
    return parse_flags(__doc__, CLASSIFIER_TRAIN_FLAGS, classifier_and_diffusion_defaults(), argv=argv)


def main(argv=None):
    args = parse_args(argv)
    start_run(args, seed=args.seed)
    logger.log("creating model and diffusion...")
    model, diffusion = create_classifier_and_diffusion(**args_to_dict(args, classifier_and_diffusion_defaults().keys()))
    compile_if_asked(model.to(dist_util.dev()), args)
    logger.log("creating data loader...")
    data_dir = labeled_data_dir(args.data_dir, args.image_size, args.num_classes, label_source=args.label_source)
    data = load_data(
        data_dir=data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=True,
        label_source=args.label_source,
    )
    val_data = None
    if args.val_data_dir or not args.data_dir:  # the toy dataset brings its own held-out set
        val_dir = labeled_data_dir(
            args.val_data_dir, args.image_size, args.num_classes, validation=True, label_source=args.label_source
        )
        val_data = load_data(
            data_dir=val_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
            label_source=args.label_source,
        )
    train_classifier_from_flags(args, model, diffusion, data, val_data)


if __name__ == "__main__":
    run(main)
