"""Evaluation: bits/dim of a model on data (image_nll.py)."""

import os

import numpy as np

from . import dist_util, logger
from .files import save_npz

BPD_TERMS = ("vb", "mse", "xstart_mse")


def run_bpd_evaluation(model, diffusion, data, num_samples, clip_denoised):
    """Bits per dimension of num_samples images (over all ranks) through calc_bpd_loop.

    Logs running means of total, prior, vb and mse after each batch. Returns the
    mean of each per-timestep term over images ({"vb": (T,), ...}) and the mean
    total and prior bits/dim.
    """
    totals, priors, terms = [], [], {k: [] for k in BPD_TERMS}
    num_complete = 0
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        for key in BPD_TERMS:
            terms[key].append(dist_util.mean_over_ranks(metrics[key].mean(dim=0)).cpu().numpy())
        totals.append(dist_util.mean_over_ranks(metrics["total_bpd"].mean()).item())
        priors.append(dist_util.mean_over_ranks(metrics["prior_bpd"].mean()).item())
        num_complete += dist_util.get_world_size() * batch.shape[0]
        vb, mse = np.mean([t.sum() for t in terms["vb"]]), np.mean([t.mean() for t in terms["mse"]])
        logger.log(
            f"done {num_complete} samples: bpd={np.mean(totals):.4f} prior={np.mean(priors):.4f} "
            f"vb={vb:.4f} mse={mse:.4f}"
        )
    means = {k: np.mean(np.stack(v), axis=0) for k, v in terms.items()}
    return means, float(np.mean(totals)), float(np.mean(priors))


def save_bpd_terms(means, out_dir):
    """{name}_terms.npz per term (arr_0: its mean per timestep, loop order as calc_bpd_loop), on rank 0."""
    paths = []
    if dist_util.is_main_process():
        for name, value in means.items():
            path = os.path.join(out_dir, f"{name}_terms.npz")
            save_npz(path, value)
            logger.log(f"saving {name} terms to {path}")
            paths.append(path)
    dist_util.barrier()
    return paths
