"""Generate a large batch of samples from a diffusion model and save them as a numpy array (and a PNG grid)."""

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import run, start_run
from guided_diffusion.flags import SAMPLE_FLAGS, parse_flags
from guided_diffusion.image_datasets import class_names_beside
from guided_diffusion.sampling import (
    draw_labels,
    finish_sampling,
    generate,
    load_model,
    model_fn_from_flags,
    resolve_sampler,
    sample_loop_from_flags,
    sampler_description,
)
from guided_diffusion.script_util import model_and_diffusion_defaults


def parse_args(argv=None):
    return resolve_sampler(parse_flags(__doc__, SAMPLE_FLAGS, model_and_diffusion_defaults(), argv=argv))


def main(argv=None):
    args = parse_args(argv)
    start_run(args, seed=args.seed)
    model, diffusion = load_model("diffusion", args, args.model_path)

    def kwargs_for(indices):
        if not args.class_cond:
            return {}
        return {"y": draw_labels(indices, args.seed, args.num_classes, dist_util.dev(), balanced=args.balanced_classes)}

    logger.log(f"sampling ({sampler_description(args)})...")
    images, labels = generate(
        diffusion,
        model_fn_from_flags(model, args),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(3, args.image_size, args.image_size),
        kwargs_for=kwargs_for,
        sample_fn=sample_loop_from_flags(diffusion, args),
        clip_denoised=args.clip_denoised,
        seed=args.seed,
    )
    return finish_sampling(images, labels if args.class_cond else None, class_names_beside(args.model_path))


if __name__ == "__main__":
    run(main)
