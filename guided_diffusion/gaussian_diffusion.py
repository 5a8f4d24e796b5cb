"""Gaussian diffusion: noise schedules, the forward and reverse processes, losses.

References
- DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239).
- IDDPM: Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv 2102.09672).
- DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv 2010.02502).
- ADM: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (arXiv 2105.05233).

Per-timestep constants are float64 numpy arrays; they are gathered into float32
tensors (`_extract_into_tensor`) so numbers match the original implementation.
Shapes: x is (N, C, ...) and t is (N,) of integer timestep indices.

GaussianDiffusion holds the schedule, the forward process and the model's reverse
step p(x_{t-1} | x_t); its sampling methods are the original's API over the flat
functions of samplers.py, its bits/dim methods over those of losses.py.
"""

import enum
import functools
import math

import numpy as np
import torch as th

from .losses import prior_bpd, variational_bound_bpd, vb_terms_bpd
from .nn import mean_flat
from .samplers import (
    _final,
    ddim_reverse_step,
    ddim_step,
    ddpm_step,
    initial_noise,
    mean_guidance,
    sample_ddim_progressive,
    sample_ddpm_progressive,
    score_guidance,
)

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


# --------------------------------------------------------------------------- the model's output


def _split_model_output(diffusion, model_output, x):
    """(N, 2C, ...) -> mean part and variance part when sigma is learned, else (model_output, None)."""
    if diffusion.model_var_type not in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
        return model_output, None
    n, c = x.shape[:2]
    expected = (n, c * 2, *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"a model with learned sigma must output shape {expected} (2x channels), got "
            f"{tuple(model_output.shape)}; check learn_sigma"
        )
    return th.split(model_output, c, dim=1)


