"""The networks: shapes, initialisation, attention, checkpointing, half precision."""

import math

import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion import unet
from guided_diffusion.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
)


def tiny_unet(**kw):
    args = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_heads=2,
        use_scale_shift_norm=True,
    )
    args.update(kw)
    return UNetModel(**args)


def randomise(model, scale=0.05):
    """Give every parameter (zero-initialised ones included) a non-trivial value."""
    with th.no_grad():
        for p in model.parameters():
            p.copy_(th.randn_like(p) * scale)
    return model


X = th.randn(2, 3, 16, 16)
T = th.tensor([3, 700])


# ---------------------------------------------------------------- shapes and initialisation


@pytest.mark.parametrize("updown", [False, True])
def test_unet_shapes(updown):
    assert tiny_unet(resblock_updown=updown)(X, T).shape == (2, 3, 16, 16)
    assert tiny_unet(out_channels=6, resblock_updown=updown)(X, T).shape == (2, 6, 16, 16)  # learn_sigma
    model = tiny_unet(num_classes=5, resblock_updown=updown)
    assert model(X, T, y=th.tensor([0, 4])).shape == (2, 3, 16, 16)


def test_fresh_unet_outputs_zeros():
    out = tiny_unet(num_classes=5)(X, T, y=th.tensor([1, 2]))
    assert th.all(out == 0)


