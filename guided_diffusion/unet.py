"""The ADM networks (Dhariwal & Nichol 2021, Sec. 3): the diffusion UNet, the
super-resolution UNet and the noisy-image classifier (the UNet's encoder half).

Module and parameter names follow the original exactly, so its released
checkpoints load with strict=True. Shapes: x is (N, C, H, W) for dims=2; the
timestep embedding `emb` is (N, 4 * model_channels).
"""

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    SiLU,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

# How attention is computed: "sdpa" (torch's fused scaled_dot_product_attention) or "einsum"
# (the original's explicit softmax(QK^T)V, which materialises the T x T weights; the same
# function). "auto" is sdpa: with the channels of each head contiguous, the fused kernel
# runs 1.1-3.5x faster than einsum on a CPU (more at more tokens, forward and backward;
# benchmarks/unet_speed.py) and stores no T x T weights for backward.
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "einsum")
_attention_impl = "auto"


def set_attention_implementation(name):
    """Choose "auto" (default, = sdpa), "sdpa" or "einsum" (the original's arithmetic) for every attention layer."""
    global _attention_impl
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; use one of {ATTENTION_IMPLEMENTATIONS}")
    _attention_impl = name


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

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = up or down

        self.in_layers = nn.Sequential(normalization(channels), SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.h_upd, self.x_upd = _resamplers(channels, dims, up, down)
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), SiLU(), nn.Dropout(p=dropout),
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
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
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
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
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


def attention(q, k, v):
    """softmax(q k^T / sqrt(ch)) v per head: q (N, H, T, ch), k and v (N, H, S, ch) -> (N, H, T, ch).

    sdpa: torch's fused kernel (flash attention on CPUs and GPUs when each head's channels
    are contiguous, which the token layout gives). einsum: the original's arithmetic, q and
    k scaled by ch^(-1/4) each and the T x S weights normalised in float32 (fp16 stability).
    """
    if _attention_impl != "einsum":
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
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

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
        out = attention(q[:, :, :queries] if queries else q, k, v)  # (N, H, T', ch)
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
    H*W positions plus the mean token.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

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


# --------------------------------------------------------------------------- networks


@dataclass(frozen=True)
class UNetSettings:
    """Everything that shapes a UNet, a super-resolution UNet or an encoder, as typed values.

    Field names are the networks' constructor parameters. attention_resolutions are
    downsample rates (1, 2, 4, ...), channel_mult a tuple; num_classes and
    num_heads_upsample matter to the UNets only, pool to the encoder only.
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


def _constructor_args(settings, cls):
    """The settings that cls's constructor takes, by name."""
    import inspect

    for klass in cls.__mro__:  # SuperResModel passes *args on: read the UNet's parameters
        accepted = inspect.signature(klass.__init__).parameters
        if not any(p.kind == p.VAR_POSITIONAL for p in accepted.values()):
            break
    return {name: value for name, value in vars(settings).items() if name in accepted}


class _NetworkMixin:
    """What the UNet and the encoder share: their settings, the timestep MLP, half precision."""

    def _init_common(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                     attention_resolutions, dropout, channel_mult, conv_resample, use_checkpoint, use_fp16, num_heads,
                     num_head_channels, use_scale_shift_norm, resblock_updown, use_new_attention_order):
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        # The original sets this attribute from use_fp16 alone and code written for it
        # reads model.dtype; convert_to_fp16/fp32 keep it in step with the weights here.
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, self.time_embed_dim), SiLU(), linear(self.time_embed_dim, self.time_embed_dim),
        )

    def _body(self):
        return [self.input_blocks, self.middle_block] + ([self.output_blocks] if hasattr(self, "output_blocks") else [])

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


class _EncoderBuilder:
    """Builds the shared encoder half: input blocks and the middle block.

    Tracks the channel count, the downsample rate and the channels of every
    skip connection while blocks are added.
    """

    def __init__(self, net, in_channels, dims, conv_resample):
        self.net, self.dims, self.conv_resample = net, dims, conv_resample
        self.ch = int(net.channel_mult[0] * net.model_channels)
        self.ds = 1
        self.skip_chans = [self.ch]
        self.feature_size = self.ch  # sum of block widths, for the "spatial" classifier pools
        self.blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, self.ch, 3, padding=1))])

    def res_block(self, channels, out_channels, **kwargs):
        net = self.net
        return ResBlock(channels, net.time_embed_dim, net.dropout, out_channels=out_channels, dims=self.dims,
                        use_checkpoint=net.use_checkpoint, use_scale_shift_norm=net.use_scale_shift_norm, **kwargs)

    def attention_block(self, channels, num_heads):
        net = self.net
        return AttentionBlock(channels, use_checkpoint=net.use_checkpoint, num_heads=num_heads,
                              num_head_channels=net.num_head_channels,
                              use_new_attention_order=net.use_new_attention_order)

    def _append(self, *layers):
        self.blocks.append(TimestepEmbedSequential(*layers))
        self.skip_chans.append(self.ch)
        self.feature_size += self.ch

    def build_input_blocks(self):
        net = self.net
        for level, mult in enumerate(net.channel_mult):
            for _ in range(net.num_res_blocks):
                layers = [self.res_block(self.ch, int(mult * net.model_channels))]
                self.ch = int(mult * net.model_channels)
                if self.ds in net.attention_resolutions:
                    layers.append(self.attention_block(self.ch, net.num_heads))
                self._append(*layers)
            if level != len(net.channel_mult) - 1:
                self._append(self.downsample())
                self.ds *= 2
        return self.blocks

    def downsample(self):
        if self.net.resblock_updown:
            return self.res_block(self.ch, self.ch, down=True)
        return Downsample(self.ch, self.conv_resample, dims=self.dims, out_channels=self.ch)

    def build_middle_block(self):
        block = TimestepEmbedSequential(
            self.res_block(self.ch, None), self.attention_block(self.ch, self.net.num_heads), self.res_block(self.ch, None),
        )
        self.feature_size += self.ch
        return block


