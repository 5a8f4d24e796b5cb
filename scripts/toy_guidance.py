"""The main job: train a diffusion model and classifiers on the built-in toy shapes, sample with classifier
guidance at several scales, and print how often the samples show their target class, how diverse they are,
and their FID, precision and recall against held-out real images."""

from guidance_experiment import config_from_flags, run_experiment

from guided_diffusion.cli import run
from guided_diffusion.flags import FlagParser
from guided_diffusion.sampling import SAMPLERS


def main(argv=None):
    parser = FlagParser(description=__doc__)
    parser.add_argument("--out_dir", default="runs/toy_guidance", help="where checkpoints, grids and the table go")
    parser.add_argument("--scales", default=None,
                        help="comma-separated guidance scales (default 0,1,4,10; cfg mode: weights w 0,1,3,6)")
    parser.add_argument("--train_steps", type=int, default=None, help="diffusion model training steps")
    parser.add_argument("--samples_per_class", type=int, default=None, help="samples per target class and scale")
    parser.add_argument("--image_size", type=int, default=None, help="image size (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--sampler", default=None, choices=SAMPLERS,
                        help="sampler of the guided samples (default ddpm, 50 respaced steps)")
    parser.add_argument("--sampling_steps", type=int, default=None,
                        help="model evaluations of the dpm++ solvers (default 20)")
    parser.add_argument("--mode", default=None, choices=("classifier", "cfg"),
                        help="classifier: classifier guidance of an unconditional model (default); cfg: "
                             "classifier-free guidance of a class-conditional model trained with label dropout")
    parser.add_argument("--p_uncond", type=float, default=None, help="label dropout of the cfg mode (default 0.2)")
    parser.add_argument("--quick", action="store_true", help="tiny models and steps: checks the pipeline in seconds")
    args = parser.parse_args(argv)
    scales = tuple(float(s) for s in args.scales.split(",")) if args.scales else None
    cfg = config_from_flags(quick=args.quick, scales=scales, train_steps=args.train_steps,
                            samples_per_class=args.samples_per_class, image_size=args.image_size, seed=args.seed,
                            sampler=args.sampler, sampling_steps=args.sampling_steps, mode=args.mode,
                            p_uncond=args.p_uncond)
    run_experiment(cfg, args.out_dir)


if __name__ == "__main__":
    run(main)
