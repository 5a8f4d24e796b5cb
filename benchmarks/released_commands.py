"""Run the original README's sampling commands on checkpoints of the released layouts.

The real checkpoints are not downloaded (no network): random weights of exactly the
released layout are written to a temporary folder, then each command runs with
the README's flags unchanged, plus overrides that keep a CPU run short
(--num_samples, --batch_size, --timestep_respacing). Prints each command's wall time.

    python benchmarks/released_commands.py                     # 64x64 guided, then 64->256 upsampling
    python benchmarks/released_commands.py --which 128x128 --steps 10
    python benchmarks/released_commands.py --which 64x64 --sampler dpm++2m --steps 10
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch as th

from guided_diffusion import script_util as su

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The original README's flags for each command: (script, kind of each checkpoint, MODEL_FLAGS, extra flags).
COMMON = dict(
    attention_resolutions="32,16,8",
    diffusion_steps=1000,
    learn_sigma=True,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)
COMMANDS = {
    "64x64": (
        "classifier_sample.py",
        dict(
            COMMON,
            class_cond=True,
            dropout=0.1,
            image_size=64,
            noise_schedule="cosine",
            num_channels=192,
            num_head_channels=64,
            num_res_blocks=3,
            use_new_attention_order=True,
        ),
        dict(classifier_scale=1.0, classifier_depth=4),
    ),
    "128x128": (
        "classifier_sample.py",
        dict(
            COMMON,
            class_cond=True,
            image_size=128,
            noise_schedule="linear",
            num_channels=256,
            num_heads=4,
            num_res_blocks=2,
        ),
        dict(classifier_scale=0.5),
    ),
    "256x256": (
        "classifier_sample.py",
        dict(
            COMMON,
            class_cond=True,
            image_size=256,
            noise_schedule="linear",
            num_channels=256,
            num_head_channels=64,
            num_res_blocks=2,
        ),
        dict(classifier_scale=1.0),
    ),
    "64_256": (
        "super_res_sample.py",
        dict(
            COMMON,
            class_cond=True,
            large_size=256,
            small_size=64,
            noise_schedule="linear",
            num_channels=192,
            num_heads=4,
            num_res_blocks=2,
        ),
        {},
    ),
    "lsun": (
        "image_sample.py",
        dict(
            COMMON,
            class_cond=False,
            dropout=0.1,
            image_size=256,
            noise_schedule="linear",
            num_channels=256,
            num_head_channels=64,
            num_res_blocks=2,
        ),
        {},
    ),
}


def random_checkpoint(kind, flags, path):
    """Random weights of the layout the flags build (float32, as the released files)."""
    model, _ = su.create_from_flags(kind, {**su.MODEL_KINDS[kind][0](), **flags})
    th.save(model.state_dict(), path)
    return path


def argv(flags):
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def run(name, workdir, overrides, base_samples=None):
    script, model_flags, extra = COMMANDS[name]
    kind = "super_res" if script == "super_res_sample.py" else "diffusion"
    paths = {"model_path": random_checkpoint(kind, model_flags, os.path.join(workdir, f"{name}.pt"))}
    if script == "classifier_sample.py":
        clf_flags = {
            "image_size": model_flags["image_size"],
            **{k: v for k, v in extra.items() if k != "classifier_scale"},
        }
        paths["classifier_path"] = random_checkpoint("classifier", clf_flags, os.path.join(workdir, f"{name}_clf.pt"))
    if base_samples:
        paths["base_samples"] = base_samples
    log_dir = os.path.join(workdir, f"out_{name}")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script)] + argv(model_flags) + argv(extra) + argv(paths)
    cmd += argv(overrides) + ["--log_dir", log_dir]
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"{name:<8} {script:<22} {time.time() - start:7.1f} s  -> {log_dir}")
    return next(os.path.join(log_dir, f) for f in os.listdir(log_dir) if f.endswith(".npz"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", default="64x64,64_256", help=f"comma-separated, of {', '.join(COMMANDS)}")
    parser.add_argument("--steps", default="4", help="--timestep_respacing for the run")
    parser.add_argument("--num_samples", type=int, default=2)
    parser.add_argument(
        "--sampler",
        default="",
        help="--sampler of the run, e.g. dpm++2m (then --steps model evaluations instead of a respacing)",
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="override --use_fp16 and --classifier_use_fp16 with False (half precision convolutions are slow on a CPU)",
    )
    args = parser.parse_args()
    overrides = dict(num_samples=args.num_samples, batch_size=args.num_samples, timestep_respacing=args.steps, seed=0)
    if args.fp32:
        overrides.update(use_fp16=False, classifier_use_fp16=False)
    if args.sampler.startswith("dpm++"):
        del overrides["timestep_respacing"]
        overrides.update(sampler=args.sampler, sampling_steps=int(args.steps))
    elif args.sampler:
        overrides["sampler"] = args.sampler
    with tempfile.TemporaryDirectory() as workdir:
        last = None
        for name in args.which.split(","):
            base = last if name.startswith("64_") and last and "64x64x3" in last else None
            last = run(name, workdir, overrides, base_samples=base)


if __name__ == "__main__":
    main()
