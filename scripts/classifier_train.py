"""Train a noisy-image classifier for guidance (the built-in toy shapes when --data_dir is not given)."""

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import (compile_if_asked, labeled_data_dir, parse_flags, run, schedule_sampler_from_flags,
                                  start_run)
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    CLASSIFIER_TRAIN_FLAGS,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import ClassifierTrainLoop


def parse_args(argv=None):
    return parse_flags(__doc__, CLASSIFIER_TRAIN_FLAGS, classifier_and_diffusion_defaults(), argv=argv)


def main():
    args = parse_args()
    start_run(args, seed=args.seed)
    logger.log("creating model and diffusion...")
    model, diffusion = create_classifier_and_diffusion(**args_to_dict(args, classifier_and_diffusion_defaults().keys()))
    compile_if_asked(model.to(dist_util.dev()), args)
    logger.log("creating data loader...")
    data_dir = labeled_data_dir(args.data_dir, args.image_size, args.num_classes, label_source=args.label_source)
    data = load_data(data_dir=data_dir, batch_size=args.batch_size, image_size=args.image_size, class_cond=True,
                     random_crop=True, label_source=args.label_source)
    val_data = None
    if args.val_data_dir or not args.data_dir:  # the toy dataset brings its own held-out set
        val_dir = labeled_data_dir(args.val_data_dir, args.image_size, args.num_classes, validation=True,
                                   label_source=args.label_source)
        val_data = load_data(data_dir=val_dir, batch_size=args.batch_size, image_size=args.image_size,
                             class_cond=True, label_source=args.label_source)
    logger.log("training classifier model...")
    ClassifierTrainLoop(
        model=model, diffusion=diffusion, data=data, val_data=val_data, batch_size=args.batch_size,
        microbatch=args.microbatch, lr=args.lr, iterations=args.iterations, log_interval=args.log_interval,
        save_interval=args.save_interval, eval_interval=args.eval_interval, resume_checkpoint=args.resume_checkpoint,
        noised=args.noised, anneal_lr=args.anneal_lr, weight_decay=args.weight_decay,
        schedule_sampler=schedule_sampler_from_flags(args, diffusion),
        use_fp16=args.classifier_use_fp16, use_bf16=args.use_bf16,
    ).run_loop()


if __name__ == "__main__":
    run(main)
