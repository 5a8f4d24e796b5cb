"""The ADM networks (Dhariwal & Nichol 2021, Sec. 3): the diffusion UNet, the
super-resolution UNet and the noisy-image classifier (the UNet's encoder half).

Module and parameter names follow the original exactly, so its released
checkpoints load with strict=True. Shapes: x is (N, C, H, W) for dims=2; the
timestep embedding `emb` is (N, 4 * model_channels).
"""

import math
from abc import abstractmethod
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import SiLU, avg_pool_nd, checkpoint, conv_nd, linear, normalization, timestep_embedding, zero_module

# How attention is computed: "sdpa" (torch's fused scaled_dot_product_attention) or "einsum"
# (the original's explicit softmax(QK^T)V, which materialises the T x T weights; the same
# function). "auto" is sdpa: with the channels of each head contiguous, the fused kernel
# runs 1.1-3.5x faster than einsum on a CPU (more at more tokens, forward and backward;
# benchmarks/unet_speed.py) and stores no T x T weights for backward.
# Each model chooses its own (attention_impl=...); one built with None follows the module
# default below, read at call time, which set_attention_implementation changes.
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "einsum")
_attention_impl = "auto"


def set_attention_implementation(name):
    """The default kernel, "auto" (= sdpa), "sdpa" or "einsum" (the original's arithmetic), of every
    attention layer built without its own (attention_impl=None)."""
    global _attention_impl
    _attention_impl = _checked_attention_impl(name, allow_none=False)


def _checked_attention_impl(name, allow_none=True):
    if name in ATTENTION_IMPLEMENTATIONS or (allow_none and name is None):
        return name
    raise ValueError(f"unknown attention implementation {name!r}; use one of {ATTENTION_IMPLEMENTATIONS}")


# --------------------------------------------------------------------------- blocks


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to x given the embeddings emb."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that hands emb to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class _Resample(nn.Module):
    """The settings Upsample and Downsample share."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims


class Upsample(_Resample):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    For dims=3 only the inner two (spatial) dimensions are upsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(_Resample):
    """2x downsampling by a strided 3x3 convolution or by average pooling.

    For dims=3 only the inner two (spatial) dimensions are downsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__(channels, use_conv, dims, out_channels)
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("pooling cannot change the number of channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding (ADM, Sec. 3).

    With use_scale_shift_norm the embedding modulates the second GroupNorm,
    AdaGN(h, y) = y_s GroupNorm(h) + y_b (ADM, Sec. 3.1), written here as
    norm(h) * (1 + scale) + shift; otherwise it is added to h. With up or down
    the block resamples both paths (BigGAN-style, Brock et al. 2019).
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = up or down

        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.h_upd, self.x_upd = _resamplers(channels, dims, up, down)
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = _skip_projection(channels, self.out_channels, use_conv, dims)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        # The layers are unpacked rather than sliced: slicing an nn.Sequential builds a new
        # module on every call, which costs more than the small layers themselves.
        in_norm, in_act, in_conv = self.in_layers
        out_norm, out_act, out_dropout, out_conv = self.out_layers
        h = in_act(in_norm(x))
        if self.updown:  # resample between the activation and the convolution, on both paths
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - emb_out.ndim))  # (N, C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        return self.skip_connection(x) + out_conv(out_dropout(out_act(h)))


def _resamplers(channels, dims, up, down):
    if up:
        return Upsample(channels, False, dims), Upsample(channels, False, dims)
    if down:
        return Downsample(channels, False, dims), Downsample(channels, False, dims)
    return nn.Identity(), nn.Identity()


def _skip_projection(channels, out_channels, use_conv, dims):
    if out_channels == channels:
        return nn.Identity()
    if use_conv:
        return conv_nd(dims, channels, out_channels, 3, padding=1)
    return conv_nd(dims, channels, out_channels, 1)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Heads: `num_heads`, or channels // num_head_channels when that is given.
    attention_impl: this block's kernel (see ATTENTION_IMPLEMENTATIONS); None follows the module default.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
        *,
        attention_impl=None,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        qkv_attention = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = qkv_attention(self.num_heads, attention_impl=attention_impl)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        # The original always recomputed attention in backward; we honour use_checkpoint
        # instead, which gives the same gradients without the extra compute.
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (N, C, T)
        tokens = self.norm(x).transpose(1, 2)  # (N, T, C), a view
        # The 1x1 convolutions as matrix products over tokens (same parameters, same function):
        # convolutions with kernel 1 take a slow path on CPUs, and this layout keeps each
        # head's channels contiguous, which the fused attention kernel needs.
        h = self.attention.forward_tokens(pointwise(tokens, self.qkv))  # (N, T, C)
        return (x + pointwise(h, self.proj_out).transpose(1, 2)).reshape(b, c, *spatial)


