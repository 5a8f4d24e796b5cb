import json
import os

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import toy_data
from guided_diffusion.image_datasets import load_data
from guided_diffusion.toy_data import TOY_CLASSES, ensure_toy_dataset, make_toy_dataset, render_toy_image

N = 8  # images per class: small keeps these tests fast


def _pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def _samples(class_name, count, seed, size=16):
    rng = np.random.default_rng(seed)
    return np.stack([render_toy_image(class_name, size, rng) for _ in range(count)])


def test_label_i_is_toy_class_i(tmp_path):
    """The loader numbers classes by sorted file-name prefix; the judge and the tables name label i TOY_CLASSES[i]."""
    from guided_diffusion.image_datasets import class_names

    folder = ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N)
    assert class_names(folder) == list(TOY_CLASSES)


def test_creates_all_files_with_expected_names(tmp_path):
    folder = ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N)
    assert os.path.dirname(folder) == str(tmp_path)
    assert os.path.basename(folder) == f"toy_shapes_16px_{N}"
    expected = sorted(f"{c}_{i:05d}.png" for c in TOY_CLASSES for i in range(N))
    assert _pngs(folder) == expected
    with Image.open(os.path.join(folder, expected[0])) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    with open(os.path.join(folder, toy_data.MARKER_NAME)) as f:
        marker = json.load(f)
    assert marker["num_per_class"] == N and marker["image_size"] == 16
    # No temporary siblings are left behind.
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


def test_default_root_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDED_DIFFUSION_DATA", str(tmp_path))
    folder = ensure_toy_dataset(image_size=8, num_per_class=1)
    assert folder == os.path.join(str(tmp_path), "toy_shapes_8px_1")
    assert len(_pngs(folder)) == len(TOY_CLASSES)


def test_second_call_does_not_rewrite(tmp_path, monkeypatch):
    folder = ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N)
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}

    def fail(*args, **kwargs):
        raise AssertionError("should not regenerate a complete dataset")

    monkeypatch.setattr(toy_data, "make_toy_dataset", fail)
    assert ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N) == folder
    after = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    assert before == after


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_toy_dataset(str(tmp_path / "a"), image_size=16, num_per_class=4, seed=3)
    b = make_toy_dataset(str(tmp_path / "b"), image_size=16, num_per_class=4, seed=3)
    c = make_toy_dataset(str(tmp_path / "c"), image_size=16, num_per_class=4, seed=4)

    def read(folder, name):
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    names = _pngs(a)
    assert names == _pngs(b) == _pngs(c)
    assert all(read(a, n) == read(b, n) for n in names)
    assert not any(read(a, n) == read(c, n) for n in names)


def test_classes_separable_by_nearest_class_mean():
    train = {c: _samples(c, 48, seed=1).reshape(48, -1) / 255.0 for c in TOY_CLASSES}
    means = np.stack([train[c].mean(0) for c in TOY_CLASSES])
    correct = total = 0
    for label, c in enumerate(TOY_CLASSES):
        test = _samples(c, 32, seed=2).reshape(32, -1) / 255.0
        dists = ((test[:, None, :] - means[None]) ** 2).sum(-1)
        correct += int((dists.argmin(1) == label).sum())
        total += len(test)
    assert correct / total > 0.9


def test_images_vary_within_a_class():
    for c in TOY_CLASSES:
        imgs = _samples(c, 16, seed=5).astype(np.float64)
        flat = imgs.reshape(16, -1)
        assert len({row.tobytes() for row in flat}) == 16
        # Position, size and colours change, not just a pixel or two.
        assert imgs.std(0).mean() > 10


@pytest.mark.parametrize("size", [8, 33, 256])
def test_render_any_size(size):
    img = render_toy_image(TOY_CLASSES[0], size, np.random.default_rng(0))
    assert img.shape == (size, size, 3) and img.dtype == np.uint8


def test_render_unknown_class():
    with pytest.raises(ValueError, match="unknown toy class"):
        render_toy_image("hexagon", 16, np.random.default_rng(0))


def test_load_data_reads_toy_labels(tmp_path):
    folder = ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N)
    total = N * len(TOY_CLASSES)
    data = load_data(
        data_dir=folder, batch_size=total, image_size=16, class_cond=True, deterministic=True, random_flip=False
    )
    batch, cond = next(data)
    assert batch.shape == (total, 3, 16, 16)
    # Sorted file order: all of class 0, then class 1, ...
    expected = [label for label in range(len(TOY_CLASSES)) for _ in range(N)]
    assert cond["y"].tolist() == expected
    with Image.open(os.path.join(folder, _pngs(folder)[0])) as img:
        first = np.array(img)
    np.testing.assert_allclose(batch[0].numpy().transpose(1, 2, 0), first / 127.5 - 1, atol=1e-6)


def test_interrupted_creation_is_not_treated_as_complete(tmp_path, monkeypatch):
    real_save = toy_data._save_png
    calls = []

    def crash_midway(arr, path):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        real_save(arr, path)

    monkeypatch.setattr(toy_data, "_save_png", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N)
    folder = toy_data.toy_dataset_dir(str(tmp_path), 16, N)
    assert not os.path.exists(folder)
    assert os.listdir(tmp_path) == []  # the partial temp folder was removed

    monkeypatch.setattr(toy_data, "_save_png", real_save)
    assert ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N) == folder
    assert len(_pngs(folder)) == N * len(TOY_CLASSES)


def test_partial_folder_without_marker_is_regenerated(tmp_path):
    # What a hard kill (no cleanup) of an older, non-atomic writer could leave.
    folder = toy_data.toy_dataset_dir(str(tmp_path), 16, N)
    os.makedirs(folder)
    make_toy_dataset(folder, image_size=16, num_per_class=2)
    assert ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N) == folder
    assert len(_pngs(folder)) == N * len(TOY_CLASSES)
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


def test_concurrent_creator_finishing_first_is_accepted(tmp_path, monkeypatch):
    # Another rank renames its finished copy into place while we generate.
    folder = toy_data.toy_dataset_dir(str(tmp_path), 16, N)
    real_make = toy_data.make_toy_dataset

    def make_while_other_rank_finishes(tmp, *args, **kwargs):
        monkeypatch.setattr(toy_data, "make_toy_dataset", real_make)
        ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N)
        return real_make(tmp, *args, **kwargs)

    monkeypatch.setattr(toy_data, "make_toy_dataset", make_while_other_rank_finishes)
    assert ensure_toy_dataset(root=str(tmp_path), image_size=16, num_per_class=N) == folder
    assert len(_pngs(folder)) == N * len(TOY_CLASSES)
    assert os.listdir(tmp_path) == [os.path.basename(folder)]
