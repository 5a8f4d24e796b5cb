"""Released checkpoints are recognised by their layouts; describe() and describe_checkpoint.py say what a file is."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.checkpoints import layout_of
from guided_diffusion.layout_flags import LAYOUT_FREE_FLAGS
from guided_diffusion.released import (
    RELEASED,
    checkpoint_kind,
    describe,
    describe_state,
    format_description,
    match_released,
    released_flags,
    released_layout,
    released_record,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYOUT_DIR = ROOT / "tests" / "data" / "checkpoint_layouts"
LAYOUTS = sorted(LAYOUT_DIR.glob("*.json"))
SCRIPT = str(ROOT / "scripts" / "describe_checkpoint.py")
SHARED = "256x256_diffusion_uncond"  # the layout of 256x256_diffusion_uncond.pt and the LSUN files

TINY_MODEL = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16")
TINY_SUPER_RES = dict(large_size=32, small_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="16")
TINY_CLASSIFIER = dict(image_size=32, classifier_width=64, classifier_depth=1)


def spec_of(path):
    return json.loads(path.read_text())


def layout_in(spec):
    """{key: shape} of a released file, from its JSON: no tensors."""
    return {key: tuple(shape) for key, shape, _ in spec["state_dict"]}


def defaults_of(kind):
    return su.MODEL_KINDS[kind][0]()


def build(kind, flags):
    model, _ = su.create_from_flags(kind, {**defaults_of(kind), **flags})
    return model


# --------------------------------------------------------------------------- released layouts


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_each_released_layout_finds_its_record(path):
    spec = spec_of(path)
    layout = layout_in(spec)
    record = match_released(layout)
    assert record is not None and spec["checkpoint"] in record.files and record.kind == spec["kind"]
    assert match_released(layout, kind=spec["kind"]) is record
    assert list(released_layout(record).items()) == list(layout.items())  # same keys in the same order
    if spec["checkpoint"] in ("lsun_bedroom.pt", "256x256_diffusion_uncond.pt"):
        assert record.name == SHARED


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_released_flags_are_the_readmes(path):
    spec = spec_of(path)
    defaults = defaults_of(spec["kind"])
    flags = released_flags(match_released(layout_in(spec)), defaults)
    expected = {**defaults, **spec["flags"]}
    differing = {k for k in expected if flags[k] != expected[k]}
    # The LSUN files were trained with dropout 0.1; their shared record keeps 256x256_diffusion_uncond's 0.
    assert differing == ({"dropout"} if spec["checkpoint"] == "lsun_bedroom.pt" else set())
    assert differing <= set(LAYOUT_FREE_FLAGS)


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_a_changed_released_layout_matches_nothing(path):
    layout = layout_in(spec_of(path))
    keys = list(layout)
    for key in (keys[len(keys) // 2], keys[-1]):
        reshaped = {**layout, key: (layout[key][0] + 1,) + layout[key][1:]}
        assert match_released(reshaped) is None
        assert match_released({k: v for k, v in layout.items() if k != key}) is None


def test_records_cover_the_fifteen_released_files():
    files = [f for record in RELEASED for f in record.files]
    assert len(files) == len(set(files)) == 15
    assert {spec_of(p)["checkpoint"] for p in LAYOUTS} <= set(files)
    assert len({r.name for r in RELEASED}) == len(RELEASED) == 11
    layouts = [tuple(released_layout(r).items()) for r in RELEASED]
    assert len(set(layouts)) == len(layouts)  # one record per layout


def test_records_are_read_only():
    record = RELEASED[0]
    with pytest.raises(TypeError):
        record.flags["image_size"] = 32
    with pytest.raises(TypeError):
        released_layout(record)["time_embed.0.weight"] = (1, 1)
    assert hash(record) == hash(RELEASED[0])


def test_tiny_models_match_no_release():
    assert match_released(layout_of(build("diffusion", TINY_MODEL).state_dict())) is None
    assert match_released(layout_of(build("classifier", TINY_CLASSIFIER).state_dict())) is None
    assert match_released({}) is None


# --------------------------------------------------------------------------- checkpoint_kind


@pytest.mark.parametrize(
    "kind, flags",
    [
        ("diffusion", TINY_MODEL),
        ("diffusion", {**TINY_MODEL, "learn_sigma": True, "class_cond": True, "num_classes": 3}),
        ("super_res", TINY_SUPER_RES),
        ("super_res", {**TINY_SUPER_RES, "learn_sigma": True}),
        ("classifier", TINY_CLASSIFIER),
        ("classifier", {**TINY_CLASSIFIER, "classifier_pool": "adaptive"}),
    ],
)
def test_checkpoint_kind_of_models(kind, flags):
    assert checkpoint_kind(build(kind, flags).state_dict()) == kind


def adamw_state(model, lg_loss_scale=None):
    """An AdamW state_dict after one step (moments and step tensors for every parameter)."""
    opt = th.optim.AdamW(model.parameters(), lr=1e-4)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    state = opt.state_dict()
    if lg_loss_scale is not None:
        state["lg_loss_scale"] = lg_loss_scale  # as TrainLoop saves it for fp16 runs
    return state


def test_checkpoint_kind_of_other_objects():
    model = th.nn.Linear(2, 2)
    assert checkpoint_kind(adamw_state(model)) == "optimizer"
    assert checkpoint_kind(adamw_state(model, lg_loss_scale=16.0)) == "optimizer"
    for obj in ({}, model.state_dict(), [th.zeros(2)], {"a": 1}, th.zeros(2)):
        assert checkpoint_kind(obj) == "unknown"


# --------------------------------------------------------------------------- describe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny diffusion model's files, named as TrainLoop names them at step 3, and a corrupt one."""
    d = tmp_path_factory.mktemp("checkpoints")
    th.manual_seed(0)
    model = build("diffusion", {**TINY_MODEL, "learn_sigma": True})
    paths = {name: str(d / name) for name in ("model000003.pt", "ema_0.9999_000003.pt", "opt000003.pt", "bad.pt")}
    th.save(model.state_dict(), paths["model000003.pt"])
    th.save(model.state_dict(), paths["ema_0.9999_000003.pt"])
    th.save(adamw_state(model, lg_loss_scale=16.0), paths["opt000003.pt"])
    pathlib.Path(paths["bad.pt"]).write_bytes(b"not a checkpoint")
    return paths, model