def pointwise(tokens, conv):
    """A kernel-1 Conv1d applied to (N, T, C_in) tokens: (N, T, C_out)."""
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


def attention(q, k, v, impl=None):
    """softmax(q k^T / sqrt(ch)) v per head: q (N, H, T, ch), k and v (N, H, S, ch) -> (N, H, T, ch).

    Scaled dot-product attention (Vaswani et al. 2017, Eq. 1). impl: "sdpa" or "auto",
    torch's fused kernel (flash attention on CPUs and GPUs when each head's channels are
    contiguous, which the token layout gives); "einsum", the original's arithmetic, q and
    k scaled by ch^(-1/4) each and the T x S weights normalised in float32 (fp16 stability);
    None, the module default (set_attention_implementation).
    """
    if (impl or _attention_impl) != "einsum":
        return F.scaled_dot_product_attention(q, k, v)
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = th.einsum("nhtc,nhsc->nhts", q * scale, k * scale)  # (N, H, T, S)
    weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
    return th.einsum("nhts,nhsc->nhtc", weight, v)


def count_flops_attn(model, _x, y):
    """A thop counting hook for the attention's two matmuls, as in the original.

    thop sees no FLOPs in einsum or sdpa, so the original registers this for its
    QKV attention classes: QK^T and the weighted sum of V each cost b * T^2 * c
    multiply-adds, T the product of the spatial sizes. b, c and the spatial sizes
    are read from y[0].shape, as the original reads them (compatibility detail).
    Usage: thop.profile(model, inputs=..., custom_ops={QKVAttention: QKVAttention.count_flops}).
    """
    b, c, *spatial = y[0].shape
    num_spatial = int(math.prod(spatial))
    # Two matmuls with the same number of ops; the softmax and scaling are not counted.
    matmul_ops = 2 * b * (num_spatial**2) * c
    model.total_ops += th.DoubleTensor([matmul_ops])


