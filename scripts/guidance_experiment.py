"""The main job: the paper's classifier-guidance experiment, small enough for a laptop (CLI: toy_guidance.py).

On the built-in toy shapes dataset it trains, with the library's own scripts (sibling modules of this file,
called in-process through their main(argv)), a class-unconditional diffusion model, a noisy classifier for
guidance, and a separate classifier on clean images (the judge). It then samples with classifier
guidance at several scales and reports how often the judge recognises each sample
as its target class, how diverse the samples of a class are, and, as the paper
measures, FID, precision and recall against held-out real images (in the judge's
features: Inception's mean little on 16x16 shapes). As in ADM (Sec. 4.3, Fig. 3,
Table 4), a larger scale gives more samples of the target class, less diversity,
higher precision and lower recall.
"""

import argparse
import contextlib
import json
import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace

import classifier_sample
import classifier_train
import image_sample
import image_train
import numpy as np
import torch as th

from guided_diffusion import logger
from guided_diffusion.errors import UsageError, UserError
from guided_diffusion.files import image_grid, save_text, to_uint8_nhwc, uint8_to_float
from guided_diffusion.image_datasets import load_data
from guided_diffusion.metrics import compute_statistics, precision_recall
from guided_diffusion.sampling import load_model
from guided_diffusion.script_util import classifier_and_diffusion_defaults
from guided_diffusion.toy_data import TOY_CLASSES, ensure_toy_dataset

HELD_OUT_PER_CLASS = 256  # held-out real images per class: the "real" row and the FID/precision/recall reference
STEP_LOG = "stdout.txt"  # what a step would have printed, in its own folder


@dataclass(frozen=True)
class ExperimentConfig:
    image_size: int = 16
    num_channels: int = 32
    num_res_blocks: int = 2
    diffusion_steps: int = 1000
    sample_steps: str = "50"  # timestep_respacing of the ddpm and ddim samplers
    sampler: str = "ddpm"  # ddpm, ddim, dpm++2m, dpm++2m_sde, dpm++3m
    sampling_steps: int = 20  # model evaluations of the dpm++ solvers
    train_steps: int = 700
    train_batch: int = 32
    lr: float = 5e-4
    classifier_steps: int = 300
    classifier_batch: int = 32
    judge_steps: int = 150
    samples_per_class: int = 32
    scales: tuple = (0.0, 1.0, 4.0, 10.0)
    seed: int = 0
    mode: str = "classifier"  # "classifier": classifier guidance; "cfg": classifier-free guidance
    p_uncond: float = 0.2  # label dropout of the cfg mode's class-conditional model


CFG_SCALES = (0.0, 1.0, 3.0, 6.0)  # the cfg mode's guidance weights w
MODES = ("classifier", "cfg")


# Tiny sizes that exercise every stage in seconds (the tests run this).
QUICK = dict(
    num_channels=32,
    num_res_blocks=1,
    diffusion_steps=100,
    sample_steps="5",
    train_steps=3,
    train_batch=8,
    classifier_steps=3,
    classifier_batch=8,
    judge_steps=3,
    samples_per_class=2,
    scales=(0.0, 10.0),
)


def model_flags(cfg):
    """The diffusion model's flags: class-unconditional, or (cfg mode) class-conditional with label dropout."""
    flags = dict(
        image_size=cfg.image_size,
        num_channels=cfg.num_channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions="8",
        learn_sigma=True,
        noise_schedule="cosine",
        diffusion_steps=cfg.diffusion_steps,
    )
    if cfg.mode == "cfg":
        flags.update(class_cond=True, num_classes=len(TOY_CLASSES), p_uncond=cfg.p_uncond)
    return flags


def scale_prefix(cfg):
    """What a guidance scale is called in rows and file names: the weight w, or the classifier scale."""
    return "w" if cfg.mode == "cfg" else "scale"


def scale_name(cfg, scale):
    return f"{scale_prefix(cfg)} {scale:g}"


def classifier_flags(cfg):
    return dict(
        image_size=cfg.image_size,
        classifier_width=64,
        classifier_depth=1,
        classifier_attention_resolutions="8,4",
        num_classes=len(TOY_CLASSES),
    )


