"""Forward and forward+backward time and peak memory of the UNet, the classifier and attention.

Every row is measured in this one process and reported with its ratio against a
baseline row: the original's einsum attention for the networks, and the einsum
AttentionBlock for the attention rows. Peak memory is the CUDA allocator's peak
on a GPU and the rise of the process's peak resident memory on a CPU (Linux).

    python benchmarks/unet_speed.py                       # a small CPU-sized config
    python benchmarks/unet_speed.py --image_size 64 --num_channels 128 --batch_size 8
"""

import argparse
import statistics
import time

import torch as th

from guided_diffusion import script_util as su
from guided_diffusion import unet
from guided_diffusion.unet import AttentionBlock

BENCH_DEFAULTS = dict(
    batch_size=4,
    repeats=5,
    device="auto",
    image_size=32,
    num_channels=64,
    num_res_blocks=2,
    attention_resolutions="16,8",
    num_head_channels=32,
    classifier_width=64,
    classifier_depth=2,
    attention_tokens=1024,
    attention_channels=256,
)


def parse_args():
    defaults = {**su.model_and_diffusion_defaults(), **su.classifier_defaults(), **BENCH_DEFAULTS}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    su.add_dict_to_argparser(parser, defaults)
    return parser.parse_args()


class PeakMemory:
    """Peak memory (MiB) above the level at start, on CUDA or from Linux's peak RSS."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            th.cuda.synchronize()
            th.cuda.reset_peak_memory_stats()
            self.start = th.cuda.memory_allocated()
        else:
            _return_freed_memory_to_the_os()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size to the current one
            self.start = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            th.cuda.synchronize()
            self.peak = th.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self.start
        self.mib = self.peak / 2**20


def _return_freed_memory_to_the_os():
    """Make glibc serve every block >= 128 KiB by mmap, so freeing it lowers the resident size.

    Without this, glibc raises its mmap threshold after large frees and keeps the
    memory, and the peak resident size would not see later allocations.
    """
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device, repeats):
    """Median seconds of fn() over `repeats` runs after one warm-up, and its peak memory in MiB."""
    fn()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            if device.type == "cuda":
                th.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                th.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), mem.mib


def forward_fn(model, inputs):
    def run():
        with th.no_grad():
            model(*inputs)

    return run


def train_fn(model, inputs):
    def run():
        model.zero_grad(set_to_none=True)
        model(*inputs).float().square().mean().backward()

    return run


def network_rows(args, device):
    n, size = args.batch_size, args.image_size
    x, t = th.randn(n, 3, size, size, device=device), th.randint(0, 1000, (n,), device=device)
    flags = su.args_to_dict(args, su.model_and_diffusion_defaults())
    model = su.create_model_and_diffusion(**flags)[0].to(device)
    classifier = su.create_classifier(**su.args_to_dict(args, su.classifier_defaults())).to(device)
    if args.use_fp16:
        model.convert_to_fp16()
        classifier.convert_to_fp16()
    rows = []
    for name, net in (("unet", model), ("classifier", classifier)):
        for pass_name, make in (("forward", forward_fn), ("fwd+bwd", train_fn)):
            for impl in ("einsum", "sdpa"):
                unet.set_attention_implementation(impl)
                rows.append((name, pass_name, impl, *measure(make(net, (x, t)), device, args.repeats)))
    return rows


def attention_rows(args, device):
    block = AttentionBlock(args.attention_channels, num_head_channels=64, use_new_attention_order=True).to(device)
    side = int(args.attention_tokens**0.5)
    x = th.randn(args.batch_size, args.attention_channels, side, side, device=device)
    rows = []
    for pass_name, make in (("forward", forward_fn), ("fwd+bwd", train_fn)):
        for impl in ("einsum", "sdpa"):
            unet.set_attention_implementation(impl)
            rows.append(
                (f"attention {side}x{side}", pass_name, impl, *measure(make(block, (x,)), device, args.repeats))
            )
    return rows


def print_table(rows):
    """Rows of (network, pass, impl, seconds, MiB); ratios against the einsum row of the same network and pass."""
    base = {(r[0], r[1]): r for r in rows if r[2] == "einsum"}
    print(f"{'network':<18} {'pass':<8} {'attention':<9} {'ms':>9} {'peak MiB':>9} {'time/base':>9} {'mem/base':>9}")
    for net, pass_name, impl, sec, mib in rows:
        b = base[(net, pass_name)]
        mem_ratio = mib / b[4] if b[4] > 0 else float("nan")
        print(f"{net:<18} {pass_name:<8} {impl:<9} {sec * 1e3:9.1f} {mib:9.1f} {sec / b[3]:9.2f} {mem_ratio:9.2f}")


def main():
    args = parse_args()
    device = th.device(("cuda" if th.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    th.manual_seed(0)
    print(
        f"device {device}, torch {th.__version__}, threads {th.get_num_threads()}, batch {args.batch_size}, "
        f"image {args.image_size}, channels {args.num_channels}, fp16 {args.use_fp16}"
    )
    print_table(network_rows(args, device) + attention_rows(args, device))


if __name__ == "__main__":
    main()
