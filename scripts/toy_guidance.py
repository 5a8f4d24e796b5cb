"""The main job: train a diffusion model and classifiers on the built-in toy shapes, sample with classifier
guidance at several scales, and print how often the samples show their target class and how diverse they are."""

import argparse

from guided_diffusion.guidance_experiment import config_from_flags, run_experiment


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out_dir", default="runs/toy_guidance", help="where checkpoints, grids and the table go")
    parser.add_argument("--scales", default=None, help="comma-separated guidance scales (default 0,1,4,10)")
    parser.add_argument("--train_steps", type=int, default=None, help="diffusion model training steps")
    parser.add_argument("--samples_per_class", type=int, default=None, help="samples per target class and scale")
    parser.add_argument("--image_size", type=int, default=None, help="image size (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--quick", action="store_true", help="tiny models and steps: checks the pipeline in seconds")
    args = parser.parse_args()
    scales = tuple(float(s) for s in args.scales.split(",")) if args.scales else None
    cfg = config_from_flags(quick=args.quick, scales=scales, train_steps=args.train_steps,
                            samples_per_class=args.samples_per_class, image_size=args.image_size, seed=args.seed)
    run_experiment(cfg, args.out_dir)


if __name__ == "__main__":
    main()