class UNetModel(_NetworkMixin, nn.Module):
    """The ADM UNet: noise (and variance) prediction from x_t, t and optionally a class.

    :param image_size: the input resolution (used by subclasses and the classifier).
    :param attention_resolutions: downsample rates (1, 2, 4, ...) with attention.
    :param channel_mult: width multiplier of model_channels at each level.
    :param num_classes: when set, the model is class-conditional (a label embedding
        added to the timestep embedding).
    :param num_heads_upsample: heads of the decoder's attention; -1 means num_heads.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False):
        super().__init__()
        self.num_classes = num_classes
        self._init_common(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                          dropout, channel_mult, conv_resample, use_checkpoint, use_fp16, num_heads,
                          num_head_channels, use_scale_shift_norm, resblock_updown, use_new_attention_order)
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, self.time_embed_dim)
        builder = _EncoderBuilder(self, in_channels, dims, conv_resample)
        self.input_blocks = builder.build_input_blocks()
        self.middle_block = builder.build_middle_block()
        self.output_blocks = self._build_output_blocks(builder)
        self.out = nn.Sequential(
            normalization(builder.ch), SiLU(),
            zero_module(conv_nd(dims, int(self.channel_mult[0] * model_channels), out_channels, 3, padding=1)),
        )

    @classmethod
    def from_settings(cls, settings):
        """Build from a UNetSettings."""
        return cls(**_constructor_args(settings, cls))

    def _build_output_blocks(self, builder):
        """The decoder: ResBlocks on [h, skip] concatenations, attention, upsampling."""
        blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                skip_ch = builder.skip_chans.pop()
                layers = [builder.res_block(builder.ch + skip_ch, int(self.model_channels * mult))]
                builder.ch = int(self.model_channels * mult)
                if builder.ds in self.attention_resolutions:
                    layers.append(builder.attention_block(builder.ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(self._upsample(builder))
                    builder.ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def _upsample(self, builder):
        if self.resblock_updown:
            return builder.res_block(builder.ch, builder.ch, up=True)
        return Upsample(builder.ch, self.conv_resample, dims=builder.dims, out_channels=builder.ch)

    def forward(self, x, timesteps, y=None):
        """Predict from x (N, C, ...) at timesteps (N,); y (N,) labels when class-conditional."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional (num_classes set)")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (N, 4 * model_channels)
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

    in_channels is that of one image; the network takes twice as many.
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    @classmethod
    def from_settings(cls, settings):
        """Build from a UNetSettings."""
        return cls(**_constructor_args(settings, cls))

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution image: pass low_res=(N, C, h, w)")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_NetworkMixin, nn.Module):
    """The UNet's encoder half with a pooling head: the noisy-image classifier (ADM, Sec. 4).

    :param pool: "adaptive" (GroupNorm, SiLU, global average pool, 1x1 conv),
        "attention" (AttentionPool2d; needs num_head_channels), "spatial" or
        "spatial_v2" (per-block spatial means concatenated, then an MLP).
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, use_checkpoint=False,
                 use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False, pool="adaptive"):
        super().__init__()
        self._init_common(image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                          dropout, channel_mult, conv_resample, use_checkpoint, use_fp16, num_heads,
                          num_head_channels, use_scale_shift_norm, resblock_updown, use_new_attention_order)
        self.num_heads_upsample = num_heads_upsample
        self.pool = pool
        builder = _EncoderBuilder(self, in_channels, dims, conv_resample)
        self.input_blocks = builder.build_input_blocks()
        self.middle_block = builder.build_middle_block()
        self._feature_size = builder.feature_size
        self.out = self._build_head(builder, dims)

    @classmethod
    def from_settings(cls, settings):
        """Build from a UNetSettings."""
        return cls(**_constructor_args(settings, cls))

    def _build_head(self, builder, dims):
        ch, out_channels = builder.ch, self.out_channels
        if self.pool == "adaptive":
            return nn.Sequential(normalization(ch), SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                 zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten())
        if self.pool == "attention":
            if self.num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            return nn.Sequential(normalization(ch), SiLU(),
                                 AttentionPool2d(self.image_size // builder.ds, ch, self.num_head_channels, out_channels))
        if self.pool == "spatial":
            return nn.Sequential(nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        if self.pool == "spatial_v2":
            return nn.Sequential(nn.Linear(self._feature_size, 2048), normalization(2048), SiLU(),
                                 nn.Linear(2048, out_channels))
        raise NotImplementedError(f"unexpected pool {self.pool!r}: use adaptive, attention, spatial or spatial_v2")

    def forward(self, x, timesteps):
        """Class logits (N, out_channels) for noisy images x (N, C, H, W) at timesteps (N,)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
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