def test_class_labels_change_the_output():
    model = randomise(tiny_unet(num_classes=5))
    a, b = model(X, T, y=th.tensor([0, 0])), model(X, T, y=th.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-4


def test_labels_required_iff_class_conditional():
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_unet()(X, T, y=th.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_unet(num_classes=3)(X, T)


def test_super_res_model_concatenates_the_upsampled_low_res():
    model = randomise(
        SuperResModel(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=6,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_heads=2,
        )
    )
    assert model.input_blocks[0][0].weight.shape[1] == 6
    low = th.randn(2, 3, 8, 8)
    out = model(X, T, low_res=low)
    assert out.shape == (2, 6, 16, 16)
    # Same as running the plain UNet forward on the explicit concatenation.
    cat = th.cat([X, F.interpolate(low, (16, 16), mode="bilinear")], 1)
    th.testing.assert_close(out, UNetModel.forward(model, cat, T))


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_pools(pool):
    model = EncoderUNetModel(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=7,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        pool=pool,
    )
    logits = randomise(model)(X, T)
    assert logits.shape == (2, 7) and th.isfinite(logits).all()


def test_unet_in_1d_and_3d():
    one = UNetModel(
        image_size=16,
        in_channels=2,
        model_channels=32,
        out_channels=2,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        dims=1,
    )
    assert one(th.randn(2, 2, 16), T).shape == (2, 2, 16)
    three = UNetModel(
        image_size=8,
        in_channels=1,
        model_channels=32,
        out_channels=1,
        num_res_blocks=1,
        attention_resolutions=(),
        channel_mult=(1, 2),
        dims=3,
        resblock_updown=True,
    )
    assert three(th.randn(2, 1, 3, 8, 8), T).shape == (2, 1, 3, 8, 8)


# ---------------------------------------------------------------- attention


def reference_attention(q, k, v):
    """softmax(q^T k / sqrt(ch)) v for (B, ch, T) tensors, written out plainly."""
    ch = q.shape[1]
    weights = th.softmax(q.transpose(1, 2) @ k / math.sqrt(ch), dim=-1)  # (B, T, S)
    return (weights @ v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("impl", unet.ATTENTION_IMPLEMENTATIONS)
def test_attention_matches_a_plain_reference(impl, monkeypatch):
    monkeypatch.setattr(unet, "_attention_impl", impl)
    heads, ch, length = 3, 8, 10
    qkv = th.randn(2, 3 * heads * ch, length)
    q, k, v = qkv.chunk(3, dim=1)
    expected = reference_attention(*(p.reshape(2 * heads, ch, length) for p in (q, k, v))).reshape(2, -1, length)
    th.testing.assert_close(QKVAttention(heads)(qkv), expected, rtol=1e-5, atol=1e-5)
    legacy = qkv.reshape(2 * heads, 3 * ch, length)
    expected_legacy = reference_attention(*legacy.split(ch, dim=1)).reshape(2, -1, length)
    th.testing.assert_close(QKVAttentionLegacy(heads)(qkv), expected_legacy, rtol=1e-5, atol=1e-5)


def legacy_to_new_permutation(heads, ch):
    """Row order that turns legacy qkv weights (head, part, channel) into the new order (part, head, channel).

    Legacy row h*3*ch + p*ch + c holds part p (q, k or v) of head h; the new layout
    keeps it at row p*heads*ch + h*ch + c.
    """
    perm = [0] * (3 * heads * ch)
    for h in range(heads):
        for p in range(3):
            for c in range(ch):
                perm[p * heads * ch + h * ch + c] = h * 3 * ch + p * ch + c
    return th.tensor(perm)


def test_legacy_and_new_attention_orders_differ_by_a_fixed_permutation():
    channels, heads = 64, 4
    legacy = randomise(AttentionBlock(channels, num_heads=heads), 0.2)
    new = AttentionBlock(channels, num_heads=heads, use_new_attention_order=True)
    state = legacy.state_dict()
    perm = legacy_to_new_permutation(heads, channels // heads)
    state["qkv.weight"], state["qkv.bias"] = state["qkv.weight"][perm], state["qkv.bias"][perm]
    new.load_state_dict(state)
    x = th.randn(2, channels, 4, 4)
    th.testing.assert_close(new(x), legacy(x), rtol=1e-5, atol=1e-5)
    # Without the permutation they compute different functions.
    new.load_state_dict(legacy.state_dict())
    assert (new(x) - legacy(x)).abs().max() > 1e-3


def test_sdpa_and_einsum_give_the_same_unet(monkeypatch):
    model = randomise(tiny_unet(num_head_channels=16, use_new_attention_order=True))
    monkeypatch.setattr(unet, "_attention_impl", "einsum")
    a = model(X, T)
    monkeypatch.setattr(unet, "_attention_impl", "sdpa")
    th.testing.assert_close(model(X, T), a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        unet.set_attention_implementation("flash9")


def attention_kernels(model):
    """The attention_impl of every QKV attention module in model."""
    return {m.attention_impl for m in model.modules() if isinstance(m, (QKVAttention, QKVAttentionLegacy))}


def count_fused_calls(monkeypatch):
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    return calls


def test_two_models_in_one_process_use_their_own_kernels(monkeypatch):
    monkeypatch.setattr(unet, "_attention_impl", "sdpa")  # the module default, which neither follows
    th.manual_seed(0)
    einsum = randomise(tiny_unet(num_head_channels=16, attention_impl="einsum"))
    fused = tiny_unet(num_head_channels=16, attention_impl="sdpa")
    fused.load_state_dict(einsum.state_dict())
    assert attention_kernels(einsum) == {"einsum"} and attention_kernels(fused) == {"sdpa"}
    calls = count_fused_calls(monkeypatch)
    a = einsum(X, T)
    assert not calls
    th.testing.assert_close(fused(X, T), a, rtol=1e-5, atol=1e-5)
    assert calls
    monkeypatch.setattr(unet, "_attention_impl", "einsum")
    calls.clear()
    fused(X, T)
    assert calls  # its own kernel, not the new module default


def test_a_model_without_its_own_kernel_follows_the_module_default(monkeypatch):
    model = tiny_unet()
    assert attention_kernels(model) == {None}
    calls = count_fused_calls(monkeypatch)
    monkeypatch.setattr(unet, "_attention_impl", "einsum")
    model(X, T)
    assert not calls
    monkeypatch.setattr(unet, "_attention_impl", "auto")
    model(X, T)
    assert calls


def test_the_encoder_passes_its_kernel_to_the_attention_pool():
    model = EncoderUNetModel(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=7,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=32,
        pool="attention",
        attention_impl="einsum",
    )
    assert attention_kernels(model) == {"einsum"} and attention_kernels(model.out[2]) == {"einsum"}


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="unknown attention"):
        tiny_unet(attention_impl="flash9")
    with pytest.raises(ValueError, match="unknown attention"):
        QKVAttention(2, attention_impl="flash9")


def test_num_head_channels_sets_heads():
    assert AttentionBlock(256, num_heads=1, num_head_channels=64).num_heads == 4
    with pytest.raises(ValueError, match="divisible"):
        AttentionBlock(96, num_head_channels=64)


# ---------------------------------------------------------------- checkpointing and precision


def test_gradient_checkpointing_gives_identical_results():
    plain = randomise(tiny_unet(num_classes=4, resblock_updown=True))
    ckpt = tiny_unet(num_classes=4, resblock_updown=True, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    y = th.tensor([1, 3])
    outs, grads = [], []
    for model in (plain, ckpt):
        x = X.clone().requires_grad_(True)
        out = model(x, T, y=y)
        (out**2).sum().backward()
        outs.append(out)
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    th.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        th.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fp16_conversion_changes_exactly_the_body_convolutions():
    model = tiny_unet(num_classes=3, resblock_updown=True)
    before = {k: v.dtype for k, v in model.state_dict().items()}
    model.convert_to_fp16()
    convs = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, (th.nn.Conv1d, th.nn.Conv2d))
        and name.split(".")[0] in ("input_blocks", "middle_block", "output_blocks")
        for p in ("weight", "bias")
    }
    changed = {k for k, v in model.state_dict().items() if v.dtype != before[k]}
    assert changed == convs and all(model.state_dict()[k].dtype == th.float16 for k in convs)
    assert model.dtype == th.float16 and model.out[2].weight.dtype == th.float32
    out = model(X, T, y=th.tensor([0, 1]))
    assert out.dtype == th.float32
    model.convert_to_fp32()
    assert all(v.dtype == th.float32 for v in model.state_dict().values())


def test_fp16_forward_is_close_to_fp32():
    model = randomise(tiny_unet(), 0.1)
    ref = model(X, T)
    model.convert_to_fp16()
    assert (model(X, T) - ref).abs().max() < 0.02 * ref.abs().max()


def resblock_float64_reference(block, x, emb):
    """ResBlock with scale-shift norm, written with functional ops in float64 from the block's weights."""
    w = {k: v.double() for k, v in block.state_dict().items()}
    gn = lambda h, p: F.group_norm(h, 32, w[f"{p}.weight"], w[f"{p}.bias"], eps=1e-5)
    h = F.conv2d(F.silu(gn(x, "in_layers.0")), w["in_layers.2.weight"], w["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), w["emb_layers.1.weight"], w["emb_layers.1.bias"])[:, :, None, None]
    scale, shift = e.chunk(2, dim=1)
    h = F.silu(gn(h, "out_layers.0") * (1 + scale) + shift)
    h = F.conv2d(h, w["out_layers.3.weight"], w["out_layers.3.bias"], padding=1)
    skip = F.conv2d(x, w["skip_connection.weight"], w["skip_connection.bias"])
    return skip + h


def test_resblock_matches_a_float64_reference():
    block = randomise(ResBlock(32, 64, dropout=0.0, out_channels=64, use_scale_shift_norm=True), 0.2).eval()
    x, emb = th.randn(2, 32, 8, 8), th.randn(2, 64)
    expected = resblock_float64_reference(block, x.double(), emb.double())
    th.testing.assert_close(block(x, emb).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- settings


SR_ARGS = dict(
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=[2],
    channel_mult=[1, 2],
    num_heads=2,
)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (UNetModel, dict(num_classes=5, resblock_updown=True, num_heads_upsample=1, attention_impl="einsum")),
        (SuperResModel, SR_ARGS),
        (EncoderUNetModel, dict(num_head_channels=16, pool="attention", use_fp16=True)),
    ],
)
def test_settings_rebuild_the_same_network(cls, kwargs):
    model = cls(**{**SR_ARGS, **kwargs})
    again = cls.from_settings(model.settings)
    assert again.settings == model.settings
    layout = lambda m: [(k, v.shape, v.dtype) for k, v in m.state_dict().items()]
    assert layout(again) == layout(model)
    assert model.settings.attention_resolutions == (2,) and model.settings.channel_mult == (1, 2)


def test_settings_hold_one_image_while_the_super_res_network_takes_two():
    model = SuperResModel(**SR_ARGS)
    assert model.settings.in_channels == 3 and model.in_channels == 6
    settings = unet.UNetSettings(**{**SR_ARGS, "attention_resolutions": (2,), "channel_mult": (1, 2)})
    assert SuperResModel.from_settings(settings).input_blocks[0][0].weight.shape[1] == 6
