"""The command line as a user meets it: anticipated errors print one line (no traceback) and exit
non-zero, once under mpiexec; every script's --help shows each flag's own text with its default once."""

import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch as th

from guided_diffusion import flags as fl
from guided_diffusion import script_util as su
from guided_diffusion.cli import TRACEBACK_VAR
from guided_diffusion.errors import UsageError
from guided_diffusion.flags import FlagParser, given_flags, parse_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    diffusion_steps=20,
    noise_schedule="cosine",
)


def flag_args(flags):
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def run_script(script, argv, tmp_path, launcher=(), extra_env=None, timeout=240):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GUIDED_DIFFUSION_DATA": str(tmp_path / "data_cache"),
        "COLUMNS": "3000",
        **(extra_env or {}),
    }
    cmd = list(launcher) + [sys.executable, os.path.join(ROOT, script)] + list(argv)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def assert_clean_error(result, code, *names):
    """Non-zero exit with `code`, one error line prefixed with the script's name, naming each of `names`."""
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.match(r"^[a-z_]+\.py: error: ", errors[0]), errors[0]
    for name in names:
        assert name in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **TINY})
    path = tmp_path_factory.mktemp("ckpt") / "model000001.pt"
    th.save(model.state_dict(), path)
    return str(path)


# --------------------------------------------------------------------------- anticipated errors


def test_bad_flag_value_is_a_usage_error(tmp_path):
    result = run_script("scripts/image_sample.py", ["--use_ddim", "maybe"], tmp_path)
    assert_clean_error(result, 2, "--use_ddim", "maybe")
    assert result.stderr.startswith("usage: image_sample.py")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--lr", "-1"], "--lr"),
        (["--ema_rate", "0.9,abc"], "--ema_rate"),
        (["--dropout", "1.0"], "--dropout"),
        (["--num_channels", "0"], "--num_channels"),
    ],
)
def test_impossible_flag_values_are_usage_errors(argv, named):
    with pytest.raises(UsageError, match=named):
        parse_flags("test", su.model_and_diffusion_defaults(), fl.TRAIN_FLAGS, argv=argv)


def test_possible_flag_values_pass_their_checks():
    args = parse_flags(
        "test",
        su.model_and_diffusion_defaults(),
        fl.TRAIN_FLAGS,
        argv=["--lr", "0", "--ema_rate", "0.999,0.9999", "--dropout", "0.1", "--batch_size", "1"],
    )
    assert args.lr == 0 and args.ema_rate == "0.999,0.9999" and args.dropout == 0.1 and args.batch_size == 1


def test_misspelt_flag_names_the_closest_one(tmp_path):
    result = run_script("scripts/image_train.py", ["--lrr", "3"], tmp_path)
    assert_clean_error(result, 2, "--lrr", "did you mean --lr")


def test_missing_data_folder(tmp_path):
    result = run_script("scripts/image_train.py", ["--data_dir", str(tmp_path / "nowhere")], tmp_path)
    assert_clean_error(result, 1, "nowhere", "does not exist")


def test_unwritable_log_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_script("scripts/image_train.py", ["--log_dir", str(tmp_path / "a_file" / "logs")], tmp_path)
    assert_clean_error(result, 2, "--log_dir", "a_file")


def test_corrupt_image_is_named(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(4):
        from PIL import Image

        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / f"ok_{i}.png")
    (data / "ok_bad.png").write_bytes(b"not a png at all")
    argv = ["--data_dir", str(data), "--batch_size", "5", "--lr_anneal_steps", "2", "--log_dir", str(tmp_path / "log")]
    result = run_script("scripts/image_train.py", argv + flag_args(TINY), tmp_path)
    assert_clean_error(result, 1, "ok_bad.png")


def test_missing_and_corrupt_checkpoints(tmp_path):
    missing = run_script("scripts/image_sample.py", ["--model_path", str(tmp_path / "none.pt")], tmp_path)
    assert_clean_error(missing, 1, "none.pt", "not found")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    corrupt = run_script("scripts/image_sample.py", ["--model_path", str(bad)], tmp_path)
    assert_clean_error(corrupt, 1, "bad.pt")
    no_path = run_script("scripts/classifier_sample.py", [], tmp_path)
    assert_clean_error(no_path, 2, "--model_path")


