"""The sampling loops: DDPM, DDIM and DPM-Solver++, as flat functions of one signature.

    sample_X(diffusion, model, noise, *, clip_denoised=True, denoised_fn=None, cond_fn=None,
             model_kwargs=None, progress=False, generator=None, <the sampler's own options>)

start from x_T = noise (see initial_noise) and return the final (N, C, ...) sample;
sample_X_progressive takes the same arguments and yields every step's
{"sample", "pred_xstart", ...}, and sample_X is its last item. All of them run
through one loop, _timestep_loop. The model is called as model(x, t, **model_kwargs)
through diffusion.p_mean_variance, and classifier guidance goes through the
diffusion's condition_mean / condition_score, so a SpacedDiffusion's timestep
mapping applies to every sampler. GaussianDiffusion's p_sample_loop, ddim_sample_loop
and their steps are the original's API over these functions.

generator: where x_T and the per-step noise come from. None draws from torch's
global RNG in the original's order; a torch.Generator draws whole tensors from it;
a list of generators, one per row, draws row i from generator i, so a sample does
not depend on the batch it is in.

References
- DDPM: Ho, Jain & Abbeel 2020 (arXiv 2006.11239).
- DDIM: Song, Meng & Ermon 2021 (arXiv 2010.02502).
- ADM: Dhariwal & Nichol 2021 (arXiv 2105.05233), classifier guidance.
- DPM-Solver++: Lu et al. 2022 (arXiv 2211.01095). The solvers integrate the diffusion ODE (or the reverse
  SDE) in the log-SNR lambda_t = log(alpha_t / sigma_t), alpha_t^2 = alphas_cumprod[t], sigma_t^2 =
  1 - alpha_t^2, with the model's x0 prediction, on the diffusion's own timesteps (any schedule or
  respacing); with order 1 the ODE solver is DDIM (eta = 0). `steps` counts model evaluations, the last
  at t = 0, whose x0 prediction is the output (a final denoising step, as DDIM's last step).
"""

import math

import numpy as np
import torch as th

SOLVERS = {"dpm++2m": (2, False), "dpm++3m": (3, False), "dpm++2m_sde": (2, True)}  # name: (order, sde)
STEP_SCHEDULES = ("logsnr", "time")
LOWER_ORDER_FINAL_BELOW = 15  # below this many steps the last steps drop to lower order (Lu et al. 2022, App. D)


# --------------------------------------------------------------------------- noise


def _randn(shape, device, generator=None):
    """Standard normal noise of `shape` on `device`, drawn as the module docstring says for `generator`."""
    if generator is None:
        return th.randn(*shape, device=device)
    if isinstance(generator, th.Generator):
        return th.randn(*shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [th.randn(*shape[1:], generator=g, device=g.device) for g in generator]
    return th.stack(rows).to(device)


def _noise_like(x, generator):
    return _randn(x.shape, x.device, generator).type(x.dtype)


def _model_device(model, device):
    """An explicit device, else the device of the model's first parameter, else the CPU (plain functions)."""
    if device is not None:
        return device
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else th.device("cpu")


def initial_noise(model, shape, noise=None, device=None, generator=None):
    """x_T of a sampler: `noise` when given, else standard normal of `shape` (default device: the model's)."""
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
    if noise is not None:
        return noise
    return _randn(shape, _model_device(model, device), generator)


def _batch_mask(t, ndim):
    # 1 where t != 0, else 0: no noise is added on the last reverse step. (N, 1, ...)
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _at(values, t, x):
    """values[t] (a float64 (T,) schedule array) as float32 broadcast to x's shape, as the original gathers it."""
    from .gaussian_diffusion import _extract_into_tensor  # not at the top: gaussian_diffusion imports this module

    return _extract_into_tensor(values, t, x.shape)


# --------------------------------------------------------------------------- the one loop


def _timestep_loop(x, timesteps, step, progress):
    """Apply out = step(x, t, i) at timesteps[i], i = 0, 1, ..., yielding each out; out["sample"] is the next x.

    x: x_T, (N, C, ...); timesteps: descending indices of the diffusion; t: (N,) long, all timesteps[i].
    """
    indices = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm  # lazily: only the progress bar needs it

        indices = tqdm(indices)
    for i in indices:
        t = th.full((x.shape[0],), int(timesteps[i]), dtype=th.long, device=x.device)
        with th.no_grad():  # as the original's loops; cond_fn turns gradients back on for itself
            out = step(x, t, i)
        yield out
        x = out["sample"]


def _final(progressive):
    """Run a progressive sampler to its end and return its last sample."""
    final = None
    for out in progressive:
        final = out
    return final["sample"]


def _every_timestep(diffusion):
    return range(diffusion.num_timesteps - 1, -1, -1)


# --------------------------------------------------------------------------- classifier guidance


def mean_guidance(diffusion, cond_fn, p_mean_var, x, t, model_kwargs=None):
    """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al. 2015; ADM, Alg. 1).

    cond_fn(x, t, **model_kwargs) returns that gradient, already scaled. The body of condition_mean.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    gradient = cond_fn(x, diffusion._scale_timesteps(t), **model_kwargs)
    return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()


def score_guidance(diffusion, cond_fn, p_mean_var, x, t, model_kwargs=None):
    """Guide the score: eps' = eps - sqrt(1 - alpha_bar) grad log p(y | x_t) (ADM, Eq. 14; Song et al. 2021).

    Returns a copy of p_mean_var with pred_xstart and mean recomputed from eps'. The body of condition_score.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    alpha_bar = _at(diffusion.alphas_cumprod, t, x)
    eps = diffusion._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
    eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, diffusion._scale_timesteps(t), **model_kwargs)
    out = dict(p_mean_var)
    out["pred_xstart"] = diffusion._predict_xstart_from_eps(x, t, eps)
    out["mean"], _, _ = diffusion.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
    return out


