"""The main job: train a diffusion model and classifiers on the built-in toy shapes, sample with classifier
guidance at several scales, and print how often the samples show their target class, how diverse they are,
and their FID, precision and recall against held-out real images."""

from guidance_experiment import MODES, config_from_flags, run_experiment

from guided_diffusion.cli import run
from guided_diffusion.flags import FlagParser
from guided_diffusion.sampling import SAMPLERS

# The experiment's settings as flags, in --help order: (name, type, help[, choices]). Each defaults to None,
# which keeps the experiment's own default (config_from_flags).
CONFIG_FLAGS = (
    ("scales", str, "comma-separated guidance scales (default 0,1,4,10; cfg mode: weights w 0,1,3,6)"),
    ("train_steps", int, "diffusion model training steps"),
    ("samples_per_class", int, "samples per target class and scale"),
    ("image_size", int, "image size (default 16)"),
    ("seed", int, "sampling seed"),
    ("sampler", str, "sampler of the guided samples (default ddpm, 50 respaced steps)", SAMPLERS),
    ("sampling_steps", int, "model evaluations of the dpm++ solvers (default 20)"),
    (
        "mode",
        str,
        "classifier: classifier guidance of an unconditional model (default); cfg: "
        "classifier-free guidance of a class-conditional model trained with label dropout",
        MODES,
    ),
    ("p_uncond", float, "label dropout of the cfg mode (default 0.2)"),
)


def main(argv=None):
    parser = FlagParser(description=__doc__)
    parser.add_argument("--out_dir", default="runs/toy_guidance", help="where checkpoints, grids and the table go")
    for name, v_type, help_text, *choices in CONFIG_FLAGS:
        parser.add_argument(
            f"--{name}", type=v_type, default=None, help=help_text, choices=choices[0] if choices else None
        )
    parser.add_argument("--quick", action="store_true", help="tiny models and steps: checks the pipeline in seconds")
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, name) for name, *_ in CONFIG_FLAGS}
    overrides["scales"] = tuple(float(s) for s in args.scales.split(",")) if args.scales else None
    run_experiment(config_from_flags(quick=args.quick, **overrides), args.out_dir)


if __name__ == "__main__":
    run(main)
