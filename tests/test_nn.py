"""Small helpers of nn.py."""

import math

import pytest
import torch as th

from guided_diffusion import nn as gnn


def test_timestep_embedding_known_values():
    emb = gnn.timestep_embedding(th.tensor([0.0, 1.0]), 4)
    # half = 2, frequencies 10000^(-0/2) = 1 and 10000^(-1/2) = 0.01; cosines first, then sines.
    expected = th.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    th.testing.assert_close(emb, expected)
    odd = gnn.timestep_embedding(th.tensor([3]), 5, max_period=100)
    assert odd.shape == (1, 5) and odd[0, -1] == 0
    assert odd[0, 1].item() == pytest.approx(math.cos(3 * 100**-0.5), rel=1e-6)


def test_checkpoint_gives_identical_gradients():
    layer = th.nn.Sequential(th.nn.Linear(6, 8), th.nn.SiLU(), th.nn.Linear(8, 6))
    x = th.randn(5, 6, requires_grad=True)
    grads = []
    for flag in (False, True):
        layer.zero_grad()
        x.grad = None
        out = gnn.checkpoint(layer, (x,), layer.parameters(), flag)
        (out**2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        th.testing.assert_close(a, b, rtol=0, atol=0)


def test_group_norm_runs_in_float32_and_keeps_dtype():
    norm = gnn.normalization(64)
    assert norm.num_groups == 32
    x = th.randn(2, 64, 3, 3).half()
    out = norm(x)
    assert out.dtype == th.float16
    th.testing.assert_close(out.float(), norm(x.float()), rtol=1e-3, atol=1e-3)


def test_update_ema_zero_and_scale():
    a, b = [th.ones(3)], [th.zeros(3)]
    gnn.update_ema(a, b, rate=0.9)
    th.testing.assert_close(a[0], th.full((3,), 0.9))
    lin = gnn.zero_module(th.nn.Linear(3, 3))
    assert all(p.abs().sum() == 0 for p in lin.parameters())
    lin2 = th.nn.Linear(3, 3)
    w = lin2.weight.clone()
    gnn.scale_module(lin2, 2.0)
    th.testing.assert_close(lin2.weight, 2 * w)


def test_mean_flat_and_layer_factories():
    assert gnn.mean_flat(th.arange(8.0).view(2, 2, 2)).tolist() == [1.5, 5.5]
    assert isinstance(gnn.conv_nd(1, 2, 3, 1), th.nn.Conv1d) and isinstance(gnn.conv_nd(3, 2, 3, 1), th.nn.Conv3d)
    assert isinstance(gnn.avg_pool_nd(2, 2), th.nn.AvgPool2d) and isinstance(gnn.linear(2, 3), th.nn.Linear)
    with pytest.raises(ValueError, match="unsupported dimensions"):
        gnn.conv_nd(4, 1, 1, 1)
    th.testing.assert_close(gnn.SiLU()(th.tensor([1.0])), th.tensor([1.0]) * th.sigmoid(th.tensor([1.0])))
