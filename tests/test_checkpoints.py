"""Released checkpoint layouts load strictly; mismatches and bad files fail clearly."""

import json
import pathlib

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.checkpoints import CheckpointMismatchError, load_model_state, read_state_dict
from guided_diffusion.layout_flags import suggest_flags

LAYOUTS = sorted((pathlib.Path(__file__).parent / "data" / "checkpoint_layouts").glob("*.json"))

KINDS = su.MODEL_KINDS


def build_on_meta(kind, flags):
    defaults, _, fp16_flag = KINDS[kind]
    args = {**defaults(), **flags}
    with th.device("meta"):
        model, _ = su.create_from_flags(kind, args)
    if args[fp16_flag]:
        model.convert_to_fp16()
    return model


def test_all_twelve_layouts_are_present():
    assert len(LAYOUTS) == 12


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_released_layout_loads_strictly(path):
    spec = json.loads(path.read_text())
    model = build_on_meta(spec["kind"], spec["flags"])
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert got == spec["state_dict"]  # same keys, same order, same shapes, same dtypes
    assert sum(p.numel() for p in model.parameters()) == spec["parameters"]
    # The released files hold float32 tensors of this layout: they must load strictly.
    state = {k: th.empty(shape, dtype=th.float32, device="meta") for k, shape, _ in spec["state_dict"]}
    load_model_state(model, state, source=spec["checkpoint"])
    model.load_state_dict(state, strict=True)


TINY_MODEL = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16")
TINY_CLASSIFIER = dict(image_size=32, classifier_width=64, classifier_depth=1)


def mismatch_message(kind, flags, changed):
    defaults, factory, _ = KINDS[kind]
    args = {**defaults(), **flags}
    build = lambda **f: factory(**f)[0]
    checkpoint = build(**{**args, **changed}).state_dict()
    with pytest.raises(CheckpointMismatchError) as info:
        load_model_state(build(**args), checkpoint, source="ckpt.pt", flags=args, build=build, suggest=suggest_flags)
    return str(info.value)


@pytest.mark.parametrize(
    "kind, flags, changed",
    [
        ("diffusion", TINY_MODEL, {"class_cond": True}),
        ("diffusion", {**TINY_MODEL, "class_cond": True}, {"class_cond": False}),
        ("diffusion", TINY_MODEL, {"learn_sigma": True}),
        ("diffusion", TINY_MODEL, {"num_channels": 64}),
        ("diffusion", TINY_MODEL, {"num_res_blocks": 2}),
        ("diffusion", TINY_MODEL, {"resblock_updown": True}),
        ("diffusion", TINY_MODEL, {"attention_resolutions": "16,8"}),
        ("classifier", TINY_CLASSIFIER, {"classifier_depth": 3}),
        ("classifier", TINY_CLASSIFIER, {"classifier_width": 128}),
        ("classifier", TINY_CLASSIFIER, {"image_size": 64}),
        ("classifier", TINY_CLASSIFIER, {"num_classes": 4}),
        ("diffusion", {**TINY_MODEL, "class_cond": True}, {"num_classes": 10}),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) and len(v) == 1 else None,
)
def test_mismatch_names_the_differing_flag(kind, flags, changed):
    message = mismatch_message(kind, flags, changed)
    ((name, value),) = changed.items()
    assert f"--{name} {value}" in message
    assert "ckpt.pt" in message and "Fix:" in message


def test_mismatch_names_several_flags_at_once():
    message = mismatch_message("diffusion", TINY_MODEL, {"class_cond": True, "learn_sigma": True, "num_res_blocks": 2})
    assert "--class_cond True" in message and "--learn_sigma True" in message and "--num_res_blocks 2" in message


def test_mismatch_asks_the_given_suggestion_function():
    """checkpoints knows no flags: the caller may pass the function that names the fitting ones."""
    args = {**su.model_and_diffusion_defaults(), **TINY_MODEL}
    build = lambda **f: su.create_from_flags("diffusion", f)[0]
    seen = []
    suggest = lambda found, flags, build: seen.append(found) or {"answer": 42}
    with pytest.raises(CheckpointMismatchError, match="--answer 42"):
        load_model_state(
            build(**args), build(**{**args, "learn_sigma": True}).state_dict(), flags=args, build=build, suggest=suggest
        )
    assert seen and seen[0]["out.2.weight"][0] == 6


def test_mismatch_lists_the_keys_without_flags():
    model = su.create_model(**TINY_MODEL)
    state = model.state_dict()
    state["extra.weight"] = th.zeros(1)
    del state["out.2.bias"]
    state["time_embed.0.bias"] = th.zeros(3)
    with pytest.raises(CheckpointMismatchError) as info:
        load_model_state(model, state, source="x.pt")
    text = str(info.value)
    assert "missing keys (1): out.2.bias" in text and "unexpected keys (1): extra.weight" in text
    assert "time_embed.0.bias: checkpoint (3,) vs model (128,)" in text


def test_read_state_dict_round_trip_and_bad_files(tmp_path):
    model = su.create_model(**TINY_MODEL)
    path = tmp_path / "model.pt"
    th.save(model.state_dict(), path)
    loaded = read_state_dict(str(path))
    assert all(th.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_state_dict(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        read_state_dict(str(tmp_path / "junk.pt"))
    th.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a model state dict"):
        read_state_dict(str(tmp_path / "list.pt"))
    th.save({"w": th.zeros(2), "obj": pathlib.PurePosixPath("/x")}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="unsafe.pt"):  # weights_only refuses arbitrary objects
        read_state_dict(str(tmp_path / "unsafe.pt"))
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_state_dict(str(tmp_path / "truncated.pt"))
