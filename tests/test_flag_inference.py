"""A checkpoint is enough: a released layout brings its flags when the command line gives no model flags,
flags given on the command line win, and two checkpoints of one run must agree."""

import json
import os
import sys

import pytest
import torch as th

from guided_diffusion import logger, released, sampling
from guided_diffusion import script_util as su
from guided_diffusion.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = os.path.join(ROOT, "tests", "data", "checkpoint_layouts")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import classifier_sample  # noqa: E402  (the scripts folder is not a package)
import super_res_sample  # noqa: E402


def fake_state(name):
    """A state dict with the recorded layout of a released checkpoint; expanded scalars cost no memory."""
    with open(os.path.join(LAYOUTS, f"{name}.json")) as f:
        record = json.load(f)
    return {key: th.zeros(()).expand(*shape) for key, shape, _ in record["state_dict"]}, record


@pytest.mark.parametrize(
    "name",
    [
        "64x64_diffusion",
        "128x128_diffusion",
        "256x256_diffusion",
        "256x256_diffusion_uncond",
        "lsun_bedroom",
        "512x512_diffusion",
        "64x64_classifier",
        "128x128_classifier",
        "256x256_classifier",
        "512x512_classifier",
    ],
)
def test_released_layout_brings_its_flags(name):
    state, record = fake_state(name)
    args = classifier_sample.parse_args(["--timestep_respacing", "250"])  # a run-time flag keeps the inference
    flags, match = sampling.flags_for_checkpoint(record["kind"], args, state, f"models/{name}.pt")
    assert match is not None and record["checkpoint"] in match.files
    for flag, value in record["flags"].items():
        if flag in ("use_fp16", "dropout"):
            continue  # fp16 stays off on a CPU; dropout does not matter for sampling (LSUN vs uncond)
        assert flags[flag] == value and getattr(args, flag) == value, flag
    fp16_flag = su.MODEL_KINDS[record["kind"]][2]
    assert flags[fp16_flag] is False and args.timestep_respacing == "250"


@pytest.mark.parametrize("name", ["64_256_upsampler", "128_512_upsampler"])
def test_released_upsamplers_bring_their_flags(name):
    state, record = fake_state(name)
    args = super_res_sample.parse_args([])
    flags, match = sampling.flags_for_checkpoint("super_res", args, state, f"models/{name}.pt")
    assert match is not None and match.name == name
    assert {k: flags[k] for k in record["flags"] if k != "use_fp16"} == {
        k: v for k, v in record["flags"].items() if k != "use_fp16"
    }


def test_flags_given_on_the_command_line_win():
    state, _ = fake_state("64x64_diffusion")
    args = classifier_sample.parse_args(["--use_fp16", "True"])
    flags, _ = sampling.flags_for_checkpoint("diffusion", args, state, "m.pt")
    assert flags["use_fp16"] is True and flags["num_channels"] == 192  # a run-time flag keeps the rest
    args = classifier_sample.parse_args(["--num_channels", "192", "--class_cond", "True"])
    flags, match = sampling.flags_for_checkpoint("diffusion", args, state, "m.pt")
    assert match is not None  # recognised, but model flags were given: they and the defaults are used
    assert flags == su.args_to_dict(args, su.model_and_diffusion_defaults())
    assert flags["use_new_attention_order"] is False and flags["image_size"] == 64


def test_an_unknown_layout_keeps_the_flags():
    model, _ = su.create_model_and_diffusion(
        **{**su.model_and_diffusion_defaults(), "image_size": 16, "num_channels": 32, "num_res_blocks": 1}
    )
    args = classifier_sample.parse_args([])
    flags, match = sampling.flags_for_checkpoint("diffusion", args, model.state_dict(), "m.pt")
    assert match is None and flags == su.args_to_dict(args, su.model_and_diffusion_defaults())


def test_model_and_classifier_must_agree():
    args = classifier_sample.parse_args([])
    sampling.flags_for_checkpoint("diffusion", args, fake_state("64x64_diffusion")[0], "a.pt")
    with pytest.raises(UsageError, match="image_size"):
        sampling.flags_for_checkpoint("classifier", args, fake_state("256x256_classifier")[0], "b.pt")
    sampling.flags_for_checkpoint("classifier", args, fake_state("64x64_classifier")[0], "c.pt")
    assert args.image_size == 64 and args.classifier_depth == 4 and args.num_channels == 192


TINY_DIFFUSION = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    class_cond=True,
    num_classes=3,
    learn_sigma=True,
    diffusion_steps=20,
    noise_schedule="cosine",
)
TINY_CLASSIFIER = dict(
    image_size=16, classifier_width=64, classifier_depth=1, classifier_attention_resolutions="8", num_classes=3
)


def test_classifier_sample_runs_with_only_the_checkpoints(tmp_path, monkeypatch, capsys):
    """The script end to end, with two tiny 'released' records standing in for the real (550M) ones."""
    records = (
        released.ReleasedCheckpoint("tiny_diffusion", "diffusion", TINY_DIFFUSION, ("tiny_diffusion.pt",)),
        released.ReleasedCheckpoint("tiny_classifier", "classifier", TINY_CLASSIFIER, ("tiny_clf.pt",)),
    )
    monkeypatch.setattr(released, "RELEASED", records)
    monkeypatch.setattr(released, "_BY_NAME", {r.name: r for r in records})
    released._layout_by_name.cache_clear()
    paths = {}
    for record in records:
        model, _ = su.create_from_flags(record.kind, released.released_flags(record))
        paths[record.kind] = str(tmp_path / record.files[0])
        th.save(model.state_dict(), paths[record.kind])
    argv = [
        "classifier_sample.py",
        "--model_path",
        paths["diffusion"],
        "--classifier_path",
        paths["classifier"],
        "--classifier_scale",
        "1.0",
        "--num_samples",
        "2",
        "--batch_size",
        "2",
        "--timestep_respacing",
        "3",
        "--log_dir",
        str(tmp_path / "out"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    initialized = th.distributed.is_initialized()
    try:
        classifier_sample.main()
    finally:  # leave no process group, logger or cached layout behind for the other tests
        released._layout_by_name.cache_clear()
        logger.reset()
        if th.distributed.is_initialized() and not initialized:
            th.distributed.destroy_process_group()
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "tiny_diffusion.pt has the layout of the released tiny_diffusion.pt; using its flags:" in log
    assert "--num_channels 32" in log and "--classifier_depth 1" in log
    assert (tmp_path / "out" / "samples_2x16x16x3.npz").exists()
