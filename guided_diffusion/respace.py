"""Sampling with fewer steps than training: a diffusion on a subset of timesteps.

Keeping a subset S of the original steps and setting beta_i = 1 - alpha_bar_i /
alpha_bar_{prev in S} defines a shorter process with the same marginals q(x_t | x_0)
at the kept steps (IDDPM, Sec. 4; DDIM, Sec. 4.2).
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    :param num_timesteps: the number of steps of the original process, T.
    :param section_counts: a list of counts, or a string of comma-separated
        counts: T is split into len(counts) equal sections (the first ones one step
        longer when T does not divide), and each section keeps that many steps,
        evenly strided from its first to its last step. "ddimN" instead keeps the
        steps 0, s, 2s, ... for the integer stride s that gives exactly N steps.
        E.g. T=300 with [10, 15, 20] keeps 10 steps of 0..99, 15 of 100..199 and
        20 of 200..299.
    :return: a set of timestep indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, section_counts)
        section_counts = _parse_counts(section_counts)
    sizes = _section_sizes(num_timesteps, len(section_counts))
    steps, start = [], 0
    for size, count in zip(sizes, section_counts):
        steps += [start + offset for offset in _strided_offsets(size, count)]
        start += size
    return set(steps)


def _parse_counts(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"timestep_respacing {text!r} is not valid: use comma-separated step counts like '250' "
            "or '10,15,20', or 'ddimN' like 'ddim25'"
        ) from None


def _ddim_timesteps(num_timesteps, spec):
    desired = int(spec[len("ddim") :])
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot make exactly {desired} steps out of {num_timesteps} with an integer stride "
        f"(timestep_respacing {spec!r}); pick another N or use a plain count like '{desired}'"
    )


def _section_sizes(num_timesteps, num_sections):
    size, extra = divmod(num_timesteps, num_sections)
    return [size + (1 if i < extra else 0) for i in range(num_sections)]


def _strided_offsets(size, count):
    """`count` offsets spread evenly over 0..size-1, both ends included."""
    if count > size or count < 1:
        raise ValueError(
            f"cannot divide a section of {size} steps into {count} (timestep_respacing asks for more steps than exist)"
        )
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    # Python's round (half to even) on the accumulated float, as the original.
    offsets, position = [], 0.0
    for _ in range(count):
        offsets.append(round(position))
        position += stride
    return offsets


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only the timesteps in `use_timesteps`.

    :param use_timesteps: collection of original timestep indices to keep.
    :param kwargs: the GaussianDiffusion arguments of the original process.
    The model always receives original timestep indices (see _WrappedModel).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        alphas_cumprod = GaussianDiffusion(**kwargs).alphas_cumprod
        self.timestep_map = sorted(i for i in self.use_timesteps if 0 <= i < self.original_num_steps)
        if len(self.timestep_map) != len(self.use_timesteps) or not self.timestep_map:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}")
        kwargs["betas"] = np.array(_respaced_betas(alphas_cumprod, self.timestep_map))
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # The wrapped model maps and scales timesteps itself.
        return t


def _respaced_betas(alphas_cumprod, kept):
    """beta_j = 1 - alpha_bar_{k_j} / alpha_bar_{k_{j-1}} over kept steps k (alpha_bar = 1 before the first)."""
    betas, last = [], 1.0
    for i in kept:
        betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return betas


class _WrappedModel:
    """Calls the model with original timestep indices (scaled to 0..1000 if asked)."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
