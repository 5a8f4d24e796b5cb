"""Sample from a diffusion model guided by a noisy classifier; save the images, their target classes and a grid."""

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import run, start_run
from guided_diffusion.flags import GUIDANCE_FLAGS, SAMPLE_FLAGS, parse_flags
from guided_diffusion.image_datasets import class_names_beside
from guided_diffusion.sampling import (
    classifier_cond_fn,
    draw_labels,
    finish_sampling,
    generate,
    load_model,
    model_fn_from_flags,
    resolve_sampler,
    sample_loop_from_flags,
    sampler_description,
)
from guided_diffusion.script_util import classifier_defaults, model_and_diffusion_defaults


def parse_args(argv=None):
    return resolve_sampler(
        parse_flags(
            __doc__, SAMPLE_FLAGS, GUIDANCE_FLAGS, model_and_diffusion_defaults(), classifier_defaults(), argv=argv
        )
    )


def main(argv=None):
    args = parse_args(argv)
    start_run(args, seed=args.seed)
    model, diffusion = load_model("diffusion", args, args.model_path)
    classifier, _ = load_model("classifier", args, args.classifier_path, path_flag="classifier_path")
    device = dist_util.dev()

    def kwargs_for(indices):
        return {"y": draw_labels(indices, args.seed, args.num_classes, device, balanced=args.balanced_classes)}

    logger.log(f"sampling with classifier scale {args.classifier_scale} ({sampler_description(args)})...")
    images, labels = generate(
        diffusion,
        model_fn_from_flags(model, args),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_shape=(3, args.image_size, args.image_size),
        kwargs_for=kwargs_for,
        # A zero scale adds nothing: skip the classifier's forward and backward passes altogether.
        cond_fn=classifier_cond_fn(classifier, args.classifier_scale) if args.classifier_scale else None,
        sample_fn=sample_loop_from_flags(diffusion, args),
        clip_denoised=args.clip_denoised,
        seed=args.seed,
    )
    return finish_sampling(images, labels, class_names_beside(args.classifier_path, args.model_path))


if __name__ == "__main__":
    run(main)
