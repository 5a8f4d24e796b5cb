"""Fast samplers: DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) on the diffusion's discrete schedule.

The solvers integrate the diffusion ODE (or, for the SDE variant, the reverse SDE)
in the log-SNR variable lambda_t = log(alpha_t / sigma_t), with alpha_t^2 =
alphas_cumprod[t] and sigma_t^2 = 1 - alpha_t^2, using the model's prediction of
the clean image x0 (the "data prediction"). They only visit the diffusion's own
timesteps (any schedule, any respacing), so the model sees the integer timesteps
it was trained on, and they get x0 from `p_mean_variance` and classifier guidance
from `condition_score`, exactly as the original's DDIM does: eps- and
x0-predicting models, learned variances (ignored by the ODE), clip_denoised and
cond_fn keep their meaning. With order 1 the ODE solver is DDIM (eta = 0).

Each sampler takes `steps` model evaluations: the last one is at t = 0, whose x0
prediction is the output (a final denoising step, as DDIM's last step).

The math imports only torch and numpy.
"""

import math

import numpy as np
import torch as th

from .gaussian_diffusion import _final, _randn, _resolve_device

SOLVERS = {"dpm++2m": (2, False), "dpm++3m": (3, False), "dpm++2m_sde": (2, True)}  # name: (order, sde)
STEP_SCHEDULES = ("logsnr", "time")
LOWER_ORDER_FINAL_BELOW = 15  # below this many steps the last steps drop to lower order (Lu et al. 2022, App. D)


# --------------------------------------------------------------------------- step schedules


def log_snr(alphas_cumprod):
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(abar_t / (1 - abar_t)) for each discrete timestep."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def step_timesteps(alphas_cumprod, steps, schedule="time"):
    """`steps` distinct timesteps of the diffusion, from the last (T - 1) down to 0, as int64 (steps,).

    "time": uniform in t. "logsnr": uniform in lambda_t (Lu et al. 2022a, Sec. 3.3),
    each point rounded to the timestep of nearest lambda, pushed apart where two
    would coincide (near t = 0 lambda changes fastest).
    """
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"the solver needs 1 to {num_timesteps} steps (the diffusion's timesteps), got {steps}")
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {schedule!r}: use one of {', '.join(STEP_SCHEDULES)}")
    if steps == 1:
        return np.array([num_timesteps - 1])
    if schedule == "time":
        ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    else:
        lam = log_snr(alphas_cumprod)  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], steps)[::-1]  # increasing lambda target for t ascending
        ts = np.array([int(np.argmin(np.abs(lam - target))) for target in targets])
        ts[0], ts[-1] = 0, num_timesteps - 1
    return _strictly_increasing(ts, num_timesteps)[::-1].copy()


def _strictly_increasing(ts, num_timesteps):
    ts = np.array(ts, dtype=np.int64)
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in range(len(ts) - 1, -1, -1):  # pushed past the end: pull back from the top
        ts[i] = min(ts[i], num_timesteps - len(ts) + i)
    return ts


# --------------------------------------------------------------------------- the data prediction


