"""The main job's steps and measurements: in-process script runs, the held-out split, the judge's features,
one table row."""

import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch as th

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from guidance_experiment import (  # noqa: E402  (the scripts folder is not a package)
    ExperimentConfig,
    classifier_flags,
    format_table,
    held_out_real,
    judge_outputs,
    run_step,
    table_row,
)

from guided_diffusion import logger  # noqa: E402
from guided_diffusion.errors import UserError  # noqa: E402
from guided_diffusion.metrics import compute_statistics  # noqa: E402
from guided_diffusion.script_util import classifier_defaults, create_classifier  # noqa: E402
from guided_diffusion.toy_data import TOY_CLASSES  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return replace(ExperimentConfig(), samples_per_class=5)


@pytest.fixture(scope="module")
def held_out(cfg, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GUIDED_DIFFUSION_DATA", str(tmp_path_factory.mktemp("toy")))
    try:
        yield held_out_real(cfg)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def judge(cfg):
    th.manual_seed(0)
    flags = {**classifier_defaults(), **classifier_flags(cfg)}
    return create_classifier(**flags).eval()


def test_held_out_split_covers_every_class_and_is_disjoint(cfg, held_out):
    (row_images, row_labels), (ref_images, ref_labels) = held_out
    assert np.bincount(row_labels, minlength=len(TOY_CLASSES)).tolist() == [cfg.samples_per_class] * len(TOY_CLASSES)
    assert set(ref_labels.tolist()) == set(range(len(TOY_CLASSES)))
    assert len(row_images) + len(ref_images) == 256 * len(TOY_CLASSES)
    ref_bytes = {image.tobytes() for image in ref_images}
    assert not any(image.tobytes() in ref_bytes for image in row_images)


def test_judge_features_are_the_attention_pools_mean_token(judge, held_out):
    images = held_out[0][0]
    classes, features = judge_outputs(judge, images)
    assert classes.shape == (len(images),) and features.shape == (len(images), judge.out[-1].c_proj.in_channels)
    # Projecting the features with the pool's last layer gives the judge's logits back
    x = th.from_numpy(images).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    with th.no_grad():
        logits = judge(x, th.zeros(len(x), dtype=th.long))
        projected = judge.out[-1].c_proj(th.from_numpy(features)[:, :, None])[:, :, 0]
    assert th.allclose(projected, logits, atol=1e-5)
    assert np.array_equal(classes, logits.argmax(-1).numpy())


def test_table_row_measures_samples_against_the_reference(judge, held_out):
    (images, labels), (ref_images, _) = held_out
    ref_features = judge_outputs(judge, ref_images)[1]
    ref_stats = compute_statistics(ref_features)
    own = table_row("ref itself", judge, ref_images[:40], np.zeros(40, dtype=np.int64), ref_features, ref_stats)
    assert own["precision"] == 1.0  # every sample is a reference point
    row = table_row("real", judge, images, labels, ref_features, ref_stats)
    assert set(row) == {"samples", "accuracy", "diversity", "fid", "precision", "recall"}
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["fid"] > 0
    table = format_table([row, own]).splitlines()
    assert "FID" in table[0] and "precision" in table[0] and "recall" in table[0] and len(table) == 3


def test_a_step_logs_to_its_folder_and_restores_the_callers_logger(tmp_path, capsys):
    def fake_main(argv):
        logger.configure(dir=argv[argv.index("--log_dir") + 1], format_strs=["stdout", "log"])
        logger.log("inside the step")
        print("printed", file=sys.stderr)
        return argv[:-2]

    previous = logger.Logger.CURRENT
    assert run_step("fake", fake_main, ["--a", "1"], str(tmp_path / "step")) == ["--a", "1"]
    assert logger.Logger.CURRENT is previous
    assert capsys.readouterr() == ("", "")  # the console stays the main job's
    assert "inside the step" in (tmp_path / "step" / "log.txt").read_text()
    assert "inside the step" in (tmp_path / "step" / "stdout.txt").read_text()
    assert "printed" in (tmp_path / "step" / "stdout.txt").read_text()


def test_a_failing_step_names_itself_and_its_log(tmp_path, capsys):
    import image_train

    with pytest.raises(UserError, match=r"the diffusion training step failed \(unrecognized arguments: --no_such"):
        run_step("diffusion training", image_train.main, ["--no_such_flag", "1"], str(tmp_path / "step"))
    assert capsys.readouterr() == ("", "")
    assert "UsageError" in (tmp_path / "step" / "stdout.txt").read_text()  # the traceback is in the log

    def buggy_main(argv):
        raise KeyError("a bug")

    with pytest.raises(UserError, match=r"the buggy step failed \(KeyError: 'a bug'\); its log: .*stdout.txt"):
        run_step("buggy", buggy_main, [], str(tmp_path / "bug"))
