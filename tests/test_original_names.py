"""Public names code written for the original reads: model.dtype, the fp16 helpers,
CheckpointFunction and the thop FLOP hooks of the attention."""

import pytest
import torch as th

from guided_diffusion import fp16_util
from guided_diffusion import nn as gnn
from guided_diffusion.unet import (
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    SuperResModel,
    UNetModel,
    count_flops_attn,
)

TINY = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_heads=2,
)


# --------------------------------------------------------------------------- model.dtype


@pytest.mark.parametrize("cls", [UNetModel, SuperResModel, EncoderUNetModel])
def test_dtype_is_set_from_use_fp16_as_built(cls):
    assert cls(**TINY).dtype == th.float32
    assert cls(**TINY, use_fp16=True).dtype == th.float16


def test_dtype_follows_conversion():
    model = UNetModel(**TINY)
    model.convert_to_fp16()
    assert model.dtype == th.float16
    model.convert_to_fp32()
    assert model.dtype == th.float32


@pytest.mark.parametrize("cls, kwargs", [(UNetModel, {}), (EncoderUNetModel, {"out_channels": 5})])
def test_model_built_with_fp16_but_not_converted_still_runs_in_float32(cls, kwargs):
    model = cls(**{**TINY, **kwargs}, use_fp16=True)
    reference = cls(**{**TINY, **kwargs})
    reference.load_state_dict(model.state_dict())
    x, t = th.randn(2, 3, 8, 8), th.tensor([1, 7])
    out = model(x, t)
    assert model.dtype == th.float16 and out.dtype == th.float32
    th.testing.assert_close(out, reference(x, t), rtol=0, atol=0)


# --------------------------------------------------------------------------- fp16_util


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_check_overflow_flags_inf_and_nan(value):
    assert fp16_util.check_overflow(value) is True
    assert bool(fp16_util.check_overflow(th.tensor(value))) is True


@pytest.mark.parametrize("value", [0.0, 1.5, -3e38, 65504.0])
def test_check_overflow_passes_finite_values(value):
    assert fp16_util.check_overflow(value) is False
    assert bool(fp16_util.check_overflow(th.tensor(value))) is False


def test_get_param_groups_and_shapes_partitions_by_ndim_in_order():
    model = th.nn.Sequential(th.nn.Linear(3, 4), th.nn.GroupNorm(2, 4), th.nn.Conv2d(4, 2, 3))
    named = list(model.named_parameters())
    groups = fp16_util.get_param_groups_and_shapes(iter(named))
    assert len(groups) == 2
    (vectors, vector_shape), (matrices, matrix_shape) = groups
    # The original writes the first shape as (-1): the int, not a tuple.
    assert vector_shape == -1 and isinstance(vector_shape, int)
    assert matrix_shape == (1, -1)
    assert [n for n, _ in vectors] == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert [n for n, _ in matrices] == ["0.weight", "2.weight"]
    assert all(p is dict(named)[n] for n, p in vectors + matrices)


def test_param_groups_flatten_with_their_shapes():
    model = th.nn.Sequential(th.nn.Linear(3, 4), th.nn.Linear(4, 2))
    (vectors, vector_shape), (matrices, matrix_shape) = fp16_util.get_param_groups_and_shapes(model.named_parameters())
    flat = th.cat([p.view(vector_shape) for _, p in vectors])
    th.testing.assert_close(flat, th.cat([model[0].bias, model[1].bias]))
    assert flat.shape == (6,)
    rows = [p.view(matrix_shape) for _, p in matrices]
    assert [r.shape for r in rows] == [(1, 12), (1, 8)]
    # The master parameters the trainer builds have exactly these layouts.
    masters = fp16_util.make_master_params(fp16_util.get_param_groups_and_shapes(model.named_parameters()))
    assert masters[0].shape == (6,) and masters[1].shape == (1, 20)
    th.testing.assert_close(masters[0], flat)


# --------------------------------------------------------------------------- CheckpointFunction


def test_checkpoint_function_matches_a_direct_call():
    layer = th.nn.Linear(5, 3)
    params = list(layer.parameters())
    x = th.randn(4, 5, requires_grad=True)
    direct = layer(x)
    checkpointed = gnn.CheckpointFunction.apply(layer, 1, x, *params)
    th.testing.assert_close(checkpointed, direct, rtol=0, atol=0)
    assert checkpointed.grad_fn is not None
    weight = th.randn_like(direct)
    expected = th.autograd.grad((direct * weight).sum(), [x, *params])
    got = th.autograd.grad((checkpointed * weight).sum(), [x, *params])
    for a, b in zip(got, expected):
        th.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_function_with_two_inputs_and_an_unused_parameter():
    layer = th.nn.Linear(3, 3)
    unused = th.nn.Parameter(th.ones(2))
    a, b = th.randn(2, 3, requires_grad=True), th.randn(2, 3, requires_grad=True)
    fn = lambda u, v: layer(u) * v  # noqa: E731
    out = gnn.CheckpointFunction.apply(fn, 2, a, b, *layer.parameters(), unused)
    out.sum().backward()
    expected = th.autograd.grad(fn(a, b).sum(), [a, b, *layer.parameters()])
    for got, want in zip([a.grad, b.grad, layer.weight.grad, layer.bias.grad], expected):
        th.testing.assert_close(got, want)
    assert unused.grad is None


# --------------------------------------------------------------------------- thop hooks


class _FakeCounted:
    """What thop hands a counting hook: a module with a total_ops buffer."""

    def __init__(self):
        self.total_ops = th.DoubleTensor([0])


@pytest.mark.parametrize("count", [count_flops_attn, QKVAttention.count_flops, QKVAttentionLegacy.count_flops])
def test_count_flops_adds_the_two_attention_matmuls(count):
    b, c, T = 2, 6, 5
    module = _FakeCounted()
    y = (th.zeros(b, c, T),)
    assert count(module, None, y) is None
    assert module.total_ops.item() == 2 * b * T**2 * c
    count(module, None, (th.zeros(3, 4, 2, 3),))  # spatial positions multiply: T = 6
    assert module.total_ops.item() == 2 * b * T**2 * c + 2 * 3 * 6**2 * 4
    assert module.total_ops.dtype == th.float64
