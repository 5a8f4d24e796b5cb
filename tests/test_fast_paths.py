"""The faster paths compute the same functions as the plain ones: attention in token layout with the fused
kernel against the original's channel-layout arithmetic (forward and gradients, on the released models'
head width of 64 channels and odd numbers of tokens), the attention pool's single query, and the training
step's fused optimizer, multi-tensor EMA and norms."""

import math

import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion import unet
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.nn import update_ema
from guided_diffusion.train_util import make_optimizer
from guided_diffusion.unet import AttentionBlock, AttentionPool2d


def randomise(module, scale=0.2):
    with th.no_grad():
        for p in module.parameters():
            p.copy_(th.randn_like(p) * scale)
    return module


def reference_qkv_attention(qkv, heads, new_order):
    """The original's computation on (N, 3 * H * ch, T): split, softmax(q^T k / sqrt(ch)) v -> (N, H * ch, T)."""
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (part.reshape(n * heads, ch, length) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
    weights = th.softmax(q.transpose(1, 2) @ k / math.sqrt(ch), dim=-1)  # (N * H, T, S)
    return (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(n, -1, length)


def reference_attention_block(block, x, new_order):
    """AttentionBlock as the original computes it: 1x1 Conv1d layers in (N, C, T) layout."""
    b, c, *spatial = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(block.norm(flat), block.qkv.weight, block.qkv.bias)
    h = reference_qkv_attention(qkv, block.num_heads, new_order)
    return (flat + F.conv1d(h, block.proj_out.weight, block.proj_out.bias)).reshape(b, c, *spatial)


def outputs_and_grads(fn, module, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    grads = th.autograd.grad((out * th.linspace(-1, 1, out.numel()).view_as(out)).sum(), [x, *module.parameters()])
    return out.detach(), grads


def assert_grads_close(grads, ref_grads):
    """Equal up to float32 summation order, relative to each gradient's largest entry."""
    for grad, ref in zip(grads, ref_grads):
        th.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("impl", ["sdpa", "einsum"])
@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("spatial", [(7, 7), (5, 3)])
def test_attention_block_matches_the_original_computation(impl, new_order, spatial):
    th.manual_seed(0)
    block = randomise(AttentionBlock(128, num_head_channels=64, use_new_attention_order=new_order, attention_impl=impl))
    x = th.randn(2, 128, *spatial)
    out, grads = outputs_and_grads(block, block, x)
    ref_out, ref_grads = outputs_and_grads(lambda z: reference_attention_block(block, z, new_order), block, x)
    th.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_qkv_attention_public_forward_keeps_the_original_layout():
    th.manual_seed(1)
    qkv = th.randn(2, 3 * 2 * 64, 9)
    th.testing.assert_close(
        unet.QKVAttentionLegacy(2)(qkv), reference_qkv_attention(qkv, 2, False), rtol=1e-5, atol=1e-5
    )
    th.testing.assert_close(unet.QKVAttention(2)(qkv), reference_qkv_attention(qkv, 2, True), rtol=1e-5, atol=1e-5)


def reference_attention_pool(pool, x):
    """The original: every token queries, the projection runs on all tokens, the first is kept."""
    b, c, *_ = x.shape
    flat = x.reshape(b, c, -1)
    flat = th.cat([flat.mean(dim=-1, keepdim=True), flat], dim=-1) + pool.positional_embedding[None]
    qkv = F.conv1d(flat, pool.qkv_proj.weight, pool.qkv_proj.bias)
    h = reference_qkv_attention(qkv, pool.num_heads, new_order=True)
    return F.conv1d(h, pool.c_proj.weight, pool.c_proj.bias)[:, :, 0]


@pytest.mark.parametrize("impl", ["sdpa", "einsum"])
def test_attention_pool_with_one_query_matches_the_original(impl):
    th.manual_seed(2)
    pool = randomise(
        AttentionPool2d(spacial_dim=5, embed_dim=128, num_heads_channels=64, output_dim=10, attention_impl=impl)
    )
    x = th.randn(3, 128, 5, 5)
    out, grads = outputs_and_grads(pool, pool, x)
    ref_out, ref_grads = outputs_and_grads(lambda z: reference_attention_pool(pool, z), pool, x)
    th.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_multi_tensor_ema_is_the_formula():
    th.manual_seed(3)
    targets = [th.randn(4, 3), th.randn(5)]
    sources = [th.randn(4, 3), th.randn(5)]
    expected = [0.9 * t + 0.1 * s for t, s in zip(targets, sources)]
    update_ema(targets, sources, rate=0.9)
    for t, e in zip(targets, expected):
        th.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)


def test_fused_optimizer_steps_like_plain_adamw():
    th.manual_seed(4)
    fast = [th.nn.Parameter(th.randn(6, 4)), th.nn.Parameter(th.randn(4))]
    plain = [th.nn.Parameter(p.detach().clone()) for p in fast]
    opts = [
        make_optimizer(fast, lr=1e-2, weight_decay=0.1),
        th.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, foreach=False),
    ]
    for _ in range(5):
        grads = [th.randn_like(p) for p in fast]
        for params, opt in zip((fast, plain), opts):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fast, plain):
        th.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logged_norms_are_the_global_l2_norms():
    th.manual_seed(5)
    model = th.nn.Sequential(th.nn.Linear(4, 3), th.nn.Linear(3, 2))
    model(th.randn(7, 4)).square().sum().backward()
    trainer = MixedPrecisionTrainer(model=model)
    grad_norm, param_norm = trainer._compute_norms()
    params = list(model.parameters())
    assert grad_norm == pytest.approx(th.cat([p.grad.flatten() for p in params]).norm().item(), rel=1e-6)
    assert param_norm == pytest.approx(th.cat([p.flatten() for p in params]).norm().item(), rel=1e-6)


def test_compile_flag_compiles_in_place_or_falls_back(monkeypatch):
    from argparse import Namespace

    from guided_diffusion import script_util as su

    lines = []
    monkeypatch.setattr(su.logger, "log", lambda *args, **kwargs: lines.append(" ".join(map(str, args))))
    th.manual_seed(6)
    model, x = th.nn.Linear(4, 3), th.randn(2, 4)
    expected = model(x)
    keys = list(model.state_dict())
    assert su.compile_if_asked(model, Namespace(compile=False)) is model and not lines
    su.compile_if_asked(model, Namespace(compile=True), backend="eager")  # a backend that needs no compiler
    th.testing.assert_close(model(x), expected)
    assert list(model.state_dict()) == keys and len(lines) == 1 and "torch.compile (eager)" in lines[0]

    def unavailable(self, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(th.nn.Module, "compile", unavailable)
    plain = th.nn.Linear(4, 3)
    assert su.compile_if_asked(plain, Namespace(compile=True)) is plain
    assert len(lines) == 2 and "running eagerly" in lines[1]
