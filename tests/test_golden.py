"""Numbers pinned to the original guided-diffusion: tests/data/golden/gd_reference.pt holds its outputs on a
tiny fixed configuration (see the README there). The schedules, respacing and the diffusion's closed forms
match exactly. Network outputs match within float32 rounding (max abs differences of 1e-6 to 2e-6 on this
project's AVX2 CPU, with either attention kernel): convolution kernels and the fused attention sum in another
order than on the machine that made the reference; the samplers' and losses' formulas amplify that rounding
(x_0 = x_t / sqrt(alpha_bar) - ... at t near T), hence the scaled tolerances below."""

import os

import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import unet
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion
from guided_diffusion.unet import EncoderUNetModel

GOLDEN = th.load(os.path.join(os.path.dirname(__file__), "data", "golden", "gd_reference.pt"), weights_only=True)
# (rtol, atol) per attention implementation: einsum is the original's arithmetic, auto the fused kernel.
TOLERANCE = {"einsum": (1e-5, 1e-5), "auto": (1e-5, 1e-5)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = th.get_num_threads()
    th.set_num_threads(1)  # the reference was computed with one thread: the same summation order
    yield
    th.set_num_threads(threads)


@pytest.fixture(params=["einsum", "auto"])
def impl(request, monkeypatch):
    monkeypatch.setattr(unet, "_attention_impl", request.param)
    return request.param


def close(actual, expected, impl, scale=1.0):
    rtol, atol = TOLERANCE[impl]
    th.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale)


@pytest.fixture(scope="module")
def model_and_diffusion():
    model, diffusion = create_model_and_diffusion(**GOLDEN["model_flags"])
    model.load_state_dict(GOLDEN["model_state"], strict=True)
    return model.eval(), diffusion


@pytest.fixture(scope="module")
def classifier():
    model = EncoderUNetModel(**GOLDEN["classifier_kwargs"])
    model.load_state_dict(GOLDEN["classifier_state"], strict=True)
    return model.eval()


def test_schedules_and_respacing_are_exact():
    for name, steps in (("linear", 1000), ("cosine", 1000), ("cosine", 50)):
        betas = th.from_numpy(gd.get_named_beta_schedule(name, steps))
        assert th.equal(betas, GOLDEN[f"betas_{name}_{steps}"])
    for spec, kept in GOLDEN["respacing"].items():
        assert sorted(space_timesteps(1000, spec)) == list(kept)


def test_forward_process_and_posterior_are_exact(model_and_diffusion):
    _, diffusion = model_and_diffusion
    x, noise, t = GOLDEN["x_start"], GOLDEN["noise"], GOLDEN["t"]
    x_t = diffusion.q_sample(x, t, noise=noise)
    assert th.equal(x_t, GOLDEN["q_sample"])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x, x_t, t)
    for key, value in dict(mean=mean, variance=variance, log_variance=log_variance).items():
        assert th.equal(value, GOLDEN["q_posterior"][key]), key


def test_model_output(model_and_diffusion, impl):
    model, _ = model_and_diffusion
    with th.no_grad():
        close(model(GOLDEN["x_start"], GOLDEN["t"], y=GOLDEN["y"]), GOLDEN["model_out"], impl)


def test_p_mean_variance_and_training_losses(model_and_diffusion, impl):
    model, diffusion = model_and_diffusion
    x, t, y = GOLDEN["x_start"], GOLDEN["t"], GOLDEN["y"]
    with th.no_grad():
        out = diffusion.p_mean_variance(model, GOLDEN["q_sample"], t, clip_denoised=True, model_kwargs={"y": y})
        for key, value in GOLDEN["p_mean_variance"].items():
            # At t = 49 of 50 the x_0 prediction multiplies the eps error by 1 / sqrt(alpha_bar) ~ 14.
            close(out[key], value, impl, scale=50)
        losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=GOLDEN["noise"])
    for key, value in GOLDEN["training_losses"].items():
        close(losses[key], value, impl, scale=10)


def test_classifier_logits(classifier, impl):
    with th.no_grad():
        close(classifier(GOLDEN["x_start"], GOLDEN["t"]), GOLDEN["classifier_logits"], impl)


def guidance(classifier):
    """The reference's cond_fn: 2.0 * grad_x log_softmax(classifier(x, t))[y % 10]."""

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(y)), y % 10]
            return th.autograd.grad(selected.sum(), x_in)[0] * 2.0

    return cond_fn


def spaced(spec):
    flags = GOLDEN["model_flags"]
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        timestep_respacing=spec,
    )


@pytest.mark.parametrize(
    "key, spec, guided, seed",
    [
        ("ddim10_sample", "ddim10", False, None),
        ("ddim10_guided_sample", "ddim10", True, None),
        ("ddim10_eta1_sample_seed123", "ddim10", False, 123),
        ("ddpm10_sample_seed123", "10", False, 123),
        ("ddpm10_guided_sample_seed123", "10", True, 123),
    ],
)
def test_sampling_loops(model_and_diffusion, classifier, impl, key, spec, guided, seed):
    model, _ = model_and_diffusion
    diffusion = spaced(spec)
    kwargs = dict(
        noise=GOLDEN["noise"],
        clip_denoised=True,
        model_kwargs={"y": GOLDEN["y"]},
        cond_fn=guidance(classifier) if guided else None,
    )
    if seed is not None:
        th.manual_seed(seed)
    if spec.startswith("ddim"):
        sample = diffusion.ddim_sample_loop(model, GOLDEN["noise"].shape, eta=1.0 if "eta1" in key else 0.0, **kwargs)
    else:
        sample = diffusion.p_sample_loop(model, GOLDEN["noise"].shape, **kwargs)
    close(sample, GOLDEN[key], impl, scale=10)


def test_ddim_reverse_sample(model_and_diffusion, impl):
    model, _ = model_and_diffusion
    diffusion = spaced("ddim10")
    t = th.full((4,), 5, dtype=th.long)
    with th.no_grad():
        out = diffusion.ddim_reverse_sample(
            model, GOLDEN["q_sample"], t, clip_denoised=False, model_kwargs={"y": GOLDEN["y"]}
        )
    close(out["sample"], GOLDEN["ddim_reverse_sample_t5"], impl, scale=10)


def test_calc_bpd_loop(model_and_diffusion, impl):
    model, diffusion = model_and_diffusion
    th.manual_seed(7)
    with th.no_grad():
        out = diffusion.calc_bpd_loop(model, GOLDEN["x_start"], clip_denoised=True, model_kwargs={"y": GOLDEN["y"]})
    for key, value in GOLDEN["calc_bpd_loop_seed7"].items():
        close(out[key], value, impl, scale=10)