class _QKVAttentionBase(nn.Module):
    """Multi-head attention on qkv; subclasses say how q, k and v of each head are laid out.

    forward takes the original's (N, 3 * H * ch, T) and returns (N, H * ch, T);
    forward_tokens the same in token layout, (N, T, 3 * H * ch) -> (N, T, H * ch).
    attention_impl: the kernel (see ATTENTION_IMPLEMENTATIONS); None follows the module default.
    """

    def __init__(self, n_heads, *, attention_impl=None):
        super().__init__()
        self.n_heads = n_heads
        self.attention_impl = _checked_attention_impl(attention_impl)

    @staticmethod
    def count_flops(model, _x, y):
        """The thop hook of the original's QKVAttention and QKVAttentionLegacy (both inherit it)."""
        return count_flops_attn(model, _x, y)

    def forward(self, qkv):
        return self.forward_tokens(qkv.transpose(1, 2).contiguous()).transpose(1, 2)

    def forward_tokens(self, qkv, queries=None):
        """Attention over (N, T, 3 * H * ch) tokens; only the first `queries` tokens query when given."""
        bs, length, width = qkv.shape
        assert width % (3 * self.n_heads) == 0
        q, k, v = (part.transpose(1, 2) for part in self._split(qkv, width // (3 * self.n_heads)))  # (N, H, T, ch)
        out = attention(q[:, :, :queries] if queries else q, k, v, self.attention_impl)  # (N, H, T', ch)
        return out.transpose(1, 2).reshape(bs, out.shape[2], -1)


class QKVAttentionLegacy(_QKVAttentionBase):
    """qkv laid out per head: channel h * 3 * ch + p * ch + c is part p (q, k, v) of head h."""

    def _split(self, qkv, ch):
        bs, length, _ = qkv.shape
        return qkv.view(bs, length, self.n_heads, 3, ch).unbind(3)  # each (N, T, H, ch)


class QKVAttention(_QKVAttentionBase):
    """qkv laid out part first: channel p * H * ch + h * ch + c is part p (q, k, v) of head h."""

    def _split(self, qkv, ch):
        bs, length, _ = qkv.shape
        return qkv.view(bs, length, 3, self.n_heads, ch).unbind(2)  # each (N, T, H, ch)


class AttentionPool2d(nn.Module):
    """Attention pooling as in CLIP (Radford et al. 2021): a mean token attends to the grid.

    (N, C, H, W) -> (N, output_dim), with a learned positional embedding over the
    H*W positions plus the mean token. attention_impl as for AttentionBlock.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None, *, attention_impl=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads, attention_impl=attention_impl)

    def forward(self, x):
        return pointwise(self.pooled(x), self.c_proj)  # (N, output_dim)

    def pooled(self, x):
        """The mean token after attention, before the output projection: (N, C, H, W) -> (N, C).

        Only the mean token's output is used, so it alone queries (the same function as
        attending from every position and keeping the first, at 1 / (HW + 1) of the cost).
        """
        tokens = self._tokens(x).transpose(1, 2)  # (N, HW + 1, C)
        return self.attention.forward_tokens(pointwise(tokens, self.qkv_proj), queries=1)[:, 0]

    def _tokens(self, x):
        """(N, C, H, W) -> (N, C, HW + 1): the mean token first, plus the positional embedding."""
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)  # (N, C, HW)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        return x + self.positional_embedding[None].to(x.dtype)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class UNetSettings:
    """Everything that shapes a UNet, a super-resolution UNet or an encoder, as typed values.

    Field names are the networks' constructor parameters. attention_resolutions are
    downsample rates (1, 2, 4, ...), channel_mult a tuple; num_classes and
    num_heads_upsample matter to the UNets only, pool to the encoder only. in_channels
    are those of one image (SuperResModel's network takes twice as many).
    attention_impl picks this model's attention kernel (None: the module default).
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple = ()
    dropout: float = 0.0
    channel_mult: tuple = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    pool: str = "adaptive"
    attention_impl: str = None

    def __post_init__(self):
        # Tuples, so that settings built from lists compare equal and hash.
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        _checked_attention_impl(self.attention_impl)

    @property
    def time_embed_dim(self):
        """Width of the timestep (and label) embedding."""
        return 4 * self.model_channels

    @property
    def upsample_heads(self):
        """Heads of the decoder's attention: num_heads_upsample, or num_heads where that is -1."""
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    def width(self, level):
        """Channels of the blocks at resolution level `level` (0 = full resolution)."""
        return int(self.channel_mult[level] * self.model_channels)

    def arguments(self, without=None):
        """The fields as constructor keyword arguments, less the one named `without`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != without}


# --------------------------------------------------------------------------- building blocks from settings


def _res_block(s, channels, out_channels=None, **resample):
    """A ResBlock on the timestep embedding; resample: up=True or down=True."""
    return ResBlock(
        channels,
        s.time_embed_dim,
        s.dropout,
        out_channels=out_channels,
        dims=s.dims,
        use_checkpoint=s.use_checkpoint,
        use_scale_shift_norm=s.use_scale_shift_norm,
        **resample,
    )


def _attention_block(s, channels, num_heads):
    return AttentionBlock(
        channels,
        num_heads=num_heads,
        num_head_channels=s.num_head_channels,
        use_checkpoint=s.use_checkpoint,
        use_new_attention_order=s.use_new_attention_order,
        attention_impl=s.attention_impl,
    )


def _downsample(s, channels):
    if s.resblock_updown:
        return _res_block(s, channels, channels, down=True)
    return Downsample(channels, s.conv_resample, dims=s.dims, out_channels=channels)


def _upsample(s, channels):
    if s.resblock_updown:
        return _res_block(s, channels, channels, up=True)
    return Upsample(channels, s.conv_resample, dims=s.dims, out_channels=channels)


class _Encoder(NamedTuple):
    """The input blocks as built, and what the rest of a network needs to know of them."""

    blocks: nn.ModuleList
    skip_channels: tuple  # the output channels of each input block, in order (the decoder's skips)
    channels: int  # at the bottom
    rate: int  # the downsample rate at the bottom
    feature_size: int  # the channels the "spatial" pools concatenate: every block's, the middle block's too


def _build_input_blocks(s, in_channels):
    """A stem convolution, then per level num_res_blocks ResBlocks (attention at the listed rates) and,
    between levels, a 2x downsampling."""
    ch = s.width(0)
    blocks = [TimestepEmbedSequential(conv_nd(s.dims, in_channels, ch, 3, padding=1))]
    skip_channels, rate = [ch], 1
    for level in range(len(s.channel_mult)):
        for _ in range(s.num_res_blocks):
            layers = [_res_block(s, ch, s.width(level))]
            ch = s.width(level)
            if rate in s.attention_resolutions:
                layers.append(_attention_block(s, ch, s.num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(s.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(_downsample(s, ch)))
            skip_channels.append(ch)
            rate *= 2
    return _Encoder(nn.ModuleList(blocks), tuple(skip_channels), ch, rate, sum(skip_channels) + ch)


def _build_middle_block(s, channels):
    return TimestepEmbedSequential(
        _res_block(s, channels), _attention_block(s, channels, s.num_heads), _res_block(s, channels)
    )


def _build_output_blocks(s, skip_channels, channels, rate):
    """The decoder: per level from the bottom, num_res_blocks + 1 ResBlocks on [h, skip] concatenations
    (attention at the listed rates), then a 2x upsampling but at the top. Returns (blocks, channels)."""
    skips, ch, blocks = list(skip_channels), channels, nn.ModuleList()
    for level in reversed(range(len(s.channel_mult))):
        for i in range(s.num_res_blocks + 1):
            layers = [_res_block(s, ch + skips.pop(), s.width(level))]
            ch = s.width(level)
            if rate in s.attention_resolutions:
                layers.append(_attention_block(s, ch, s.upsample_heads))
            if level and i == s.num_res_blocks:
                layers.append(_upsample(s, ch))
                rate //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks, ch


def _build_head(s, channels, rate, feature_size):
    """The classifier's pooling head, (N, C, H, W) or the "spatial" features -> (N, out_channels)."""
    if s.pool == "adaptive":
        return nn.Sequential(
            normalization(channels),
            SiLU(),
            nn.AdaptiveAvgPool2d((1, 1)),
            zero_module(conv_nd(s.dims, channels, s.out_channels, 1)),
            nn.Flatten(),
        )
    if s.pool == "attention":
        if s.num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels")
        pool = AttentionPool2d(
            s.image_size // rate, channels, s.num_head_channels, s.out_channels, attention_impl=s.attention_impl
        )
        return nn.Sequential(normalization(channels), SiLU(), pool)
    if s.pool == "spatial":
        return nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, s.out_channels))
    if s.pool == "spatial_v2":
        return nn.Sequential(
            nn.Linear(feature_size, 2048), normalization(2048), SiLU(), nn.Linear(2048, s.out_channels)
        )
    raise NotImplementedError(f"unexpected pool {s.pool!r}: use adaptive, attention, spatial or spatial_v2")