# --------------------------------------------------------------------------- DDPM


def ddpm_step(
    diffusion, model, x, t, *, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, generator=None
):
    """Draw x_{t-1} ~ p(x_{t-1} | x_t) (DDPM, Alg. 2); returns {"sample", "pred_xstart"}, each x's shape."""
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
    )
    # Drawn before cond_fn runs, as the original, so seeded runs give the same samples.
    noise = _noise_like(x, generator)
    if cond_fn is not None:
        # ADM, Alg. 1: mu + Sigma grad log p(y | x_t)
        out["mean"] = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
    sample = out["mean"] + _batch_mask(t, x.ndim) * th.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def sample_ddpm_progressive(
    diffusion,
    model,
    noise,
    *,
    clip_denoised=True,
    denoised_fn=None,
    cond_fn=None,
    model_kwargs=None,
    progress=False,
    generator=None,
):
    """Yield diffusion.p_sample's dict at every timestep, from T-1 down to 0."""

    def step(x, t, _):
        # Through the method, as the original's loop does: a subclass's p_sample (respacing, say) takes part.
        return diffusion.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, generator=generator)

    return _timestep_loop(noise, _every_timestep(diffusion), step, progress)


def sample_ddpm(diffusion, model, noise, **kwargs):
    """DDPM ancestral sampling from x_T = noise: the last sample of sample_ddpm_progressive (same arguments)."""
    return _final(sample_ddpm_progressive(diffusion, model, noise, **kwargs))


# --------------------------------------------------------------------------- DDIM


def ddim_step(
    diffusion,
    model,
    x,
    t,
    *,
    clip_denoised=True,
    denoised_fn=None,
    cond_fn=None,
    model_kwargs=None,
    eta=0.0,
    generator=None,
):
    """Draw x_{t-1} with DDIM (Song et al. 2021, Eq. 12); eta = 1 is DDPM-like, 0 is deterministic."""
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
    )
    if cond_fn is not None:
        out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
    # Recompute eps from the (clipped) x_0 so the two stay consistent.
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar, alpha_bar_prev = _at(diffusion.alphas_cumprod, t, x), _at(diffusion.alphas_cumprod_prev, t, x)
    # DDIM, Eq. 16: sigma_t(eta).
    sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
    noise = _noise_like(x, generator)
    # DDIM, Eq. 12: predicted x_0, direction to x_t, and fresh noise.
    mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    sample = mean_pred + _batch_mask(t, x.ndim) * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_reverse_step(diffusion, model, x, t, *, clip_denoised=True, denoised_fn=None, model_kwargs=None):
    """Step the deterministic DDIM ODE forward, x_t -> x_{t+1} (Song et al. 2021, Sec. 4.3)."""
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
    )
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar_next = _at(diffusion.alphas_cumprod_next, t, x)
    # DDIM, Eq. 12 with sigma = 0, run from t to t + 1.
    mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
    return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}


