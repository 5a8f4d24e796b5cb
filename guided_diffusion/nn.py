"""Small layers and helpers shared by the networks and the diffusion core.

Everything here depends on torch alone, so the math core may use it.
"""

import math

import torch as th
import torch.nn as nn
import torch.utils.checkpoint


class SiLU(nn.Module):
    """x * sigmoid(x) (Elfwing et al. 2017); kept as a named class for old pickles."""

    def forward(self, x):
        return th.nn.functional.silu(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, for fp16 stability."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _pick_by_dims(dims, classes, what):
    if dims not in classes:
        raise ValueError(f"unsupported dimensions for {what}: {dims} (expected 1, 2 or 3)")
    return classes[dims]


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    cls = _pick_by_dims(dims, {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}, "conv_nd")
    return cls(*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (kept as a function so every layer is built in one place)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pool."""
    classes = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    return _pick_by_dims(dims, classes, "avg_pool_nd")(*args, **kwargs)


@th.no_grad()
def update_ema(target_params, source_params, rate=0.99):
    """target <- rate * target + (1 - rate) * source, in place (one fused loop over all tensors)."""
    targets, sources = list(target_params), list(source_params)
    th._foreach_mul_(targets, rate)
    th._foreach_add_(targets, sources, alpha=1 - rate)


@th.no_grad()
def zero_module(module):
    """Zero every parameter of `module` and return it."""
    for p in module.parameters():
        p.zero_()
    return module


@th.no_grad()
def scale_module(module, scale):
    """Multiply every parameter of `module` by `scale` and return it."""
    for p in module.parameters():
        p.mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over every dimension but the batch one: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels):
    """The normalisation layer of every block: 32-group GroupNorm in float32."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embeddings of (possibly fractional) timesteps, (N,) -> (N, dim).

    Transformer position encoding (Vaswani et al. 2017, Sec. 3.5), laid out as the
    cosine half first and the sine half second; frequencies max_period^(-i/half).
    """
    half = dim // 2
    # In the original's order of operations (scale, then divide): the same float32 rounding.
    freqs = th.exp(-math.log(max_period) * th.arange(half, dtype=th.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """Run func(*inputs), recomputing its activations in backward when `flag`.

    Trades compute for memory. `params` is accepted for compatibility: the
    non-reentrant torch checkpoint already tracks every parameter `func` uses,
    so gradients are identical to running without checkpointing. It also
    replays the RNG state, so dropout draws the same mask in the recomputation,
    which CheckpointFunction (the original's route) does not.
    """
    if not flag:
        return func(*inputs)
    return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)


class CheckpointFunction(th.autograd.Function):
    """The original's hand-written activation checkpoint, for code that calls it directly.

    CheckpointFunction.apply(run_function, len(inputs), *inputs, *params): the
    first `length` arguments are the inputs, the rest the parameters run_function
    uses (listed so that they receive gradients). forward runs without keeping
    activations; backward recomputes run_function on detached inputs and returns
    the gradients of the inputs and parameters. `checkpoint` above does not use
    it: torch's non-reentrant checkpoint also restores the RNG state for dropout.
    """

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        ctx.autocast_device = _device_type(args)
        ctx.autocast_kwargs = _autocast_state(ctx.autocast_device)
        with th.no_grad():
            output_tensors = ctx.run_function(*ctx.input_tensors)
        return output_tensors

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [_detached_leaf(x) for x in ctx.input_tensors]
        with th.enable_grad(), th.autocast(ctx.autocast_device, **ctx.autocast_kwargs):
            # view_as: run_function may modify its inputs in place, which a detached
            # leaf that requires grad does not allow (the original does the same).
            shallow_copies = [x.view_as(x) if isinstance(x, th.Tensor) else x for x in inputs]
            output_tensors = ctx.run_function(*shallow_copies)
        targets = inputs + ctx.input_params
        wanted = [i for i, t in enumerate(targets) if isinstance(t, th.Tensor) and t.requires_grad]
        grads = th.autograd.grad(output_tensors, [targets[i] for i in wanted], output_grads, allow_unused=True)
        input_grads = [None] * len(targets)
        for i, g in zip(wanted, grads):
            input_grads[i] = g
        del ctx.input_tensors, ctx.input_params, output_tensors
        return (None, None) + tuple(input_grads)


def _detached_leaf(x):
    """x cut from the graph; a floating-point tensor requires grad (the original: every input)."""
    if not isinstance(x, th.Tensor):
        return x
    return x.detach().requires_grad_(x.is_floating_point() or x.is_complex())


def _device_type(args):
    """The device type of the first tensor argument, for the autocast state ("cpu" without one)."""
    return next((a.device.type for a in args if isinstance(a, th.Tensor)), "cpu")


def _autocast_state(device_type):
    """The autocast settings in force now, to recompute under the same ones in backward."""
    return {
        "enabled": th.is_autocast_enabled(device_type),
        "dtype": th.get_autocast_dtype(device_type),
        "cache_enabled": th.is_autocast_cache_enabled(),
    }