def dynamic_threshold(percentile):
    """x0 -> x0 clipped to [-s, s] and divided by s, s = max(1, the percentile of |x0| per sample)
    (Saharia et al. 2022, Imagen, Sec. 2.3). Use as denoised_fn with clip_denoised=False."""

    def threshold(x0):
        s = th.quantile(x0.abs().reshape(len(x0), -1).float(), percentile, dim=1).clamp(min=1).to(x0.dtype)
        s = s.view(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s

    return threshold


def predict_x0(diffusion, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs):
    """The model's (clipped, guided) x0 at timestep index t, as the original's DDIM step computes it."""
    t_batch = th.full((x.shape[0],), int(t), device=x.device, dtype=th.long)
    out = diffusion.p_mean_variance(model, x, t_batch, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    model_kwargs=model_kwargs)
    if cond_fn is not None:
        # eps' = eps - sqrt(1 - abar) * grad log p(y | x_t) (ADM, Eq. 14), then x0 from eps'
        out = diffusion.condition_score(cond_fn, out, x, t_batch, model_kwargs=model_kwargs)
    return out["pred_xstart"]


# --------------------------------------------------------------------------- solver steps


def solver_step(x, x0s, lambdas, alpha_t, sigma_t, sigma_s, order, sde=False, noise=None):
    """One DPM-Solver++ multistep update from s (the current time) to t.

    x0s: the data predictions at s, s-1, ... (newest first), lambdas: log-SNR at t
    then at those times. Orders 1-3 of the ODE solver (Lu et al. 2022, Eq. 8 and
    Alg. 2; third order as their multistep DPM-Solver-3), and orders 1-2 of the
    SDE solver (Lu et al. 2022, App. B: x_t = (sigma_t/sigma_s) e^-h x_s +
    alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z).
    """
    h = lambdas[0] - lambdas[1]
    if sde:
        decay = sigma_t / sigma_s * math.exp(-h)
        phi = -math.expm1(-2.0 * h)  # 1 - e^-2h
        update = decay * x + alpha_t * phi * x0s[0] + sigma_t * math.sqrt(phi) * noise
        if order >= 2:
            r = (lambdas[1] - lambdas[2]) / h
            update = update + 0.5 * alpha_t * phi * (x0s[0] - x0s[1]) / r
        return update
    phi_1 = -math.expm1(-h)  # 1 - e^-h
    update = sigma_t / sigma_s * x + alpha_t * phi_1 * x0s[0]  # order 1: DDIM
    if order == 2:
        r = (lambdas[1] - lambdas[2]) / h
        update = update + 0.5 * alpha_t * phi_1 * (x0s[0] - x0s[1]) / r  # D = (1 + 1/2r) x0_s - (1/2r) x0_s-1
    elif order == 3:
        r0, r1 = (lambdas[1] - lambdas[2]) / h, (lambdas[2] - lambdas[3]) / h
        d1_0, d1_1 = (x0s[0] - x0s[1]) / r0, (x0s[1] - x0s[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h - 1  # (1 - e^-h)/h - 1
        phi_3 = phi_2 / h + 0.5  # ((1 - e^-h)/h - 1)/h + 1/2
        update = update - alpha_t * phi_2 * d1 + alpha_t * phi_3 * d2
    return update


def step_order(order, index, num_updates, lower_order_final=True):
    """The order of update `index` (0-based) of num_updates: warm up from 1 (too few earlier x0s).

    With lower_order_final, the last update (into t = 0) is first order: on the
    discrete schedule it spans the largest log-SNR gap (lambda rises steeply over
    the last timesteps), where extrapolating from the previous, much shorter step
    amplifies the error. Short runs (under 15 updates) also lower the ones before
    it, as Lu et al. (2022, App. D) do, so that 10 or fewer steps stay stable.
    """
    o = min(order, index + 1)
    left = num_updates - index  # updates left, this one included
    if lower_order_final:
        o = min(o, left) if num_updates < LOWER_ORDER_FINAL_BELOW else (1 if left == 1 else o)
    return o


# --------------------------------------------------------------------------- the sampling loop


def dpm_solver_sample_loop_progressive(diffusion, model, shape, *, steps=20, order=2, sde=False, schedule="time",
                                       noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                       model_kwargs=None, device=None, progress=False, generator=None,
                                       lower_order_final=True):
    """Yield {"sample", "pred_xstart", "t"} after each model evaluation; the last "sample" is the result.

    generator: where x_T and the SDE noise come from (None: torch's global RNG; a
    list: one generator per sample, so a sample does not depend on its batch).
    """
    device = _resolve_device(model, noise, device)
    ts = step_timesteps(diffusion.alphas_cumprod, steps, schedule)  # (steps,) descending, ends at 0
    abar = diffusion.alphas_cumprod[ts]
    # Python floats: a numpy scalar times a tensor would turn the tensor into a numpy array
    alphas, sigmas, lambdas = [float(a) for a in np.sqrt(abar)], [float(s) for s in np.sqrt(1.0 - abar)], log_snr(abar)
    x = noise if noise is not None else _randn(shape, device, generator)
    x0s = []
    indices = range(len(ts))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    for i in indices:
        with th.no_grad():  # as the original's loops; cond_fn turns gradients back on for itself
            x0 = predict_x0(diffusion, model, x, ts[i], clip_denoised, denoised_fn, cond_fn, model_kwargs)
            x0s = [x0] + x0s[: order - 1]
            if i == len(ts) - 1:
                x = x0  # t = 0: the final denoising step
            else:
                o = step_order(order, i, len(ts) - 1, lower_order_final)
                z = _randn(x.shape, x.device, generator).type(x.dtype) if sde else None
                x = solver_step(x, x0s, _lambda_window(lambdas, i, o), alphas[i + 1], sigmas[i + 1], sigmas[i], o,
                                sde, z)
        yield {"sample": x, "pred_xstart": x0, "t": int(ts[i])}


def _lambda_window(lambdas, i, order):
    """[lambda at the target, at the current time, at the previous ones], as many as the order needs."""
    return [float(lambdas[i + 1])] + [float(lambdas[i - k]) for k in range(order)]


def dpm_solver_sample_loop(diffusion, model, shape, **kwargs):
    """The final sample of dpm_solver_sample_loop_progressive."""
    return _final(dpm_solver_sample_loop_progressive(diffusion, model, shape, **kwargs))
