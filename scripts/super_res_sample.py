"""Upsample the samples of an npz (from image_sample.py) with a super-resolution diffusion model."""

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import run, start_run
from guided_diffusion.flags import SAMPLE_FLAGS, SUPER_RES_SAMPLE_FLAGS, parse_flags
from guided_diffusion.image_datasets import class_names_beside
from guided_diffusion.sampling import (
    finish_sampling,
    generate,
    load_model,
    model_fn_from_flags,
    resolve_sampler,
    sample_loop_from_flags,
    sampler_description,
)
from guided_diffusion.script_util import sr_model_and_diffusion_defaults
from guided_diffusion.super_res import BaseSamples


def parse_args(argv=None):
    return resolve_sampler(
        parse_flags(__doc__, SAMPLE_FLAGS, SUPER_RES_SAMPLE_FLAGS, sr_model_and_diffusion_defaults(), argv=argv)
    )


def main(argv=None):
    args = parse_args(argv)
    start_run(args, seed=args.seed)
    model, diffusion = load_model("super_res", args, args.model_path)
    base = BaseSamples(args.base_samples, args.small_size, args.class_cond)
    device = dist_util.dev()
    logger.log(f"upsampling {args.num_samples} samples from {args.base_samples} ({sampler_description(args)})...")
    images, labels = generate(
        diffusion,
        model_fn_from_flags(model, args),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(3, args.large_size, args.large_size),
        kwargs_for=lambda indices: base.model_kwargs(indices, device),
        sample_fn=sample_loop_from_flags(diffusion, args),
        clip_denoised=args.clip_denoised,
        seed=args.seed,
    )
    return finish_sampling(images, labels if args.class_cond else None, class_names_beside(args.model_path))


if __name__ == "__main__":
    run(main)