def test_describe_a_model_infers_its_flags(files):
    paths, model = files
    d = describe(paths["model000003.pt"])
    assert (d["kind"], d["step"], d["released"], d["flags_source"]) == ("diffusion", 3, None, "inferred")
    assert "after 3 steps" in d["origin"]
    assert d["parameters"] == sum(t.numel() for t in model.state_dict().values())
    assert d["tensors"] == len(model.state_dict()) and d["dtypes"] == ["float32"]
    assert {k: d["flags"].get(k) for k in (*TINY_MODEL, "learn_sigma")} == {**TINY_MODEL, "learn_sigma": True}
    assert "--num_channels 32" in d["command"] and "--learn_sigma True" in d["command"]
    assert layout_of(build("diffusion", d["flags"]).state_dict()) == layout_of(model.state_dict())
    assert {"num_heads", "num_head_channels", "use_new_attention_order", "dropout"} <= set(d["unreadable_flags"])
    text = "\n".join(format_description(d))
    assert "released checkpoint: none" in text and "num_head_channels" in text


def test_describe_infers_a_super_resolution_models_flags():
    # small_size does not show in the layout; the default (64) must not keep large_size 64 from being tried.
    flags = {**TINY_SUPER_RES, "large_size": 64}
    d = describe_state(build("super_res", flags).state_dict(), "sr.pt")
    assert d["kind"] == "super_res" and d["flags_source"] == "inferred"
    assert d["flags"] == {k: v for k, v in flags.items() if k != "small_size"}
    assert "small_size" in d["unreadable_flags"]


