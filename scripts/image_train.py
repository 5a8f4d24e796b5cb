"""Train a diffusion model on images (the built-in toy shapes when --data_dir is not given)."""

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import run, start_run
from guided_diffusion.flags import TRAIN_FLAGS, parse_flags
from guided_diffusion.image_datasets import labeled_data_dir, load_data, training_data_dir
from guided_diffusion.script_util import (
    args_to_dict,
    compile_if_asked,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import train_diffusion_from_flags


def parse_args(argv=None):
    return parse_flags(__doc__, model_and_diffusion_defaults(), TRAIN_FLAGS, argv=argv)  # the training texts win


def main(argv=None):
    args = parse_args(argv)
    start_run(args, seed=args.seed)
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    compile_if_asked(model.to(dist_util.dev()), args)
    logger.log("creating data loader...")
    data_dir = (
        labeled_data_dir(args.data_dir, args.image_size, args.num_classes, label_source=args.label_source)
        if args.class_cond
        else training_data_dir(args.data_dir, args.image_size)
    )
    data = load_data(
        data_dir=data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        label_source=args.label_source,
    )
    train_diffusion_from_flags(args, model, diffusion, data)


if __name__ == "__main__":
    run(main)