def sample_ddim_progressive(
    diffusion,
    model,
    noise,
    *,
    clip_denoised=True,
    denoised_fn=None,
    cond_fn=None,
    model_kwargs=None,
    progress=False,
    generator=None,
    eta=0.0,
):
    """Yield diffusion.ddim_sample's dict at every timestep, from T-1 down to 0."""

    def step(x, t, _):
        options = dict(denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)
        return diffusion.ddim_sample(model, x, t, clip_denoised, generator=generator, **options)

    return _timestep_loop(noise, _every_timestep(diffusion), step, progress)


def sample_ddim(diffusion, model, noise, **kwargs):
    """DDIM sampling from x_T = noise: the last sample of sample_ddim_progressive (same arguments)."""
    return _final(sample_ddim_progressive(diffusion, model, noise, **kwargs))


# --------------------------------------------------------------------------- DPM-Solver++: step schedules


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


# --------------------------------------------------------------------------- DPM-Solver++: the data prediction


def dynamic_threshold(percentile):
    """x0 -> x0 clipped to [-s, s] and divided by s, s = max(1, the percentile of |x0| per sample)
    (Saharia et al. 2022, Imagen, Sec. 2.3). Use as denoised_fn with clip_denoised=False."""

    def threshold(x0):
        s = th.quantile(x0.abs().reshape(len(x0), -1).float(), percentile, dim=1).clamp(min=1).to(x0.dtype)
        s = s.view(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s

    return threshold


def predict_x0(diffusion, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs):
    """The model's (clipped, guided) x0 at timesteps t (N,), as the original's DDIM step computes it."""
    out = diffusion.p_mean_variance(
        model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
    )
    if cond_fn is not None:
        # eps' = eps - sqrt(1 - abar) * grad log p(y | x_t) (ADM, Eq. 14), then x0 from eps'
        out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
    return out["pred_xstart"]


# --------------------------------------------------------------------------- DPM-Solver++: steps


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


def _multistep(alphas_cumprod, order, sde, lower_order_final, generator):
    """update(x, x0, i): from step i to step i + 1 of the timesteps whose alphas_cumprod are given, x0 the
    model's prediction at step i; it keeps the earlier predictions the higher orders need."""
    alphas, sigmas = np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)
    lambdas, num_updates = log_snr(alphas_cumprod), len(alphas_cumprod) - 1
    x0s = []  # newest first

    def update(x, x0, i):
        x0s[:] = [x0] + x0s[: order - 1]
        if i == num_updates:
            return x0  # t = 0: the final denoising step
        o = step_order(order, i, num_updates, lower_order_final)
        noise = _noise_like(x, generator) if sde else None
        window = [float(lambdas[i + 1])] + [float(lambdas[i - k]) for k in range(o)]  # target, current, earlier
        # Python floats: a numpy scalar times a tensor would turn the tensor into a numpy array
        return solver_step(x, x0s, window, float(alphas[i + 1]), float(sigmas[i + 1]), float(sigmas[i]), o, sde, noise)

    return update


def sample_dpmpp_progressive(
    diffusion,
    model,
    noise,
    *,
    clip_denoised=True,
    denoised_fn=None,
    cond_fn=None,
    model_kwargs=None,
    progress=False,
    generator=None,
    steps=20,
    order=2,
    sde=False,
    schedule="time",
    lower_order_final=True,
):
    """Yield {"sample", "pred_xstart", "t"} after each of the `steps` model evaluations (DPM-Solver++ of `order`,
    the SDE variant with sde=True, on the step schedule "time" or "logsnr"); the last "sample" is the result."""
    ts = step_timesteps(diffusion.alphas_cumprod, steps, schedule)  # (steps,) descending, ends at 0
    update = _multistep(diffusion.alphas_cumprod[ts], order, sde, lower_order_final, generator)

    def step(x, t, i):
        x0 = predict_x0(diffusion, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        return {"sample": update(x, x0, i), "pred_xstart": x0, "t": int(ts[i])}

    return _timestep_loop(noise, ts, step, progress)


def sample_dpmpp(diffusion, model, noise, **kwargs):
    """DPM-Solver++ from x_T = noise: the last sample of sample_dpmpp_progressive (same arguments)."""
    return _final(sample_dpmpp_progressive(diffusion, model, noise, **kwargs))
