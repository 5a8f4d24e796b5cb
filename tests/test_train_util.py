"""TrainLoop, ClassifierTrainLoop and MixedPrecisionTrainer on tiny models, in one process."""

import argparse
import copy
import csv
import os

import numpy as np
import pytest
import torch as th

from guided_diffusion import checkpoints, files, logger
from guided_diffusion import flags as fl
from guided_diffusion import script_util as su
from guided_diffusion.errors import UsageError
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler
from guided_diffusion.train_util import (
    ClassifierTrainLoop,
    TrainLoop,
    parse_resume_step_from_filename,
    schedule_sampler_from_flags,
    train_classifier_from_flags,
    train_diffusion_from_flags,
)

MODEL_FLAGS = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    learn_sigma=True,
    class_cond=True,
    diffusion_steps=100,
)


@pytest.fixture
def log_dir(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path), format_strs=["log", "csv"]):
        yield tmp_path


def tiny_model_and_diffusion(**overrides):
    return su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **MODEL_FLAGS, **overrides})


def fixed_batches(n=8, size=16, classes=4, seed=0):
    """An endless iterator over one fixed batch of smooth images in [-1, 1]."""
    gen = th.Generator().manual_seed(seed)
    x = th.tanh(th.nn.functional.avg_pool2d(th.randn(n, 3, size + 3, size + 3, generator=gen), 4, stride=1) * 3)
    y = th.arange(n) % classes
    while True:
        yield x.clone(), {"y": y.clone()}


def make_loop(data=None, **overrides):
    model, diffusion = tiny_model_and_diffusion()
    args = dict(
        model=model,
        diffusion=diffusion,
        data=data or fixed_batches(),
        batch_size=8,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=2,
        save_interval=3,
        resume_checkpoint="",
    )
    args.update(overrides)
    return TrainLoop(**args)


def fixed_t_loss(loop, batch, cond, seed=123):
    """The training loss at fixed timesteps and noise, so two evaluations are comparable."""
    th.manual_seed(seed)
    t = th.randint(0, loop.diffusion.num_timesteps, (batch.shape[0],))
    with th.no_grad():
        return loop.diffusion.training_losses(loop.model, batch, t, model_kwargs=cond)["loss"].mean().item()


def test_a_few_steps_lower_the_diffusion_loss(log_dir):
    loop = make_loop()
    batch, cond = next(fixed_batches())
    before = fixed_t_loss(loop, batch, cond)
    for _ in range(15):
        loop.run_step(batch, cond)
    assert loop.step == loop.global_step == 15
    assert fixed_t_loss(loop, batch, cond) < 0.8 * before


def test_logs_have_step_samples_and_loss_quartiles(log_dir):
    loop = make_loop(lr_anneal_steps=4, schedule_sampler=None)
    loop.run_loop()
    progress = (log_dir / "progress.csv").read_text().splitlines()
    header = progress[0].split(",")
    for key in ("step", "samples", "loss", "mse", "vb", "grad_norm", "param_norm", "samples_per_sec"):
        assert key in header
    assert {"loss_q0", "loss_q3"} <= set(header)
    last = dict(zip(header, progress[-1].split(",")))
    assert last["step"] == "4" and last["samples"] == "32"
    assert sorted(p.name for p in log_dir.glob("*.pt")) == [
        "ema_0.99_000003.pt",
        "ema_0.99_000004.pt",
        "ema_0.9_000003.pt",
        "ema_0.9_000004.pt",
        "model000003.pt",
        "model000004.pt",
        "opt000003.pt",
        "opt000004.pt",
    ]


def logged_rows(log_dir):
    with open(log_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_logged_steps(log_dir, steps, batch_size=8, loss_key="loss"):
    """progress.csv holds one row per step in `steps`, in order, each with its loss and samples."""
    rows = logged_rows(log_dir)
    assert [int(row["step"]) for row in rows] == steps
    for row in rows:
        assert float(row[loss_key]) > 0 and int(row["samples"]) == int(row["step"]) * batch_size
        assert float(row["samples_per_sec"]) > 0
    assert logger.getkvs() == {}  # nothing accumulated after the last dump is left behind


# (steps, log_interval, steps logged): the first step, every log_interval-th step and the last step, once each.
LOGGED_STEPS = [(1, 1, [1]), (3, 10, [1, 3]), (10, 5, [1, 5, 10]), (25, 10, [1, 10, 20, 25])]


@pytest.mark.parametrize("steps, log_interval, logged", LOGGED_STEPS)
def test_first_last_and_every_log_interval_steps_are_logged(log_dir, steps, log_interval, logged):
    make_loop(lr_anneal_steps=steps, log_interval=log_interval, save_interval=100).run_loop()
    assert_logged_steps(log_dir, logged)


def test_a_resumed_run_logs_global_steps(log_dir):
    make_loop(lr_anneal_steps=3, log_interval=2, save_interval=3).run_loop()
    make_loop(
        lr_anneal_steps=7, log_interval=2, save_interval=100, resume_checkpoint=str(log_dir / "model000003.pt")
    ).run_loop()
    # The resumed run starts at step 4 (its first) and then logs at the multiples of 2, like it saves.
    assert_logged_steps(log_dir, [1, 2, 3, 4, 6, 7])


def test_lr_annealing_reaches_zero_and_stops(log_dir):
    loop = make_loop(lr_anneal_steps=5, save_interval=100)
    loop.run_loop()
    assert loop.step == 5 and loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 4 / 5))
    assert (log_dir / "model000005.pt").exists()