def cli_args(*flag_dicts, **more):
    """["--name", "value", ...] for the flags of the dicts (later ones win)."""
    merged = {}
    for d in flag_dicts + (more,):
        merged.update(d)
    return [x for k, v in merged.items() for x in (f"--{k}", str(v))]


def run_step(title, main, args, log_dir):
    """Call a script's main(args + --log_dir) in this process and return what it returns. What the script
    prints goes to log_dir/stdout.txt, as its console would show it; the caller's logger is restored after.
    A failing step raises a UserError naming the step and its log (the traceback is in the log)."""
    os.makedirs(log_dir, exist_ok=True)
    log_file = os.path.join(log_dir, STEP_LOG)
    with open(log_file, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            with logger.restored():  # the script's start_run configures its own logger
                return main(list(args) + ["--log_dir", log_dir])
        except Exception as exc:
            traceback.print_exc()
            reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            raise UserError(f"the {title} step failed ({reason}); its log: {log_file}") from exc


def training_steps(cfg):
    """(title, script main, folder name, steps, flags) of each training the mode needs."""
    if cfg.mode == "cfg":
        return [diffusion_training(cfg), judge_training(cfg)]
    return [diffusion_training(cfg), classifier_training(cfg), judge_training(cfg)]


def diffusion_training(cfg):
    kind = (
        f"class-conditional, labels dropped with p = {cfg.p_uncond:g}" if cfg.mode == "cfg" else "class-unconditional"
    )
    args = cli_args(
        model_flags(cfg),
        batch_size=cfg.train_batch,
        lr=cfg.lr,
        lr_anneal_steps=cfg.train_steps,
        save_interval=cfg.train_steps,
        log_interval=50,
        seed=cfg.seed,
    )
    return (f"diffusion model ({kind})", image_train.main, "diffusion", cfg.train_steps, args)


def classifier_training(cfg):
    steps = cfg.classifier_steps
    args = classifier_args(cfg, steps, cfg.seed, noise_schedule="cosine", diffusion_steps=cfg.diffusion_steps)
    return ("noisy classifier (for guidance)", classifier_train.main, "classifier", steps, args)


def judge_training(cfg):
    args = classifier_args(cfg, cfg.judge_steps, cfg.seed + 1, noised=False)
    return ("judge classifier (clean images)", classifier_train.main, "judge", cfg.judge_steps, args)


def classifier_args(cfg, steps, seed, **extra):
    """classifier_train's flags for `steps` steps; `extra` come right after the classifier's shape."""
    return cli_args(
        classifier_flags(cfg),
        **extra,
        iterations=steps,
        batch_size=cfg.classifier_batch,
        lr=3e-4,
        anneal_lr=True,
        save_interval=steps,
        log_interval=50,
        eval_interval=50,
        seed=seed,
    )


def train_all(cfg, out_dir, say):
    """The trainings; returns the checkpoint paths of the diffusion model, the noisy classifier (classifier
    mode only) and the judge."""
    paths = {}
    for title, main, name, n, args in training_steps(cfg):
        start = time.time()
        run_step(f"{title} training", main, args, os.path.join(out_dir, name))
        say(f"trained the {title}: {n} steps in {time.time() - start:.0f} s")
        paths[name] = os.path.join(out_dir, name, f"model{n:06d}.pt")  # the training loop's checkpoint name
    # The raw weights, not the EMA: after a run this short the EMA (rate 0.9999) is still mostly the
    # random initialisation, while the annealed learning rate already leaves the raw weights smooth.
    return paths


def sampler_flags(cfg):
    """The sampling scripts' flags for the configured sampler."""
    if cfg.sampler in ("ddpm", "ddim"):
        return dict(sampler=cfg.sampler, timestep_respacing=cfg.sample_steps)
    return dict(sampler=cfg.sampler, sampling_steps=cfg.sampling_steps)


def sample_at(cfg, paths, scale, log_dir):
    """Guided samples at one scale with image_sample (cfg mode) or classifier_sample; returns the npz path."""
    num = cfg.samples_per_class * len(TOY_CLASSES)
    common = dict(
        model_path=paths["diffusion"],
        num_samples=num,
        batch_size=num,
        balanced_classes=True,
        seed=cfg.seed,
        **sampler_flags(cfg),
    )
    title = f"sampling at {scale_name(cfg, scale)}"
    if cfg.mode == "cfg":
        return run_step(title, image_sample.main, cli_args(model_flags(cfg), cfg_scale=scale, **common), log_dir)
    args = cli_args(
        model_flags(cfg), classifier_flags(cfg), classifier_path=paths["classifier"], classifier_scale=scale, **common
    )
    return run_step(title, classifier_sample.main, args, log_dir)


def sample_all(cfg, paths, out_dir, say):
    """Guided samples at every scale; returns {scale: (images uint8 NHWC, target labels)}."""
    results = {}
    for scale in cfg.scales:
        start = time.time()
        log_dir = os.path.join(out_dir, f"samples_{scale_name(cfg, scale).replace(' ', '')}")
        with np.load(sample_at(cfg, paths, scale, log_dir)) as f:
            results[scale] = (f["arr_0"], f["arr_1"])
        guidance = (
            f"classifier-free guidance {scale_name(cfg, scale)}" if cfg.mode == "cfg" else f"classifier scale {scale:g}"
        )
        say(f"sampled {len(results[scale][0])} images at {guidance} with {cfg.sampler} in {time.time() - start:.0f} s")
    return results


def load_judge(cfg, path):
    flags = {**classifier_and_diffusion_defaults(), **classifier_flags(cfg)}
    model, _ = load_model("classifier", argparse.Namespace(**flags), path, path_flag="judge")
    return model


def judge_outputs(judge, images):
    """The judge's classes (N,) and features (N, C) of uint8 NHWC images, read as clean (t = 0).

    The features are the judge's penultimate activations: the attention pool's
    mean token before its projection to class logits, the role pool_3 plays in
    Inception. FID, precision and recall are measured in them.
    """
    captured = []
    pool = judge.out[-1]
    hook = pool.register_forward_hook(lambda module, args, out: captured.append(pool.pooled(args[0]).float()))
    x = uint8_to_float(images)
    try:
        with th.no_grad():
            logits = judge(x, th.zeros(len(x), dtype=th.long))
    finally:
        hook.remove()
    return logits.argmax(-1).numpy(), captured[0].numpy()


def diversity(images, labels):
    """Mean pairwise RMS distance (pixels in [0, 1]) between images of the same class, averaged over classes."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    means = []
    for c in np.unique(labels):
        group = x[labels == c]
        if len(group) > 1:
            d = np.sqrt(((group[:, None] - group[None]) ** 2).mean(-1))
            means.append(d[np.triu_indices(len(group), 1)].mean())
    return float(np.mean(means))


def held_out_real(cfg):
    """The held-out toy images (another seed than training), split in two disjoint parts.

    Returns ((images, labels) of the "real" row: samples_per_class of each class,
    (images, labels) of the reference set: all the others).
    """
    count = HELD_OUT_PER_CLASS * len(TOY_CLASSES)
    data = load_data(
        data_dir=ensure_toy_dataset(image_size=cfg.image_size, num_per_class=HELD_OUT_PER_CLASS, seed=1),
        batch_size=count,
        image_size=cfg.image_size,
        class_cond=True,
        deterministic=True,
        random_flip=False,
    )
    batch, cond = next(data)
    images, labels = to_uint8_nhwc(batch).numpy(), cond["y"].numpy()
    row = np.concatenate([np.flatnonzero(labels == c)[: cfg.samples_per_class] for c in range(len(TOY_CLASSES))])
    rest = np.setdiff1d(np.arange(count), row)
    return (images[row], labels[row]), (images[rest], labels[rest])


def class_rows_grid(images, labels, per_row):
    """A grid whose row c holds the first per_row samples of target class c."""
    rows = [images[labels == c][:per_row] for c in range(len(TOY_CLASSES))]
    return image_grid(np.concatenate(rows), nrow=per_row)


def table_row(name, judge, images, labels, ref_features, ref_stats):
    """One row: accuracy of the judge on the target classes, diversity, and FID, precision and recall
    (Kynkaanniemi et al. 2019, k = 3) in the judge's features against the held-out reference set."""
    predictions, features = judge_outputs(judge, images)
    with warnings.catch_warnings():  # fewer samples than feature dimensions: a singular covariance, still finite
        warnings.simplefilter("ignore")
        fid = float(compute_statistics(features).frechet_distance(ref_stats))
    precision, recall = precision_recall(ref_features, features, half=False)
    return dict(
        samples=name,
        accuracy=float((predictions == labels).mean()),
        diversity=diversity(images, labels),
        fid=fid,
        precision=precision,
        recall=recall,
    )


def evaluate(cfg, paths, results, out_dir):
    """Rows of the result table, and one PNG grid per scale (rows = target classes)."""
    from PIL import Image

    judge = load_judge(cfg, paths["judge"])
    (real_images, real_labels), (ref_images, _) = held_out_real(cfg)
    ref_features = judge_outputs(judge, ref_images)[1]
    ref_stats = compute_statistics(ref_features)
    rows = [table_row("real (held out)", judge, real_images, real_labels, ref_features, ref_stats)]
    for scale, (images, labels) in results.items():
        rows.append(table_row(scale_name(cfg, scale), judge, images, labels, ref_features, ref_stats))
        grid = class_rows_grid(images, labels, min(cfg.samples_per_class, 8))
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
            os.path.join(out_dir, f"grid_{scale_name(cfg, scale).replace(' ', '')}.png")
        )
    return rows