# --------------------------------------------------------------------------- networks


class _ADMNetwork(nn.Module):
    """What the UNet and the encoder share: their settings, the timestep MLP, half precision."""

    # The attributes the original sets on the model that are settings as given.
    _RECORDED = (
        "image_size",
        "model_channels",
        "out_channels",
        "num_res_blocks",
        "attention_resolutions",
        "dropout",
        "channel_mult",
        "conv_resample",
        "use_checkpoint",
        "use_fp16",
        "num_heads",
        "num_head_channels",
        "use_scale_shift_norm",
        "resblock_updown",
        "use_new_attention_order",
    )
    # Images stacked along channels at the input (SuperResModel: 2, x and the upsampled low-res image).
    _input_images = 1
    # The settings field the constructor does not take.
    _not_an_argument = None

    def __init__(self, settings):
        super().__init__()
        self.settings = settings
        for name in self._RECORDED:
            setattr(self, name, getattr(settings, name))
        self.in_channels = settings.in_channels * self._input_images
        # The original sets this attribute from use_fp16 alone and code written for it
        # reads model.dtype; convert_to_fp16/fp32 keep it in step with the weights here.
        self.dtype = th.float16 if settings.use_fp16 else th.float32
        self.time_embed_dim = dim = settings.time_embed_dim
        self.time_embed = nn.Sequential(linear(settings.model_channels, dim), SiLU(), linear(dim, dim))

    @classmethod
    def from_settings(cls, settings):
        """Build from a UNetSettings."""
        return cls(**settings.arguments(without=cls._not_an_argument))

    def _body(self):
        """The blocks that run in half precision after convert_to_fp16."""
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self):
        """Convert the convolutions of the input, middle and output blocks to float16."""
        for part in self._body():
            part.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self):
        """Convert the body back to float32."""
        for part in self._body():
            part.apply(convert_module_to_f32)
        self.dtype = th.float32

    def _body_dtype(self):
        """The dtype the blocks really compute in: that of the first convolution's weight.

        forward casts to this rather than to self.dtype, so a model built with
        use_fp16 but not yet converted (say, before its checkpoint is loaded) still
        runs, in float32; the original would feed float16 inputs to float32 weights.
        """
        return self.input_blocks[0][0].weight.dtype

    def _embed(self, timesteps):
        return self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (N, 4 * model_channels)


