"""Evaluate a diffusion model's likelihood (bits/dim) on a folder of images."""

from guided_diffusion import logger
from guided_diffusion.cli import run, start_run
from guided_diffusion.evaluation import run_bpd_evaluation, save_bpd_terms
from guided_diffusion.flags import NLL_FLAGS, parse_flags
from guided_diffusion.image_datasets import load_data, training_data_dir
from guided_diffusion.sampling import class_conditional_model, load_model
from guided_diffusion.script_util import model_and_diffusion_defaults


def parse_args(argv=None):
    return parse_flags(__doc__, NLL_FLAGS, model_and_diffusion_defaults(), argv=argv)


def main(argv=None):
    args = parse_args(argv)
    start_run(args, seed=args.seed)
    model, diffusion = load_model("diffusion", args, args.model_path)
    data = load_data(
        data_dir=training_data_dir(args.data_dir, args.image_size),
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        label_source=args.label_source,
    )
    logger.log("evaluating...")
    means, bpd, prior = run_bpd_evaluation(
        class_conditional_model(model, args.class_cond), diffusion, data, args.num_samples, args.clip_denoised
    )
    save_bpd_terms(means, logger.get_dir())
    logger.log(f"evaluation complete: {bpd:.4f} bits/dim (prior {prior:.4f}), terms in {logger.get_dir()}")


if __name__ == "__main__":
    run(main)
