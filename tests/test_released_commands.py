"""The original README's sampling commands parse with our scripts and build the released layouts.

For each released checkpoint, its README flags (recorded in tests/data/checkpoint_layouts) are
passed as command-line strings to the script that samples it, exactly as the README writes them.
"""

import importlib.util
import json
import pathlib

import pytest
import torch as th

from guided_diffusion import script_util as su

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYOUTS = sorted((ROOT / "tests" / "data" / "checkpoint_layouts").glob("*.json"))
SAMPLE_FLAGS = ["--batch_size", "4", "--num_samples", "100", "--timestep_respacing", "250"]
SCRIPT_OF_KIND = {
    "diffusion": "image_sample.py",
    "classifier": "classifier_sample.py",
    "super_res": "super_res_sample.py",
}


def script_module(name):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_argv(flags):
    """Flags written as the README writes them: --name value, booleans as True/False."""
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_readme_flags_build_the_released_layout(path):
    spec = json.loads(path.read_text())
    argv = readme_argv(spec["flags"]) + SAMPLE_FLAGS
    if spec["kind"] == "classifier":  # classifier_sample.py with a 256x256 diffusion model's flags
        argv += ["--classifier_scale", "1.0", "--classifier_use_fp16", "True"]
    args = script_module(SCRIPT_OF_KIND[spec["kind"]]).parse_args(argv)
    defaults = su.MODEL_KINDS[spec["kind"]][0]()
    with th.device("meta"):
        model, diffusion = su.create_from_flags(spec["kind"], su.args_to_dict(args, defaults))
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert layout == [[k, shape] for k, shape, _ in spec["state_dict"]]
    assert diffusion.num_timesteps == 250 and diffusion.original_num_steps == 1000


def test_readme_ddim_flags_parse():
    args = script_module("classifier_sample.py").parse_args(
        ["--timestep_respacing", "ddim25", "--use_ddim", "True", "--classifier_depth", "4"]
    )
    assert args.use_ddim is True and args.classifier_depth == 4 and args.timestep_respacing == "ddim25"


def test_readme_fast_sampler_flags_parse():
    args = script_module("classifier_sample.py").parse_args(
        ["--sampler", "dpm++2m", "--sampling_steps", "15", "--classifier_depth", "4"]
    )
    assert (args.sampler, args.sampling_steps, args.timestep_respacing) == ("dpm++2m", 15, "")
    assert script_module("image_sample.py").parse_args(["--use_ddim", "True"]).sampler == "ddim"