def format_table(rows):
    lines = [
        f"{'samples':<18} {'judged as target class':>23} {'diversity (RMS)':>16} {'FID':>7} {'precision':>10} "
        f"{'recall':>7}"
    ]
    lines += [
        f"{r['samples']:<18} {r['accuracy']:>22.1%} {r['diversity']:>16.3f} {r['fid']:>7.2f} "
        f"{r['precision']:>10.2f} {r['recall']:>7.2f}"
        for r in rows
    ]
    return "\n".join(lines)


def run_experiment(cfg, out_dir, say=print):
    """Train, sample at every scale, evaluate; writes grids, results.json and table.txt into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    guidance = "classifier-free guidance" if cfg.mode == "cfg" else "classifier guidance"
    say(
        f"main job: {guidance} on the toy shapes ({', '.join(TOY_CLASSES)}) at "
        f"{cfg.image_size}x{cfg.image_size}; outputs in {out_dir}"
    )
    paths = train_all(cfg, out_dir, say)
    results = sample_all(cfg, paths, out_dir, say)
    with logger.scoped_configure(dir=out_dir, format_strs=["log"]):
        rows = evaluate(cfg, paths, results, out_dir)
    table = format_table(rows)
    save_text(os.path.join(out_dir, "table.txt"), table + "\n")
    results_json = {"config": asdict(cfg), "rows": rows, "seconds": time.time() - start}
    save_text(os.path.join(out_dir, "results.json"), json.dumps(results_json, indent=1))
    say(table)
    say(
        f"done in {time.time() - start:.0f} s; grids (rows = target classes "
        f"{', '.join(TOY_CLASSES)}): {out_dir}/grid_{scale_prefix(cfg)}*.png"
    )
    return rows


def config_from_flags(quick=False, **overrides):
    """The configuration: defaults, then the quick sizes, then the given values (None: keep)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("mode", "classifier") not in MODES:
        raise UsageError(f"--mode {overrides['mode']!r}: use one of {', '.join(MODES)}")
    cfg = ExperimentConfig()
    if overrides.get("mode") == "cfg":
        cfg = replace(cfg, scales=CFG_SCALES)
    if quick:
        cfg = replace(cfg, **{**QUICK, "scales": (0.0, 3.0) if overrides.get("mode") == "cfg" else QUICK["scales"]})
    return replace(cfg, **overrides)