def test_checkpoint_that_does_not_fit_the_flags(tmp_path, tiny_checkpoint):
    argv = ["--model_path", tiny_checkpoint, "--num_samples", "1"] + flag_args({**TINY, "num_channels": 64})
    result = run_script("scripts/image_sample.py", argv, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--num_channels 32" in result.stderr  # the diagnosis names the flag value that fits


def test_impossible_respacing_and_unknown_names(tmp_path, tiny_checkpoint):
    base = ["--model_path", tiny_checkpoint, "--num_samples", "1"] + flag_args(TINY)
    respacing = run_script("scripts/image_sample.py", base + ["--timestep_respacing", "ddim9"], tmp_path)
    assert_clean_error(respacing, 2, "ddim9")
    schedule = run_script("scripts/image_train.py", ["--noise_schedule", "cosinus"], tmp_path)
    assert_clean_error(schedule, 2, "cosinus")
    sampler = run_script("scripts/image_sample.py", base + ["--sampler", "euler"], tmp_path)
    assert_clean_error(sampler, 2, "--sampler", "euler")


def test_bad_base_samples(tmp_path):
    np.savez(tmp_path / "low.npz", np.zeros((2, 5, 5, 3), np.uint8))
    result = run_script(
        "scripts/super_res_sample.py",
        ["--base_samples", str(tmp_path / "low.npz"), "--model_path", "unused.pt"],
        tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_traceback_on_request(tmp_path):
    result = run_script(
        "scripts/image_train.py", ["--data_dir", str(tmp_path / "nowhere")], tmp_path, extra_env={TRACEBACK_VAR: "1"}
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "nowhere" in result.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    code = "from guided_diffusion.cli import run\ndef main():\n    raise KeyError('a bug')\nrun(main)\n"
    script = tmp_path / "buggy.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError" in result.stderr


DISTRIBUTED_CASES = {  # script, flags, what the message names
    "flags": ("scripts/image_sample.py", ["--use_ddim", "maybe"], "--use_ddim"),  # before the process group
    "checkpoint": ("scripts/image_sample.py", ["--model_path", "gone.pt"], "gone.pt"),  # read by rank 0 only
    "data": ("scripts/image_train.py", ["--data_dir", "nowhere"], "nowhere"),  # met by every rank
}


def assert_reported_once(result, start, name):
    """A non-zero exit, one message naming `name`, none of our code in a traceback, no rank left waiting."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not re.search(r'File ".*(guided_diffusion|scripts)/', result.stderr), result.stderr[-3000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if ": error: " in line]
    assert len(errors) == 1 and name in errors[0], result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - start < 100


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec (pip install mpi4py mpich)")
@pytest.mark.parametrize("case", sorted(DISTRIBUTED_CASES))
def test_errors_under_mpiexec_print_once_and_end_every_rank(tmp_path, case):
    script, argv, name = DISTRIBUTED_CASES[case]
    start = time.monotonic()
    result = run_script(script, argv, tmp_path, launcher=("mpiexec", "-n", "2"), timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert_reported_once(result, start, name)


def test_errors_under_torchrun_print_once_and_end_every_rank(tmp_path):
    """torchrun adds its own failure report (with a traceback of the launcher itself), never ours."""
    script, argv, name = DISTRIBUTED_CASES["checkpoint"]
    start = time.monotonic()
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python")
    result = run_script(script, argv + ["--log_dir", str(tmp_path / "log")], tmp_path, launcher=launcher, timeout=120)
    assert_reported_once(result, start, name)


# --------------------------------------------------------------------------- parsing


def test_parse_flags_records_the_given_flags():
    args = parse_flags(
        "test", fl.SAMPLE_FLAGS, su.model_and_diffusion_defaults(), argv=["--num_channels", "64", "--model_p", "m.pt"]
    )
    assert given_flags(args) == {"num_channels", "model_path"} and args.model_path == "m.pt"
    with pytest.raises(UsageError, match="--num_channels"):
        parse_flags("test", su.model_and_diffusion_defaults(), argv=["--num_channels", "many"])


def test_flag_parser_errors_are_usage_errors():
    parser = FlagParser(prog="x.py")
    parser.add_argument("--alpha", type=int)
    with pytest.raises(UsageError) as info:
        parser.parse_args(["--alpah", "1"])
    assert "did you mean --alpha" in str(info.value) and info.value.exit_code == 2


# --------------------------------------------------------------------------- help

MODEL = (fl.MODEL_FLAGS, fl.DIFFUSION_FLAGS)
SR_MODEL = (
    fl.FlagGroup(*[f for f in fl.MODEL_FLAGS if f.name in su.sr_model_and_diffusion_defaults()]),
    fl.SR_FLAGS,
    fl.DIFFUSION_FLAGS,
)

# Each script's flags, the later group's text winning where two define a flag (the script's own groups last).
SCRIPT_FLAGS = {
    "scripts/image_train.py": (fl.RUN_FLAGS, *MODEL, fl.TRAIN_FLAGS),
    "scripts/super_res_train.py": (fl.RUN_FLAGS, *SR_MODEL, fl.TRAIN_FLAGS),
    "scripts/classifier_train.py": (fl.RUN_FLAGS, fl.CLASSIFIER_FLAGS, fl.DIFFUSION_FLAGS, fl.CLASSIFIER_TRAIN_FLAGS),
    "scripts/image_sample.py": (fl.RUN_FLAGS, *MODEL, fl.SAMPLE_FLAGS),
    "scripts/classifier_sample.py": (fl.RUN_FLAGS, *MODEL, fl.CLASSIFIER_FLAGS, fl.SAMPLE_FLAGS, fl.GUIDANCE_FLAGS),
    "scripts/super_res_sample.py": (fl.RUN_FLAGS, *SR_MODEL, fl.SAMPLE_FLAGS, fl.SUPER_RES_SAMPLE_FLAGS),
    "scripts/image_nll.py": (fl.RUN_FLAGS, *MODEL, fl.NLL_FLAGS),
}
OTHER_SCRIPTS = [
    "scripts/toy_guidance.py",
    "scripts/describe_checkpoint.py",
    "evaluations/evaluator.py",
    "evaluations/make_reference_batch.py",
]


def help_entries(text):
    """{flag: help text} from argparse's --help output (COLUMNS wide enough for one line per entry)."""
    entries, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^  (--[a-z_0-9]+)(?: [A-Z_0-9]+)?(?:\s{2,}(.*))?$", line)
        if match and match.group(1) != "--help":
            body = match.group(2)
            if body is None and i + 1 < len(lines) and lines[i + 1].startswith(" " * 6):
                body = lines[i + 1].strip()
            entries[match.group(1)[2:]] = (body or "").strip()
    return entries


def expected_flags(groups):
    flags = {}
    for group in groups:
        flags.update((f.name, f) for f in group)
    return flags


@functools.lru_cache(maxsize=None)
def script_help(script):
    """{flag: text} of a script's --help, run once per script."""
    result = run_script(script, ["--help"], pathlib.Path(ROOT))
    assert result.returncode == 0, result.stderr
    return help_entries(result.stdout)


@pytest.mark.parametrize("script", sorted(SCRIPT_FLAGS))
def test_help_shows_each_flags_own_text_and_default_once(script):
    shown, expected = script_help(script), expected_flags(SCRIPT_FLAGS[script])
    assert set(shown) == set(expected), set(shown) ^ set(expected)
    for name, flag in expected.items():
        assert shown[name] == f"{flag.help} (default: {flag.default!r})", (script, name, shown[name])
        assert shown[name].count("default:") == 1


def test_help_texts_that_differ_by_script():
    nll, sample, train = (script_help(f"scripts/{name}.py") for name in ("image_nll", "image_sample", "image_train"))
    assert "evaluate" in nll["num_samples"] and "generate" in sample["num_samples"]
    assert "per-sample" in sample["seed"] and sample["seed"] != train["seed"]
    assert "train in float16" in train["use_fp16"] and "train" not in sample["use_fp16"]


@pytest.mark.parametrize("script", OTHER_SCRIPTS)
def test_other_scripts_document_every_flag(script, tmp_path):
    result = run_script(script, ["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    shown = help_entries(result.stdout)
    assert shown and all(text for text in shown.values()), shown
    assert all(text.count("(default") <= 1 for text in shown.values()), shown
