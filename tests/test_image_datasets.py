import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import dist_util, logger
from guided_diffusion.errors import UsageError
from guided_diffusion.image_datasets import (
    CLASS_NAMES_FILE,
    ImageDataset,
    _list_image_files_recursively,
    center_crop_arr,
    class_names,
    class_names_beside,
    find_class_names,
    labeled_data_dir,
    load_data,
    load_superres_data,
    random_crop_arr,
    read_class_names,
    save_class_names,
    training_data_dir,
)
from guided_diffusion.toy_data import TOY_CLASSES


def _solid(path, value, size=(16, 16)):
    """Write a solid-grey image; ``value`` doubles as an identity marker."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _half_black_half_white(path, size=16):
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:, size // 2 :] = 255
    Image.fromarray(arr).save(path)
    return path


def _noise_image(size, seed=0):
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _grey_of(batch):
    """Recover the 0..255 marker value of each solid image in a batch."""
    return [int(round((float(x.mean()) + 1) * 127.5)) for x in batch]


def test_labels_follow_sorted_file_name_prefixes(tmp_path):
    _solid(str(tmp_path / "dog_1.png"), 10)
    _solid(str(tmp_path / "cat_2.png"), 20)
    _solid(str(tmp_path / "cat_3.png"), 30)
    _solid(str(tmp_path / "bird_x_y.png"), 40)
    data = load_data(data_dir=str(tmp_path), batch_size=4, image_size=8, class_cond=True, deterministic=True)
    batch, cond = next(data)
    # Sorted paths: bird_x_y, cat_2, cat_3, dog_1; classes bird=0, cat=1, dog=2.
    assert _grey_of(batch) == [40, 20, 30, 10]
    assert cond["y"].dtype == torch.int64
    assert cond["y"].tolist() == [0, 1, 1, 2]


def test_batch_shape_dtype_and_range(tmp_path):
    _solid(str(tmp_path / "a.png"), 0, size=(20, 24))
    _solid(str(tmp_path / "b.png"), 255, size=(30, 17))
    _noise_image((40, 40)).save(tmp_path / "c.png")
    data = load_data(data_dir=str(tmp_path), batch_size=3, image_size=16, deterministic=True)
    batch, cond = next(data)
    assert cond == {}
    assert batch.dtype == torch.float32
    assert batch.shape == (3, 3, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1
    assert torch.all(batch[0] == -1) and torch.all(batch[1] == 1)


def test_center_crop_sizes():
    for (w, h), size in [((20, 10), 16), ((64, 64), 64), ((33, 90), 32)]:
        arr = center_crop_arr(_noise_image((w, h)), size)
        assert arr.shape == (size, size, 3) and arr.dtype == np.uint8


def test_center_crop_box_halving_then_bicubic():
    img = _noise_image((1000, 520))
    # By hand: 520 >= 128 -> 500x260 -> 250x130 -> 125x65, then bicubic to
    # short side 64 (125 * 64/65 rounds to 123), then crop the middle.
    expected = img
    for size in [(500, 260), (250, 130), (125, 65)]:
        expected = expected.resize(size, resample=Image.BOX)
    expected = np.array(expected.resize((123, 64), resample=Image.BICUBIC))
    left = (123 - 64) // 2
    got = center_crop_arr(img, 64)
    np.testing.assert_array_equal(got, expected[:, left : left + 64])
    # The direct bicubic path gives something else, so the box path mattered.
    direct = np.array(img.resize((123, 64), resample=Image.BICUBIC))
    assert not np.array_equal(got, direct[:, left : left + 64])


def test_random_crop_size_and_window():
    img = _noise_image((70, 50))
    crops = []
    for seed in range(6):
        random.seed(seed)
        smaller = random.randrange(32, math.ceil(32 / 0.8) + 1)
        resized = np.array(img.resize((round(70 * smaller / 50), smaller), resample=Image.BICUBIC))
        top = random.randrange(resized.shape[0] - 32 + 1)
        left = random.randrange(resized.shape[1] - 32 + 1)
        random.seed(seed)
        crop = random_crop_arr(img, 32)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, resized[top : top + 32, left : left + 32])
        crops.append(crop)
    assert any(not np.array_equal(crops[0], c) for c in crops[1:])


def _left_pixels(dataset):
    # -1 (black) at the top-left means unflipped, +1 (white) means flipped.
    return [float(dataset[i][0][0, 0, 0]) for i in range(len(dataset))]


def test_random_flip(tmp_path):
    path = _half_black_half_white(str(tmp_path / "half.png"))
    random.seed(0)
    flipping = _left_pixels(ImageDataset(16, [path] * 32, random_flip=True))
    assert set(flipping) == {-1.0, 1.0}
    random.seed(0)
    never = _left_pixels(ImageDataset(16, [path] * 32, random_flip=False))
    assert set(never) == {-1.0}
    random.seed(0)
    ds = ImageDataset(16, [path] * 16, random_flip=True)
    items = [ds[i][0] for i in range(16)]
    plain = next(x for x in items if x[0, 0, 0] == -1)
    flipped = next(x for x in items if x[0, 0, 0] == 1)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_shards_are_disjoint_and_cover_everything(tmp_path):
    paths = [_solid(str(tmp_path / f"c{i % 2}_{i}.png"), i) for i in range(5)]
    classes = [i % 2 for i in range(5)]
    shards = [ImageDataset(8, paths, classes=classes, shard=r, num_shards=2) for r in range(2)]
    first, second = (set(s.local_images) for s in shards)
    assert not first & second and first | second == set(paths)
    assert [len(s) for s in shards] == [3, 2]
    for s in shards:
        for i, path in enumerate(s.local_images):
            assert int(s[i][1]["y"]) == classes[paths.index(path)]


def test_load_data_reads_only_this_ranks_shard(tmp_path, monkeypatch):
    for i in range(6):
        _solid(str(tmp_path / f"img_{i}.png"), 10 * i)
    monkeypatch.setattr(dist_util, "get_rank", lambda: 1)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 2)
    data = load_data(data_dir=str(tmp_path), batch_size=3, image_size=8, deterministic=True)
    assert _grey_of(next(data)[0]) == [10, 30, 50]


def test_deterministic_order_repeats_every_epoch(tmp_path):
    for i in range(6):
        _solid(str(tmp_path / f"img_{i}.png"), 10 * i)
    data = load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, deterministic=True)
    seen = [v for _ in range(6) for v in _grey_of(next(data)[0])]
    assert seen == [0, 10, 20, 30, 40, 50] * 2


def test_nested_folders_and_extensions(tmp_path):
    _solid(str(tmp_path / "a" / "x.png"), 1)
    _solid(str(tmp_path / "b" / "c" / "y.jpg"), 2)
    _solid(str(tmp_path / "z.gif"), 3)
    _solid(str(tmp_path / "UPPER.JPEG"), 4)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "png").mkdir()  # an extension-less folder name
    found = _list_image_files_recursively(str(tmp_path))
    rel = [os.path.relpath(p, tmp_path) for p in found]
    assert rel == ["UPPER.JPEG", os.path.join("a", "x.png"), os.path.join("b", "c", "y.jpg"), "z.gif"]
    batch, _ = next(load_data(data_dir=str(tmp_path), batch_size=4, image_size=8, deterministic=True))
    assert batch.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("data_dir", [None, ""])
def test_error_missing_data_dir_flag(data_dir):
    with pytest.raises(ValueError, match="--data_dir is required"):
        load_data(data_dir=data_dir, batch_size=1, image_size=8)


def test_error_folder_does_not_exist(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist") as info:
        load_data(data_dir=missing, batch_size=1, image_size=8)
    assert missing in str(info.value)


def test_error_data_dir_is_a_file(tmp_path):
    path = _solid(str(tmp_path / "one.png"), 5)
    with pytest.raises(ValueError, match="not a directory"):
        load_data(data_dir=path, batch_size=1, image_size=8)


def test_error_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="no images") as info:
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8)
    for ext in (".jpg", ".jpeg", ".png", ".gif"):
        assert ext in str(info.value)


def test_error_unreadable_image_names_the_file(tmp_path):
    good = _solid(str(tmp_path / "good.png"), 5)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    truncated = tmp_path / "truncated.png"
    with open(good, "rb") as f:
        truncated.write_bytes(f.read()[:40])
    ds = ImageDataset(8, [str(garbage), str(truncated)])
    for i, path in enumerate([garbage, truncated]):
        with pytest.raises(ValueError) as info:
            ds[i]
        assert str(path) in str(info.value)
        assert info.value.__cause__ is not None
    # Through the loader (a worker process) the file is still named.
    os.remove(truncated)
    data = load_data(data_dir=str(tmp_path), batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="garbage.png"):
        next(data)


def test_error_class_cond_without_prefix(tmp_path):
    _solid(str(tmp_path / "cat_1.png"), 5)
    _solid(str(tmp_path / "noprefix.png"), 6)
    # Raised by the call itself, before any loader or worker exists.
    with pytest.raises(ValueError, match="noprefix.png") as info:
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True)
    assert "<class>_" in str(info.value)
    # Without class_cond the same folder is fine.
    next(load_data(data_dir=str(tmp_path), batch_size=2, image_size=8))


def test_error_fewer_images_than_batch(tmp_path):
    _solid(str(tmp_path / "a.png"), 5)
    with pytest.raises(ValueError, match="batch_size is 4"):
        load_data(data_dir=str(tmp_path), batch_size=4, image_size=8)


# --- label_source="folder": the class is the parent folder's name -----------

_GREY_OF_CLASS = {"bird": 40, "cat": 80, "dog": 160}


def _nested_class_tree(root):
    """root/a/cat/1.png, root/a/dog/2.png, root/b/dog/3.png, root/bird/x_4.png."""
    for rel, name in [("a/cat/1.png", "cat"), ("a/dog/2.png", "dog"), ("b/dog/3.png", "dog"), ("bird/x_4.png", "bird")]:
        _solid(os.path.join(str(root), rel), _GREY_OF_CLASS[name])


def test_folder_class_names_are_sorted_parent_folders(tmp_path):
    _nested_class_tree(tmp_path)
    assert class_names(str(tmp_path), label_source="folder") == ["bird", "cat", "dog"]
    # A trailing slash on the folder changes nothing.
    assert class_names(str(tmp_path) + os.sep, "folder") == ["bird", "cat", "dog"]


def test_folder_labels_follow_each_images_parent_folder(tmp_path):
    _nested_class_tree(tmp_path)
    data = load_data(
        data_dir=str(tmp_path),
        batch_size=4,
        image_size=8,
        class_cond=True,
        deterministic=True,
        random_flip=False,
        label_source="folder",
    )
    label_of_grey = {grey: i for i, grey in enumerate(_GREY_OF_CLASS[n] for n in ["bird", "cat", "dog"])}
    for _ in range(2):  # two epochs, same answer
        batch, cond = next(data)
        greys = _grey_of(batch)
        assert sorted(greys) == [40, 80, 160, 160]
        assert cond["y"].dtype == torch.int64
        assert cond["y"].tolist() == [label_of_grey[g] for g in greys]


def test_folder_labels_through_superres_loader(tmp_path):
    _nested_class_tree(tmp_path)
    data = load_superres_data(str(tmp_path), 4, 8, 4, class_cond=True, label_source="folder")
    batch, cond = next(data)
    assert cond["low_res"].shape == (4, 3, 4, 4)
    label_of_grey = {40: 0, 80: 1, 160: 2}
    assert cond["y"].tolist() == [label_of_grey[g] for g in _grey_of(batch)]


def test_filename_source_is_still_the_default_on_nested_trees(tmp_path):
    _nested_class_tree(tmp_path)
    (tmp_path / "a" / "cat" / "1.png").rename(tmp_path / "a" / "cat" / "cat_1.png")
    (tmp_path / "a" / "dog" / "2.png").rename(tmp_path / "a" / "dog" / "dog_2.png")
    (tmp_path / "b" / "dog" / "3.png").rename(tmp_path / "b" / "dog" / "dog_3.png")
    assert class_names(str(tmp_path)) == ["cat", "dog", "x"]


def test_error_folder_source_image_directly_in_data_dir(tmp_path):
    _nested_class_tree(tmp_path)
    loose = _solid(str(tmp_path / "loose.png"), 7)
    for call in (
        lambda: class_names(str(tmp_path), label_source="folder"),
        lambda: load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True, label_source="folder"),
    ):
        with pytest.raises(ValueError, match="--label_source filename") as info:
            call()
        assert loose in str(info.value)
        assert "class folder" in str(info.value)
    # Without class_cond no label is needed, so the folder is fine.
    next(load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, label_source="folder"))


@pytest.mark.parametrize("bad", ["folders", "", None, "FILENAME"])
def test_error_unknown_label_source(tmp_path, bad):
    _nested_class_tree(tmp_path)
    for call in (
        lambda: load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, label_source=bad),
        lambda: class_names(str(tmp_path), label_source=bad),
    ):
        with pytest.raises(ValueError, match="--label_source") as info:
            call()
        message = str(info.value)
        assert repr(bad) in message
        assert "'filename'" in message and "'folder'" in message


# --- the class map as a file ------------------------------------------------


def test_class_names_file_round_trip(tmp_path):
    names = ["bird", "cat", "chien_é", "猫", "dog"]
    path = str(tmp_path / CLASS_NAMES_FILE)
    save_class_names(names, path)
    assert read_class_names(path) == names
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == {"class_names": names}
    # Overwriting leaves no temporary files behind.
    save_class_names(["x"], path)
    assert read_class_names(path) == ["x"]
    assert os.listdir(tmp_path) == [CLASS_NAMES_FILE]


def test_find_class_names_beside_a_checkpoint(tmp_path):
    checkpoint = str(tmp_path / "run" / "model001000.pt")
    os.makedirs(os.path.dirname(checkpoint))
    assert find_class_names(checkpoint) is None
    save_class_names(["cat", "dog"], os.path.join(os.path.dirname(checkpoint), CLASS_NAMES_FILE))
    assert find_class_names(checkpoint) == ["cat", "dog"]
    assert find_class_names(str(tmp_path / "elsewhere" / "model.pt")) is None


def test_find_class_names_for_a_bare_checkpoint_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_class_names("model.pt") is None
    save_class_names(["a"], CLASS_NAMES_FILE)
    assert find_class_names("model.pt") == ["a"]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b'{"names": ["a"]}',
        b'{"class_names": "cat"}',
        b'{"class_names": ["a", 3]}',
        b"\xff\xfe\x00",
    ],
)
def test_error_corrupt_class_names_file(tmp_path, content):
    path = tmp_path / CLASS_NAMES_FILE
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_class_names(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=CLASS_NAMES_FILE):
        find_class_names(str(tmp_path / "model.pt"))


# --- which folder to train on -------------------------------------------------


def test_training_data_dir_keeps_a_given_folder_and_falls_back_to_the_toy_set(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDED_DIFFUSION_DATA", str(tmp_path / "cache"))
    assert training_data_dir("my/images", 8) == "my/images"
    with logger.scoped_configure(dir=str(tmp_path / "logs"), format_strs=[]):
        train, val = training_data_dir("", 8), training_data_dir("", 8, validation=True)
    assert train != val and os.path.dirname(train) == str(tmp_path / "cache")
    assert class_names(train) == list(TOY_CLASSES) == class_names(val)
    first = lambda folder: np.array(Image.open(os.path.join(folder, "circle_00000.png")))
    assert not np.array_equal(first(train), first(val))  # held out: other images of the same classes


def test_labeled_data_dir_saves_the_class_map_beside_the_checkpoints(tmp_path):
    for name in ("dog", "cat"):
        _solid(str(tmp_path / "data" / f"{name}_0.png"), 1)
    with logger.scoped_configure(dir=str(tmp_path / "logs"), format_strs=[]):
        assert labeled_data_dir(str(tmp_path / "data"), 8, num_classes=2) == str(tmp_path / "data")
    assert read_class_names(str(tmp_path / "logs" / CLASS_NAMES_FILE)) == ["cat", "dog"]
    assert class_names_beside("", str(tmp_path / "logs" / "model000100.pt")) == ["cat", "dog"]
    assert class_names_beside(str(tmp_path / "data" / "model.pt")) is None
    with pytest.raises(UsageError, match="pass --num_classes 2"):
        labeled_data_dir(str(tmp_path / "data"), 8, num_classes=1, validation=True)
