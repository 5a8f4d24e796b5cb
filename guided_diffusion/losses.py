"""The variational bound (Ho et al. 2020, Sec. 3.3; Eq. 5): Gaussian KLs, the discretised decoder
likelihood, and a diffusion's bound in bits per dimension.

The bits/dim functions take a GaussianDiffusion (any object with its q_* / p_mean_variance
API) and are the bodies of its _vb_terms_bpd, _prior_bpd and calc_bpd_loop.
"""

import numpy as np
import torch as th

from .nn import mean_flat


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise.

    Scalars are accepted for any argument but at least one must be a tensor.
    KL of two Gaussians: 0.5 * (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^(-lv2)).
    """
    ref = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, th.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (x if isinstance(x, th.Tensor) else th.tensor(x).to(ref) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Tanh approximation of the standard normal CDF (Page 1977)."""
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of images in [-1, 1] quantised to 256 bins (Ho et al. 2020, Eq. 13).

    Each pixel gets the Gaussian mass of its bin of width 2/255; the edge bins
    extend to -inf and +inf. All arguments have the same shape; returns log probs
    in nats of that shape.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return th.where(x < -0.999, log_cdf_plus, th.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# --------------------------------------------------------------------------- bits per dimension


def _bits(nats):
    """Per-sample mean over all but the batch dimension, from nats to bits: (N, ...) -> (N,)."""
    return mean_flat(nats) / np.log(2.0)


def vb_terms_bpd(diffusion, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
    """One term of the variational bound, in bits per dimension (DDPM, Eq. 5).

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
    discretised decoder NLL L_0 at t = 0. Returns dict of output (N,) and pred_xstart.
    """
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    kl = _bits(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = _bits(
        -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    )
    return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}


def prior_bpd(diffusion, x_start):
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (N,); not trainable (DDPM, L_T)."""
    t = th.full((x_start.shape[0],), diffusion.num_timesteps - 1, dtype=th.long, device=x_start.device)
    qt_mean, _, qt_log_variance = diffusion.q_mean_variance(x_start, t)
    return _bits(normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0))


def variational_bound_bpd(diffusion, model, x_start, clip_denoised=True, model_kwargs=None):
    """The whole variational bound in bits per dimension, and per-step errors (the original's calc_bpd_loop).

    :return: dict of total_bpd (N,), prior_bpd (N,), and vb, xstart_mse, mse
        each (N, T) in loop order: column j holds timestep T-1-j.
    """
    terms = {"vb": [], "xstart_mse": [], "mse": []}
    for t in range(diffusion.num_timesteps - 1, -1, -1):
        t_batch = th.tensor([t] * x_start.shape[0], device=x_start.device)
        noise = th.randn_like(x_start)
        x_t = diffusion.q_sample(x_start=x_start, t=t_batch, noise=noise)
        with th.no_grad():
            out = vb_terms_bpd(diffusion, model, x_start, x_t, t_batch, clip_denoised, model_kwargs)
        eps = diffusion._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
        terms["vb"].append(out["output"])
        terms["xstart_mse"].append(mean_flat((out["pred_xstart"] - x_start) ** 2))
        terms["mse"].append(mean_flat((eps - noise) ** 2))
    # Stacked in loop order (t = T-1 first), as the original does.
    result = {k: th.stack(v, dim=1) for k, v in terms.items()}
    result["prior_bpd"] = prior_bpd(diffusion, x_start)
    result["total_bpd"] = result["vb"].sum(dim=1) + result["prior_bpd"]
    return {k: result[k] for k in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")}
