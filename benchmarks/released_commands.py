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
from guided_diffusion.released import released_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each command of the original README: (script, its model's released layout, its classifier's or None, the
# command's other flags). The README's model and classifier flags come from guided_diffusion.released.
COMMANDS = {
    "64x64": ("classifier_sample.py", "64x64_diffusion", "64x64_classifier", dict(classifier_scale=1.0)),
    "128x128": ("classifier_sample.py", "128x128_diffusion", "128x128_classifier", dict(classifier_scale=0.5)),
    "256x256": ("classifier_sample.py", "256x256_diffusion", "256x256_classifier", dict(classifier_scale=1.0)),
    "64_256": ("super_res_sample.py", "64_256_upsampler", None, {}),
    "lsun": ("image_sample.py", "256x256_diffusion_uncond", None, {}),  # the layout of the four LSUN models
}


def random_checkpoint(kind, flags, path):
    """Random weights of the layout the flags build (float32, as the released files)."""
    model, _ = su.create_from_flags(kind, {**su.MODEL_KINDS[kind][0](), **flags})
    th.save(model.state_dict(), path)
    return path


def argv(flags):
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def run(name, workdir, overrides, base_samples=None):
    script, model_name, classifier_name, extra = COMMANDS[name]
    model = released_record(model_name)
    model_flags, paths = dict(model.flags), {}
    paths["model_path"] = random_checkpoint(model.kind, model_flags, os.path.join(workdir, f"{name}.pt"))
    if classifier_name:
        classifier = released_record(classifier_name)
        model_flags.update(classifier.flags)  # the README passes both flag sets to classifier_sample.py
        clf_path = os.path.join(workdir, f"{name}_clf.pt")
        paths["classifier_path"] = random_checkpoint("classifier", dict(classifier.flags), clf_path)
    else:  # the scripts without a classifier have no --classifier_use_fp16
        overrides = {k: v for k, v in overrides.items() if k != "classifier_use_fp16"}
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