def _model_variance(diffusion, var_values, x, t):
    """Variance and log variance of p(x_{t-1} | x_t), each x's shape."""
    if diffusion.model_var_type == ModelVarType.LEARNED:
        return th.exp(var_values), var_values
    if diffusion.model_var_type == ModelVarType.LEARNED_RANGE:
        # IDDPM, Eq. 15: interpolate log variance between beta_tilde and beta, v in [-1, 1].
        min_log = _extract_into_tensor(diffusion.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract_into_tensor(np.log(diffusion.betas), t, x.shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        return th.exp(log_variance), log_variance
    variance, log_variance = _fixed_variance(diffusion)
    return _extract_into_tensor(variance, t, x.shape), _extract_into_tensor(log_variance, t, x.shape)


def _fixed_variance(diffusion):
    """The (T,) variance and log variance of a fixed-variance model."""
    if diffusion.model_var_type == ModelVarType.FIXED_SMALL:
        return diffusion.posterior_variance, diffusion.posterior_log_variance_clipped
    if diffusion.model_var_type == ModelVarType.FIXED_LARGE:
        # beta_t, with beta_tilde_1 at t = 0 for a better decoder log-likelihood (DDPM, Sec. 3.2).
        variance = np.append(diffusion.posterior_variance[1], diffusion.betas[1:])
        return variance, np.log(variance)
    raise NotImplementedError(diffusion.model_var_type)


def _predict_xstart(diffusion, model_output, x, t):
    """The model's x_0 prediction, whichever quantity it outputs."""
    if diffusion.model_mean_type == ModelMeanType.PREVIOUS_X:
        return diffusion._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return model_output
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        return diffusion._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
    raise NotImplementedError(diffusion.model_mean_type)


def _process_xstart(x, clip_denoised, denoised_fn):
    if denoised_fn is not None:
        x = denoised_fn(x)
    return x.clamp(-1, 1) if clip_denoised else x


# --------------------------------------------------------------------------- diffusion


def _schedule_arrays(betas):
    """The per-timestep float64 (T,) arrays of the forward process and the posterior, by attribute name."""
    ac = np.cumprod(1.0 - betas, axis=0)  # alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM, Eq. 4)
    ac_prev, ac_next = np.append(1.0, ac[:-1]), np.append(ac[1:], 0.0)
    # q(x_{t-1} | x_t, x_0): variance beta_tilde_t (DDPM, Eq. 7)
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return dict(
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        alphas_cumprod_next=ac_next,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=posterior_variance,
        # beta_tilde_0 = 0, so the log uses beta_tilde_1 at t = 0 instead.
        posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        # mu_tilde_t's coefficients of x_0 and x_t (DDPM, Eq. 7)
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
    )


def _options(clip_denoised, denoised_fn, cond_fn, model_kwargs, **more):
    """The keyword options every sampler of samplers.py shares, from the original's positional arguments."""
    return dict(
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, **more
    )


def _last_sample_of(progressive):
    """A method with the arguments of the progressive loop method that runs it to its end and returns the
    last sample. It calls the loop through self, so a subclass's override of it is used."""

    def loop(self, *args, **kwargs):
        return _final(getattr(self, progressive.__name__)(*args, **kwargs))

    functools.update_wrapper(loop, progressive)  # its signature, for help() and inspect
    loop.__name__ = progressive.__name__.replace("_progressive", "")
    loop.__qualname__ = progressive.__qualname__.replace("_progressive", "")
    loop.__doc__ = f"Sample with {loop.__name__}; returns the final batch, the last of {progressive.__name__}."
    return loop


class GaussianDiffusion:
    """Utilities for training and sampling diffusion models.

    :param betas: 1-D float64 array of betas for each timestep, in (0, 1].
    :param model_mean_type: a ModelMeanType, what the model outputs.
    :param model_var_type: a ModelVarType, how the variance is chosen.
    :param loss_type: a LossType.
    :param rescale_timesteps: pass timesteps to the model scaled to 0..1000, as in DDPM, whatever the number of steps.
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
        # alphas_cumprod, the posterior's coefficients, ...: the float64 (T,) arrays the original keeps.
        vars(self).update(_schedule_arrays(betas))

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
        model_output, var_values = _split_model_output(self, model_output, x)
        variance, log_variance = _model_variance(self, var_values, x, t)
        pred_xstart = _process_xstart(_predict_xstart(self, model_output, x, t), clip_denoised, denoised_fn)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = model_output
        else:
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

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
        """The mean shifted by variance * grad log p(y | x_t): samplers.mean_guidance."""
        return mean_guidance(self, cond_fn, p_mean_var, x, t, model_kwargs)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_var with x_0 and the mean from the guided score: samplers.score_guidance."""
        return score_guidance(self, cond_fn, p_mean_var, x, t, model_kwargs)

    # ---------------------------------------------------------------- sampling (see samplers.py)

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, *, generator=None
    ):
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (DDPM, Alg. 2): samplers.ddpm_step. generator: beyond the original."""
        options = _options(clip_denoised, denoised_fn, cond_fn, model_kwargs)
        return ddpm_step(self, model, x, t, generator=generator, **options)

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        generator=None,
    ):
        """Yield p_sample's dict at every step, from t = T-1 down to 0: samplers.sample_ddpm_progressive."""
        x_T = initial_noise(model, shape, noise, device, generator)  # (N, C, H, W)
        options = _options(clip_denoised, denoised_fn, cond_fn, model_kwargs, progress=progress)
        yield from sample_ddpm_progressive(self, model, x_T, generator=generator, **options)

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        *,
        generator=None,
    ):
        """Draw x_{t-1} with DDIM (Song et al. 2021, Eq. 12): samplers.ddim_step."""
        options = _options(clip_denoised, denoised_fn, cond_fn, model_kwargs, eta=eta)
        return ddim_step(self, model, x, t, generator=generator, **options)

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Step the deterministic DDIM ODE forward, x_t -> x_{t+1}: samplers.ddim_reverse_step."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample follows the deterministic ODE only: eta must be 0")
        options = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        return ddim_reverse_step(self, model, x, t, **options)

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        generator=None,
    ):
        """Yield ddim_sample's dict at every step, from t = T-1 down to 0: samplers.sample_ddim_progressive."""
        x_T = initial_noise(model, shape, noise, device, generator)  # (N, C, H, W)
        options = _options(clip_denoised, denoised_fn, cond_fn, model_kwargs, progress=progress, eta=eta)
        yield from sample_ddim_progressive(self, model, x_T, generator=generator, **options)

    # The plain loops take the progressive ones' arguments and return their final batch (N, C, ...).
    p_sample_loop = _last_sample_of(p_sample_loop_progressive)
    ddim_sample_loop = _last_sample_of(ddim_sample_loop_progressive)

    # ---------------------------------------------------------------- losses (see below and losses.py)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Training losses for one batch: dict of (N,) tensors (training_loss_terms)."""
        return training_loss_terms(self, model, x_start, t, model_kwargs, noise)

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits/dim: losses.vb_terms_bpd."""
        return vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised, model_kwargs)

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim: losses.prior_bpd."""
        return prior_bpd(self, x_start)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits/dim, and per-step errors: losses.variational_bound_bpd."""
        return variational_bound_bpd(self, model, x_start, clip_denoised, model_kwargs)


# --------------------------------------------------------------------------- training losses


def training_loss_terms(diffusion, model, x_start, t, model_kwargs=None, noise=None):
    """Training losses for one batch (DDPM, Eq. 14; IDDPM, Eq. 16 for the hybrid loss).

    :return: dict of (N,) tensors: "loss" always; "mse" and, with learned
        sigma, "vb" for the MSE losses.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    if noise is None:
        noise = th.randn_like(x_start)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    if diffusion.loss_type.is_vb():
        loss = vb_terms_bpd(diffusion, model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
        if diffusion.loss_type == LossType.RESCALED_KL:
            loss = loss * diffusion.num_timesteps
        return {"loss": loss}
    if diffusion.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
        return _mse_losses(diffusion, model, x_start, x_t, t, noise, model_kwargs)
    raise NotImplementedError(diffusion.loss_type)


def _mse_losses(diffusion, model, x_start, x_t, t, noise, model_kwargs):
    model_output = model(x_t, diffusion._scale_timesteps(t), **model_kwargs)
    model_output, var_values = _split_model_output(diffusion, model_output, x_t)
    terms = {}
    if var_values is not None:
        terms["vb"] = _hybrid_vb_term(diffusion, model_output, var_values, x_start, x_t, t)
    target = _mse_target(diffusion, x_start, x_t, t, noise)
    terms["mse"] = mean_flat((target - model_output) ** 2)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


def _hybrid_vb_term(diffusion, model_output, var_values, x_start, x_t, t):
    """L_vb trained for the variance only: the mean is a stop-gradient (IDDPM, Sec. 3.1)."""
    frozen_out = th.cat([model_output.detach(), var_values], dim=1)
    vb = vb_terms_bpd(diffusion, lambda *args, r=frozen_out: r, x_start, x_t, t, clip_denoised=False)["output"]
    if diffusion.loss_type == LossType.RESCALED_MSE:
        # The original weighted L_vb by T/1000 so lambda = 0.001 holds for T = 1000 (IDDPM, Eq. 16).
        vb = vb * (diffusion.num_timesteps / 1000.0)
    return vb


def _mse_target(diffusion, x_start, x_t, t, noise):
    if diffusion.model_mean_type == ModelMeanType.PREVIOUS_X:
        return diffusion.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return x_start
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        return noise
    raise NotImplementedError(diffusion.model_mean_type)