def test_loss_aware_sampler_is_updated(log_dir):
    model, diffusion = tiny_model_and_diffusion()
    sampler = LossSecondMomentResampler(diffusion)
    loop = make_loop(schedule_sampler=sampler, lr_anneal_steps=2, save_interval=100)
    loop.run_loop()
    assert sampler._loss_counts.sum() == 16


def run_steps(loop, n, seed):
    """n steps with seeded timesteps and noise; each run_step advances the step counter by one."""
    np.random.seed(seed)
    th.manual_seed(seed)
    for _ in range(n):
        before = (loop.step, loop.global_step)
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        assert (loop.step, loop.global_step) == (before[0] + 1, before[1] + 1)


def test_save_then_resume_restores_everything_and_continues_identically(log_dir):
    th.manual_seed(0)
    reference = make_loop()
    initial = copy.deepcopy(reference.model.state_dict())
    run_steps(reference, 2, seed=1)
    run_steps(reference, 2, seed=2)

    first = make_loop()
    first.model.load_state_dict(initial)
    run_steps(first, 2, seed=1)
    first.save()
    assert parse_resume_step_from_filename(str(log_dir / "model000002.pt")) == 2

    resumed = make_loop(resume_checkpoint=str(log_dir / "model000002.pt"))
    assert resumed.resume_step == 2 and resumed.global_step == 2 and resumed.step == 0
    for a, b in zip(resumed.model.parameters(), first.model.parameters()):
        assert th.equal(a, b)
    for ema_a, ema_b in zip(resumed.ema_params, first.ema_params):
        assert all(th.equal(a, b) for a, b in zip(ema_a, ema_b))
    assert_same_optimizer_state(resumed.opt, first.opt)

    run_steps(resumed, 2, seed=2)
    assert resumed.step == 2 and resumed.global_step == 4
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        th.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    resumed.save()
    assert (log_dir / "model000004.pt").exists() and (log_dir / "ema_0.99_000004.pt").exists()


def assert_same_optimizer_state(opt_a, opt_b):
    a, b = opt_a.state_dict(), opt_b.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert th.equal(value, b["state"][key][name]), name


def test_missing_ema_and_optimizer_files_warn(log_dir):
    loop = make_loop()
    run_steps(loop, 1, seed=0)
    loop.save()
    os.remove(log_dir / "opt000001.pt")
    os.remove(log_dir / "ema_0.9_000001.pt")
    make_loop(resume_checkpoint=str(log_dir / "model000001.pt"))
    text = (log_dir / "log.txt").read_text()
    assert "no optimizer state" in text and "no EMA checkpoint for rate 0.9" in text