class UNetModel(_ADMNetwork):
    """The ADM UNet: noise (and variance) prediction from x_t, t and optionally a class.

    :param image_size: the input resolution (used by subclasses and the classifier).
    :param attention_resolutions: downsample rates (1, 2, 4, ...) with attention.
    :param channel_mult: width multiplier of model_channels at each level.
    :param num_classes: when set, the model is class-conditional (a label embedding
        added to the timestep embedding).
    :param num_heads_upsample: heads of the decoder's attention; -1 means num_heads.
    :param attention_impl: this model's attention kernel (see ATTENTION_IMPLEMENTATIONS);
        None follows the module default (set_attention_implementation).
    """

    _not_an_argument = "pool"

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        *,
        attention_impl=None,
    ):
        super().__init__(
            UNetSettings(
                image_size=image_size,
                in_channels=in_channels,
                model_channels=model_channels,
                out_channels=out_channels,
                num_res_blocks=num_res_blocks,
                attention_resolutions=attention_resolutions,
                dropout=dropout,
                channel_mult=channel_mult,
                conv_resample=conv_resample,
                dims=dims,
                num_classes=num_classes,
                use_checkpoint=use_checkpoint,
                use_fp16=use_fp16,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                num_heads_upsample=num_heads_upsample,
                use_scale_shift_norm=use_scale_shift_norm,
                resblock_updown=resblock_updown,
                use_new_attention_order=use_new_attention_order,
                attention_impl=attention_impl,
            )
        )
        s = self.settings
        self.num_classes = s.num_classes
        self.num_heads_upsample = s.upsample_heads
        if s.num_classes is not None:
            self.label_emb = nn.Embedding(s.num_classes, s.time_embed_dim)
        encoder = _build_input_blocks(s, self.in_channels)
        self.input_blocks = encoder.blocks
        self.middle_block = _build_middle_block(s, encoder.channels)
        self.output_blocks, ch = _build_output_blocks(s, encoder.skip_channels, encoder.channels, encoder.rate)
        self.out = nn.Sequential(
            normalization(ch), SiLU(), zero_module(conv_nd(s.dims, ch, s.out_channels, 3, padding=1))
        )

    def _body(self):
        return super()._body() + [self.output_blocks]

    def forward(self, x, timesteps, y=None):
        """Predict from x (N, C, ...) at timesteps (N,); y (N,) labels when class-conditional."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional (num_classes set)")
        emb = self._embed(timesteps)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        hs = []
        h = x.type(self._body_dtype())
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(th.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class SuperResModel(UNetModel):
    """A UNet that also sees a low-resolution image, upsampled bilinearly and concatenated.

    in_channels is that of one image; the network takes twice as many (model.in_channels),
    model.settings keeps one image's, so that SuperResModel.from_settings(model.settings)
    builds the same network.
    """

    _input_images = 2

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution image: pass low_res=(N, C, h, w)")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_ADMNetwork):
    """The UNet's encoder half with a pooling head: the noisy-image classifier (ADM, Sec. 4).

    :param pool: "adaptive" (GroupNorm, SiLU, global average pool, 1x1 conv),
        "attention" (AttentionPool2d; needs num_head_channels), "spatial" or
        "spatial_v2" (per-block spatial means concatenated, then an MLP).
    :param attention_impl: as for UNetModel.
    """

    _not_an_argument = "num_classes"

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
        *,
        attention_impl=None,
    ):
        super().__init__(
            UNetSettings(
                image_size=image_size,
                in_channels=in_channels,
                model_channels=model_channels,
                out_channels=out_channels,
                num_res_blocks=num_res_blocks,
                attention_resolutions=attention_resolutions,
                dropout=dropout,
                channel_mult=channel_mult,
                conv_resample=conv_resample,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_fp16=use_fp16,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                num_heads_upsample=num_heads_upsample,
                use_scale_shift_norm=use_scale_shift_norm,
                resblock_updown=resblock_updown,
                use_new_attention_order=use_new_attention_order,
                pool=pool,
                attention_impl=attention_impl,
            )
        )
        s = self.settings
        self.num_heads_upsample = s.num_heads_upsample  # unused here; the original records it as given
        self.pool = s.pool
        encoder = _build_input_blocks(s, self.in_channels)
        self.input_blocks = encoder.blocks
        self.middle_block = _build_middle_block(s, encoder.channels)
        self._feature_size = encoder.feature_size
        self.out = _build_head(s, encoder.channels, encoder.rate, encoder.feature_size)

    def forward(self, x, timesteps):
        """Class logits (N, out_channels) for noisy images x (N, C, H, W) at timesteps (N,)."""
        emb = self._embed(timesteps)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(self._body_dtype())
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(th.cat(means, dim=-1))
        return self.out(h.type(x.dtype))