def test_describe_ema_weights_and_optimizer_state(files):
    paths, model = files
    ema = describe(paths["ema_0.9999_000003.pt"])
    assert (ema["kind"], ema["ema_rate"], ema["step"]) == ("diffusion", 0.9999, 3)
    assert ema["origin"] == "EMA weights (rate 0.9999) of step 3"
    opt = describe(paths["opt000003.pt"])
    n = len(list(model.parameters()))
    assert (opt["kind"], opt["param_groups"], opt["optimized_parameters"], opt["lr"]) == ("optimizer", 1, n, [1e-4])
    assert opt["tensors"] == 3 * n and opt["lg_loss_scale"] == 16.0  # exp_avg, exp_avg_sq, step
    assert "lr 0.0001" in "\n".join(format_description(opt))


def test_describe_a_file_that_is_no_checkpoint(files):
    paths, _ = files
    with pytest.raises(ValueError, match="bad.pt"):
        describe(paths["bad.pt"])
    d = describe_state({"a": th.zeros(2, 3)}, "other.pt")
    assert (d["kind"], d["tensors"], d["parameters"]) == ("unknown", 1, 6) and "flags" not in d


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_describe_a_released_layout(path):
    spec = spec_of(path)
    # Expanded zero-stride tensors: the real shapes (and numel) without the memory.
    state = {key: th.zeros(1).expand(shape) for key, shape, _ in spec["state_dict"]}
    d = describe_state(state, spec["checkpoint"])
    assert d["kind"] == spec["kind"] and d["parameters"] == spec["parameters"]
    assert spec["checkpoint"] in d["released"]["files"] and d["flags_source"] == "released"
    defaults = defaults_of(spec["kind"])
    record = match_released(layout_in(spec))
    assert d["flags"] == {k: v for k, v in released_flags(record).items() if defaults[k] != v}
    assert d["unreadable_flags"] == []
    assert f"released checkpoint: {record.name}" in "\n".join(format_description(d))


def test_describe_names_the_flags_no_layout_shows():
    spec = spec_of(LAYOUT_DIR / "64x64_diffusion.json")
    d = describe_state({key: th.zeros(1).expand(shape) for key, shape, _ in spec["state_dict"]}, "64x64_diffusion.pt")
    for flag in ("--noise_schedule cosine", "--use_new_attention_order True", "--num_head_channels 64"):
        assert flag in d["command"]


# --------------------------------------------------------------------------- the script


def run_script(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=300)


def test_script_prints_json(files):
    paths, _ = files
    result = run_script("--json", paths["model000003.pt"], paths["ema_0.9999_000003.pt"], paths["opt000003.pt"])
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert [d["kind"] for d in described] == ["diffusion", "diffusion", "optimizer"]
    assert described[0]["flags"]["num_channels"] == 32 and described[1]["ema_rate"] == 0.9999


def test_script_reports_unreadable_files_without_a_traceback(files):
    paths, _ = files
    missing = paths["bad.pt"].replace("bad.pt", "missing.pt")
    result = run_script(paths["opt000003.pt"], paths["bad.pt"], missing)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"describe_checkpoint.py: error: cannot read {paths['bad.pt']}" in result.stderr
    assert "missing.pt" in result.stderr
    assert "opt000003.pt: optimizer state (saved after 3 steps)" in result.stdout  # the readable file still printed


def test_released_record_finds_each_layout_by_name_and_names_the_known_ones():
    assert [released_record(r.name) for r in RELEASED] == list(RELEASED)
    assert released_record("64x64_classifier").flags["classifier_depth"] == 4
    with pytest.raises(KeyError, match="64x64_diffusion"):
        released_record("64x64_difusion")
