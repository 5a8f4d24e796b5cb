"""Gaussian diffusion: noise schedules, the forward and reverse processes, losses.

References
- DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239).
- IDDPM: Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv 2102.09672).
- DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv 2010.02502).
- ADM: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (arXiv 2105.05233).

Per-timestep constants are float64 numpy arrays; they are gathered into float32
tensors (`_extract_into_tensor`) so numbers match the original implementation.
Shapes: x is (N, C, ...) and t is (N,) of integer timestep indices.
"""

import enum
import math

import numpy as np
import torch as th

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


# --------------------------------------------------------------------------- schedules


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas for a named schedule ("linear" or "cosine") of T steps, float64 (T,)."""
    if schedule_name == "linear":
        # DDPM's 1e-4..0.02 over 1000 steps, scaled so any T spans the same process.
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name!r} (use 'linear' or 'cosine')")


def _cosine_alpha_bar(t):
    # IDDPM, Eq. 17 with s = 0.008; t in [0, 1].
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), clipped at max_beta to
    avoid singularities near t = 1 (IDDPM, Sec. 3.2).
    """
    steps = [(i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps) for i in range(num_diffusion_timesteps)]
    return np.array([min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta) for t1, t2 in steps])


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()  # the network outputs log variance
    FIXED_SMALL = enum.auto()  # posterior variance beta_tilde
    FIXED_LARGE = enum.auto()  # beta (with beta_tilde_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two (IDDPM, Eq. 15)


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE (plus the vb term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE with the vb term rescaled by T / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T, as RESCALED_MSE

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# --------------------------------------------------------------------------- helpers


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather arr[timesteps] into a float32 tensor broadcast to broadcast_shape.

    arr: numpy (T,); timesteps: (N,) long tensor; result: broadcast_shape, whose
    first dimension is N, on the timesteps' device.
    """
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    res = res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim))
    return res.expand(broadcast_shape)


def _batch_mask(t, ndim):
    # 1 where t != 0, else 0: no noise is added on the last reverse step. (N, 1, ...)
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _resolve_device(model, noise, device):
    """Device of an explicit argument, else of the noise, else of the model."""
    if device is not None:
        return device
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else th.device("cpu")


def _randn(shape, device, generator=None):
    """Standard normal noise of `shape`.

    generator None draws from torch's global RNG (the original's behaviour); a
    torch.Generator draws the whole tensor from it; a list of generators, one per
    row, draws row i from generator i, so a sample's noise does not depend on the
    batch it is in.
    """
    if generator is None:
        return th.randn(*shape, device=device)
    if isinstance(generator, th.Generator):
        return th.randn(*shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [th.randn(*shape[1:], generator=g, device=g.device) for g in generator]
    return th.stack(rows).to(device)


def _final(progressive):
    """Run a progressive sampling generator to its end and return its last sample."""
    final = None
    for final in progressive:
        pass
    return final["sample"]


# --------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Utilities for training and sampling diffusion models.

    :param betas: 1-D float64 array of betas for each timestep, in (0, 1].
    :param model_mean_type: a ModelMeanType, what the model outputs.
    :param model_var_type: a ModelVarType, how the variance is chosen.
    :param loss_type: a LossType.
    :param rescale_timesteps: pass timesteps to the model scaled to 0..1000, as
        in DDPM, whatever the number of steps.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with every value in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self._init_forward_constants()
        self._init_posterior_constants()

    def _init_forward_constants(self):
        # alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM, Eq. 4).
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

    def _init_posterior_constants(self):
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # q(x_{t-1} | x_t, x_0): beta_tilde_t (DDPM, Eq. 7).
        self.posterior_variance = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        # beta_tilde_0 = 0, so the log uses beta_tilde_1 at t = 0 instead.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        # mu_tilde_t coefficients of x_0 and x_t (DDPM, Eq. 7).
        self.posterior_mean_coef1 = self.betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ac)

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0) (DDPM, Eq. 4)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (DDPM, Eq. 4)."""
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM, Eqs. 6-7)."""
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ---------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        :param model: called as model(x, scaled_t, **model_kwargs).
        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict of mean, variance, log_variance and pred_xstart, each x's shape.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        model_output, var_values = self._split_model_output(model_output, x)
        variance, log_variance = self._model_variance(var_values, x, t)
        pred_xstart = self._process_xstart(self._predict_xstart(model_output, x, t), clip_denoised, denoised_fn)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = model_output
        else:
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _learns_sigma(self):
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    def _split_model_output(self, model_output, x):
        """(N, 2C, ...) -> mean part and variance part when sigma is learned, else (out, None)."""
        if not self._learns_sigma():
            return model_output, None
        n, c = x.shape[:2]
        expected = (n, c * 2, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"a model with learned sigma must output shape {expected} (2x channels), got "
                f"{tuple(model_output.shape)}; check learn_sigma"
            )
        return th.split(model_output, c, dim=1)

    def _model_variance(self, var_values, x, t):
        """Variance and log variance of p(x_{t-1} | x_t), each x's shape."""
        if self.model_var_type == ModelVarType.LEARNED:
            return th.exp(var_values), var_values
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            # IDDPM, Eq. 15: interpolate log variance between beta_tilde and beta, v in [-1, 1].
            min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return th.exp(log_variance), log_variance
        variance, log_variance = self._fixed_variance()
        return _extract_into_tensor(variance, t, x.shape), _extract_into_tensor(log_variance, t, x.shape)

    def _fixed_variance(self):
        if self.model_var_type == ModelVarType.FIXED_SMALL:
            return self.posterior_variance, self.posterior_log_variance_clipped
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta_t, with beta_tilde_1 at t = 0 for a better decoder log-likelihood (DDPM, Sec. 3.2).
            variance = np.append(self.posterior_variance[1], self.betas[1:])
            return variance, np.log(variance)
        raise NotImplementedError(self.model_var_type)

    def _predict_xstart(self, model_output, x, t):
        """The model's x_0 prediction, whichever quantity it outputs."""
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            return self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
        if self.model_mean_type == ModelMeanType.START_X:
            return model_output
        if self.model_mean_type == ModelMeanType.EPSILON:
            return self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        raise NotImplementedError(self.model_mean_type)

    @staticmethod
    def _process_xstart(x, clip_denoised, denoised_fn):
        if denoised_fn is not None:
            x = denoised_fn(x)
        return x.clamp(-1, 1) if clip_denoised else x

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # Invert q_sample: x_0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps (DDPM, Eq. 4).
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean: x_0 = (mu - coef2 x_t) / coef1 (DDPM, Eq. 7).
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # The same relation as _predict_xstart_from_eps, solved for eps.
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ---------------------------------------------------------------- guidance

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al. 2015; ADM, Alg. 1).

        cond_fn(x, t, **model_kwargs) returns that gradient, already scaled.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guide the score: eps' = eps - sqrt(1 - alpha_bar) grad log p(y | x_t) (ADM, Eq. 14; Song et al. 2021).

        Returns a copy of p_mean_var with pred_xstart and mean recomputed from eps'.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ---------------------------------------------------------------- DDPM sampling

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, *,
                 generator=None):
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (DDPM, Alg. 2). Returns dict of sample and pred_xstart.

        :param generator: where the noise comes from (see _randn); beyond the original.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        # Drawn before cond_fn runs, as the original, so seeded runs give the same samples.
        noise = _randn(x.shape, x.device, generator).type(x.dtype)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _batch_mask(t, x.ndim) * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, *, generator=None):
        """Sample from the model with DDPM ancestral sampling; returns the final (N, C, ...) batch."""
        return _final(self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, generator=generator,
        ))

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, *, generator=None):
        """Yield the output dict of p_sample at every step, from t = T-1 down to 0."""
        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 cond_fn=cond_fn, model_kwargs=model_kwargs, generator=generator)

        return self._reverse_loop(step, shape, noise, _resolve_device(model, noise, device), progress, generator)

    def _reverse_loop(self, step, shape, noise, device, progress, generator):
        """The loop shared by every sampler: start from noise, apply step(x, t) for t = T-1..0."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        x = noise if noise is not None else _randn(shape, device, generator)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # lazily: only the progress bar needs it

            indices = tqdm(indices)
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    # ---------------------------------------------------------------- DDIM sampling

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, *, generator=None):
        """Draw x_{t-1} with DDIM (Song et al. 2021, Eq. 12); eta = 1 is DDPM-like, 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Recompute eps from the (clipped) x_0 so the two stay consistent.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        # DDIM, Eq. 16: sigma_t(eta).
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = _randn(x.shape, x.device, generator).type(x.dtype)
        # DDIM, Eq. 12: predicted x_0, direction to x_t, and fresh noise.
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + _batch_mask(t, x.ndim) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Step the deterministic DDIM ODE forward, x_t -> x_{t+1} (Song et al. 2021, Sec. 4.3)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample follows the deterministic ODE only: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, *, generator=None):
        """Sample from the model with DDIM; returns the final (N, C, ...) batch."""
        return _final(self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
        ))

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0, *,
                                     generator=None):
        """Yield the output dict of ddim_sample at every step, from t = T-1 down to 0."""
        def step(x, t):
            return self.ddim_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, generator=generator)

        return self._reverse_loop(step, shape, noise, _resolve_device(model, noise, device), progress, generator)

    # ---------------------------------------------------------------- losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension (DDPM, Eq. 5).

        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
        discretised decoder NLL L_0 at t = 0. Returns dict of output (N,) and pred_xstart.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Training losses for one batch (DDPM, Eq. 14; IDDPM, Eq. 16 for the hybrid loss).

        :return: dict of (N,) tensors: "loss" always; "mse" and, with learned
            sigma, "vb" for the MSE losses.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss_type.is_vb():
            return self._vb_losses(model, x_start, x_t, t, model_kwargs)
        if self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            return self._mse_losses(model, x_start, x_t, t, noise, model_kwargs)
        raise NotImplementedError(self.loss_type)

    def _vb_losses(self, model, x_start, x_t, t, model_kwargs):
        loss = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
        if self.loss_type == LossType.RESCALED_KL:
            loss = loss * self.num_timesteps
        return {"loss": loss}

    def _mse_losses(self, model, x_start, x_t, t, noise, model_kwargs):
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        model_output, var_values = self._split_model_output(model_output, x_t)
        terms = {}
        if var_values is not None:
            terms["vb"] = self._hybrid_vb_term(model_output, var_values, x_start, x_t, t)
        target = self._mse_target(x_start, x_t, t, noise)
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _hybrid_vb_term(self, model_output, var_values, x_start, x_t, t):
        """L_vb trained for the variance only: the mean is a stop-gradient (IDDPM, Sec. 3.1)."""
        frozen_out = th.cat([model_output.detach(), var_values], dim=1)
        vb = self._vb_terms_bpd(lambda *args, r=frozen_out: r, x_start, x_t, t, clip_denoised=False)["output"]
        if self.loss_type == LossType.RESCALED_MSE:
            # The original weighted L_vb by T/1000 so lambda = 0.001 holds for T = 1000 (IDDPM, Eq. 16).
            vb = vb * (self.num_timesteps / 1000.0)
        return vb

    def _mse_target(self, x_start, x_t, t, noise):
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            return self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        if self.model_mean_type == ModelMeanType.START_X:
            return x_start
        if self.model_mean_type == ModelMeanType.EPSILON:
            return noise
        raise NotImplementedError(self.model_mean_type)

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (N,); not trainable (DDPM, L_T)."""
        t = th.full((x_start.shape[0],), self.num_timesteps - 1, dtype=th.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dimension, and per-step errors.

        :return: dict of total_bpd (N,), prior_bpd (N,), and vb, xstart_mse, mse
            each (N, T) in loop order: column j holds timestep T-1-j.
        """
        terms = {"vb": [], "xstart_mse": [], "mse": []}
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = th.tensor([t] * x_start.shape[0], device=x_start.device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t_batch,
                                         clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            terms["vb"].append(out["output"])
            terms["xstart_mse"].append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            terms["mse"].append(mean_flat((eps - noise) ** 2))
        # Stacked in loop order (t = T-1 first), as the original does.
        result = {k: th.stack(v, dim=1) for k, v in terms.items()}
        result["prior_bpd"] = self._prior_bpd(x_start)
        result["total_bpd"] = result["vb"].sum(dim=1) + result["prior_bpd"]
        return {k: result[k] for k in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")}
