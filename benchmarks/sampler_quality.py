"""Sample quality against the number of model evaluations (NFE): DDPM, DDIM and DPM-Solver++, with and
without classifier guidance, on the main job's models.

Trains nothing: it takes a diffusion model, a noisy classifier and a judge (by default the checkpoints
that `python scripts/toy_guidance.py` leaves in runs/toy_guidance), samples the same seeded batch with
every sampler at every NFE, and measures what the main job measures: how often the judge sees the
target class, and FID in the judge's features against held-out real images. Writes a table
(table.txt, results.json) and a plot (sampler_quality.png, needs matplotlib) into --out_dir.

    python scripts/toy_guidance.py && python benchmarks/sampler_quality.py
    python benchmarks/sampler_quality.py --nfe 5,10,20 --samplers ddim,dpm++2m --samples_per_class 8
"""

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import replace

import torch as th

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from guidance_experiment import (  # noqa: E402  (the main job lives in the scripts folder, not a package)
    ExperimentConfig,
    classifier_flags,
    held_out_real,
    judge_outputs,
    load_judge,
    model_flags,
)

from guided_diffusion import script_util as su  # noqa: E402
from guided_diffusion.metrics import compute_statistics  # noqa: E402
from guided_diffusion.sampling import (  # noqa: E402
    class_conditional_model,
    classifier_cond_fn,
    draw_labels,
    generate,
    load_model,
    sample_loop,
)
from guided_diffusion.toy_data import TOY_CLASSES  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/toy_guidance", help="the main job's output folder")
    parser.add_argument("--model_path", default="", help="default: RUN_DIR/diffusion/model000700.pt")
    parser.add_argument("--classifier_path", default="", help="default: RUN_DIR/classifier/model000300.pt")
    parser.add_argument("--judge_path", default="", help="default: RUN_DIR/judge/model000150.pt")
    parser.add_argument("--samplers", default="ddpm,ddim,dpm++2m,dpm++2m_sde,dpm++3m")
    parser.add_argument("--nfe", default="5,10,15,20,25,50", help="model evaluations per sample to try")
    parser.add_argument("--scale", type=float, default=4.0, help="classifier scale of the guided rows")
    parser.add_argument("--step_schedule", default="time", help="steps of the dpm++ solvers: time or logsnr")
    parser.add_argument("--samples_per_class", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="", help="default: RUN_DIR/sampler_quality")
    args = parser.parse_args()
    args.model_path = args.model_path or os.path.join(args.run_dir, "diffusion", "model000700.pt")
    args.classifier_path = args.classifier_path or os.path.join(args.run_dir, "classifier", "model000300.pt")
    args.judge_path = args.judge_path or os.path.join(args.run_dir, "judge", "model000150.pt")
    args.out_dir = args.out_dir or os.path.join(args.run_dir, "sampler_quality")
    return args


def load_models(cfg, args):
    flags = {
        **su.model_and_diffusion_defaults(),
        **su.classifier_defaults(),
        **model_flags(cfg),
        **classifier_flags(cfg),
    }
    model, _ = load_model("diffusion", argparse.Namespace(**flags), args.model_path)
    classifier, _ = load_model("classifier", argparse.Namespace(**flags), args.classifier_path, "classifier_path")
    return flags, model, classifier, load_judge(cfg, args.judge_path)


def diffusion_for(flags, sampler, nfe, step_schedule):
    """DDPM and DDIM take NFE evenly spaced steps of the schedule; the solvers pick theirs from all steps."""
    respacing = str(nfe) if sampler in ("ddpm", "ddim") else ""
    diffusion = su.diffusion_from_flags({**flags, "timestep_respacing": respacing})
    return diffusion, sample_loop(diffusion, sampler, steps=nfe, step_schedule=step_schedule)


def measure(cfg, flags, model, classifier, judge, reference, sampler, nfe, scale, seed, step_schedule="time"):
    diffusion, loop = diffusion_for(flags, sampler, nfe, step_schedule)
    num = cfg.samples_per_class * len(TOY_CLASSES)
    start = time.perf_counter()
    images, labels = generate(
        diffusion,
        class_conditional_model(model, False),
        num_samples=num,
        batch_size=num,
        image_shape=(3, cfg.image_size, cfg.image_size),
        seed=seed,
        progress=False,
        sample_fn=loop,
        kwargs_for=lambda indices: {"y": draw_labels(indices, seed, len(TOY_CLASSES), "cpu", balanced=True)},
        cond_fn=classifier_cond_fn(classifier, scale) if scale else None,
    )
    seconds = time.perf_counter() - start
    predictions, features = judge_outputs(judge, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fid = float(compute_statistics(features).frechet_distance(reference))
    return dict(
        sampler=sampler,
        nfe=nfe,
        scale=scale,
        accuracy=float((predictions == labels).mean()),
        fid=fid,
        seconds_per_image=seconds / num,
    )


def format_rows(rows):
    lines = [f"{'sampler':<12} {'NFE':>4} {'scale':>5} {'judged as target':>17} {'FID':>7} {'s/image':>8}"]
    lines += [
        f"{r['sampler']:<12} {r['nfe']:>4} {r['scale']:>5g} {r['accuracy']:>16.1%} {r['fid']:>7.2f} "
        f"{r['seconds_per_image']:>8.3f}"
        for r in rows
    ]
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot, the table is in table.txt")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        for scale, style in ((0.0, "--"), (max(r["scale"] for r in rows), "-")):
            sel = [r for r in rows if r["sampler"] == sampler and r["scale"] == scale]
            if not sel:
                continue
            label = f"{sampler}" + (f", scale {scale:g}" if scale else ", unguided")
            for ax, key in zip(axes, ("accuracy", "fid")):
                ax.plot([r["nfe"] for r in sel], [r[key] for r in sel], style, marker="o", label=label)
    for ax, title in zip(axes, ("judged as target class", "FID (judge features)")):
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations per sample")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    args = parse_args()
    cfg = replace(ExperimentConfig(), samples_per_class=args.samples_per_class)
    flags, model, classifier, judge = load_models(cfg, args)
    reference = compute_statistics(judge_outputs(judge, held_out_real(cfg)[1][0])[1])
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for scale in (0.0, args.scale):
        for sampler in args.samplers.split(","):
            for nfe in (int(n) for n in args.nfe.split(",")):
                th.manual_seed(args.seed)
                rows.append(
                    measure(
                        cfg,
                        flags,
                        model,
                        classifier,
                        judge,
                        reference,
                        sampler,
                        nfe,
                        scale,
                        args.seed,
                        args.step_schedule,
                    )
                )
                print(format_rows(rows[-1:]).splitlines()[1], flush=True)
    table = format_rows(rows)
    with open(os.path.join(args.out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(table)
    plot(rows, os.path.join(args.out_dir, "sampler_quality.png"))


if __name__ == "__main__":
    main()