def test_interrupted_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model000007.pt"
    target.write_bytes(b"previous complete file")

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(checkpoints.th, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        files.save_torch({"w": th.zeros(3)}, str(target))
    assert target.read_bytes() == b"previous complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["model000007.pt"]  # no temporary file left behind


def test_checkpoints_are_float32_and_load_with_weights_only(log_dir):
    loop = make_loop(use_fp16=True)
    run_steps(loop, 1, seed=0)
    loop.save()
    state = checkpoints.read_state_dict(str(log_dir / "model000001.pt"))
    assert all(v.dtype == th.float32 for v in state.values())
    model, _ = tiny_model_and_diffusion()
    checkpoints.load_model_state(model, state)


# ---------------------------------------------------------------- mixed precision


def tiny_trainer_pair():
    """An fp32 and an fp16 trainer over identical copies of a small model."""
    th.manual_seed(0)
    model32, _ = tiny_model_and_diffusion(class_cond=False, learn_sigma=False)
    for p in model32.parameters():
        p.data.normal_(0, 0.05)
    model16 = copy.deepcopy(model32)
    return MixedPrecisionTrainer(model=model32), MixedPrecisionTrainer(model=model16, use_fp16=True)


def test_fp16_step_with_inf_gradients_is_skipped_and_lowers_the_scale(log_dir):
    _, trainer = tiny_trainer_pair()
    opt = th.optim.AdamW(trainer.master_params, lr=1e-3)
    before = [p.detach().clone() for p in trainer.master_params]
    x = th.randn(2, 3, 16, 16)
    trainer.zero_grad()
    trainer.backward(trainer.model(x, th.tensor([1, 2])).float().mean())
    trainer.model_params[0].grad.view(-1)[0] = float("inf")
    assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == 19.0
    assert all(th.equal(a, b) for a, b in zip(before, trainer.master_params))
    assert all(p.grad is None for p in trainer.master_params)


def test_fp16_step_matches_the_fp32_update(log_dir):
    fp32, fp16 = tiny_trainer_pair()
    assert fp16.model.dtype == th.float16 and all(p.dtype == th.float32 for p in fp16.master_params)
    x, t = th.randn(2, 3, 16, 16), th.tensor([1, 50])
    deltas = []
    for trainer in (fp32, fp16):
        opt = th.optim.SGD(trainer.master_params, lr=1.0)
        before = trainer.master_params_to_state_dict(trainer.master_params)
        before = {k: v.detach().clone().float() for k, v in before.items()}
        trainer.zero_grad()
        trainer.backward(trainer.model(x, t).float().square().mean())
        assert trainer.optimize(opt)
        after = trainer.master_params_to_state_dict(trainer.master_params)
        deltas.append({k: after[k].float() - before[k] for k in before})
    assert fp16.lg_loss_scale == pytest.approx(20.001)
    for key, delta in deltas[0].items():
        scale = delta.abs().max().item()
        if scale > 1e-6:  # the update (= -gradient) agrees to half-precision accuracy
            assert (deltas[1][key] - delta).abs().max().item() < 0.05 * scale + 1e-5, key


def test_fp16_master_params_round_trip_through_a_state_dict():
    _, trainer = tiny_trainer_pair()
    state = trainer.master_params_to_state_dict(trainer.master_params)
    assert all(v.dtype == th.float32 for v in state.values())
    rebuilt = trainer.state_dict_to_master_params(state)
    for a, b in zip(rebuilt, trainer.master_params):
        assert th.equal(a, b)


def test_bf16_training_runs_under_autocast(log_dir):
    loop = make_loop(use_bf16=True)
    batch, cond = next(fixed_batches())
    seen = []
    hook = loop.model.input_blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    run_steps(loop, 1, seed=0)
    hook.remove()
    assert seen == [th.bfloat16]
    assert all(p.dtype == th.float32 for p in loop.model.parameters())
    with pytest.raises(ValueError, match="exclude"):
        MixedPrecisionTrainer(model=loop.model, use_fp16=True, use_bf16=True)


# ---------------------------------------------------------------- classifier


def make_classifier_loop(**overrides):
    flags = {
        **su.classifier_and_diffusion_defaults(),
        "image_size": 16,
        "classifier_width": 64,
        "classifier_depth": 1,
        "classifier_attention_resolutions": "8",
        "diffusion_steps": 100,
    }
    model, diffusion = su.create_classifier_and_diffusion(**flags)
    args = dict(
        model=model,
        diffusion=diffusion,
        data=fixed_batches(),
        val_data=fixed_batches(seed=1),
        batch_size=8,
        microbatch=4,
        lr=1e-3,
        iterations=12,
        log_interval=4,
        save_interval=5,
        eval_interval=3,
        resume_checkpoint="",
        noised=False,
    )
    args.update(overrides)
    return ClassifierTrainLoop(**args)


def test_classifier_training_lowers_the_loss_and_saves(log_dir):
    loop = make_classifier_loop()
    x, extra = next(fixed_batches())
    t = th.zeros(8, dtype=th.long)
    before = th.nn.functional.cross_entropy(loop.model(x, t), extra["y"]).item()
    loop.run_loop()
    after = th.nn.functional.cross_entropy(loop.model(x, t), extra["y"]).item()
    assert after < 0.5 * before
    assert sorted(p.name for p in log_dir.glob("*.pt")) == [
        "model000005.pt",
        "model000010.pt",
        "model000012.pt",
        "opt000005.pt",
        "opt000010.pt",
        "opt000012.pt",
    ]
    header = (log_dir / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1", "train_loss_q0"} <= set(header)


def test_classifier_resume_continues_from_the_checkpoint(log_dir):
    make_classifier_loop(iterations=5).run_loop()
    resumed = make_classifier_loop(iterations=7, resume_checkpoint=str(log_dir / "model000005.pt"))
    saved = checkpoints.read_state_dict(str(log_dir / "model000005.pt"))
    assert all(th.equal(v, resumed.model.state_dict()[k]) for k, v in saved.items())
    resumed.run_loop()
    assert (log_dir / "model000007.pt").exists() and not (log_dir / "model000006.pt").exists()


@pytest.mark.parametrize("iterations, log_interval, logged", LOGGED_STEPS)
def test_classifier_logs_first_last_and_every_log_interval_steps(log_dir, iterations, log_interval, logged):
    make_classifier_loop(
        iterations=iterations, log_interval=log_interval, save_interval=100, eval_interval=100
    ).run_loop()
    assert_logged_steps(log_dir, logged, loss_key="train_loss")


def test_classifier_resumed_run_logs_global_steps(log_dir):
    make_classifier_loop(iterations=5, log_interval=4, eval_interval=100).run_loop()
    make_classifier_loop(
        iterations=11, log_interval=4, eval_interval=100, resume_checkpoint=str(log_dir / "model000005.pt")
    ).run_loop()
    assert_logged_steps(log_dir, [1, 4, 5, 6, 8, 11], loss_key="train_loss")


def test_classifier_run_step_advances_the_step_and_evaluation_is_chosen_explicitly(log_dir):
    loop = make_classifier_loop(eval_interval=100)
    batch, cond = next(fixed_batches())
    loop.run_step(batch, cond)
    loop.run_step(batch, cond)
    assert loop.step == loop.global_step == 2 and logger.getkvs()["step"] == 2
    loop.mp_trainer.zero_grad()
    loop.forward_backward_log(batch, cond["y"], train=False)  # gradients enabled, yet no backward pass
    assert all(p.grad is None for p in loop.model.parameters())
    assert "val_loss" in logger.getkvs()
    loop.forward_backward_log(batch, cond["y"], train=True)
    assert all(p.grad is not None for p in loop.model.parameters())


# ---------------------------------------------------------------- from flags


def train_args(defaults, **overrides):
    return argparse.Namespace(**{**defaults, **overrides})


def test_train_diffusion_from_flags_drops_labels_for_classifier_free_guidance(log_dir):
    flags = {**su.model_and_diffusion_defaults(), **MODEL_FLAGS, "p_uncond": 0.5}
    model, diffusion = su.create_model_and_diffusion(**flags)
    args = train_args({**flags, **fl.TRAIN_FLAGS.defaults()}, lr_anneal_steps=2, batch_size=8, save_interval=100)
    loop = train_diffusion_from_flags(args, model, diffusion, fixed_batches())
    assert loop.global_step == 2 and isinstance(loop.schedule_sampler, UniformSampler)
    assert sorted(p.name for p in log_dir.glob("model*.pt")) == ["model000002.pt"]
    th.manual_seed(0)
    labels = th.cat([next(loop.data)[1]["y"] for _ in range(4)])  # 32 labels, each dropped with probability 0.5
    assert (labels == args.num_classes).any() and (labels < 4).any()
    assert set(labels.tolist()) <= {0, 1, 2, 3, args.num_classes}


def test_unknown_schedule_sampler_flag_is_a_usage_error():
    _, diffusion = tiny_model_and_diffusion()
    assert isinstance(
        schedule_sampler_from_flags(train_args({"schedule_sampler": "loss-second-moment"}), diffusion),
        LossSecondMomentResampler,
    )
    with pytest.raises(UsageError, match="unknown schedule sampler"):
        schedule_sampler_from_flags(train_args({"schedule_sampler": "sorted"}), diffusion)


def test_train_classifier_from_flags(log_dir):
    flags = {
        **su.classifier_and_diffusion_defaults(),
        "image_size": 16,
        "classifier_width": 64,
        "classifier_depth": 1,
        "classifier_attention_resolutions": "8",
        "diffusion_steps": 100,
    }
    model, diffusion = su.create_classifier_and_diffusion(**flags)
    args = train_args(
        {**flags, **fl.CLASSIFIER_TRAIN_FLAGS.defaults()}, iterations=3, batch_size=8, save_interval=2, eval_interval=2
    )
    loop = train_classifier_from_flags(args, model, diffusion, fixed_batches(), val_data=fixed_batches(seed=1))
    assert loop.global_step == 3 and loop.noised
    assert sorted(p.name for p in log_dir.glob("*.pt")) == [
        "model000002.pt",
        "model000003.pt",
        "opt000002.pt",
        "opt000003.pt",
    ]
    assert "val_loss" in logged_rows(log_dir)[0]
