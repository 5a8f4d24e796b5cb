"""Training loops: the diffusion model (TrainLoop) and the noisy classifier (ClassifierTrainLoop).

Both run on one process or many (DDP over torch.distributed, set up by
dist_util.setup_dist), accumulate gradients over microbatches with DDP syncing
only on the last one, train in float32, fp16 (loss-scaled) or bf16, and write
checkpoints atomically on rank 0. A checkpoint `model{N:06d}.pt` holds the
weights after N optimizer steps; resuming from it continues with step N + 1.

The *_from_flags functions build a loop from the flags of the training scripts.
"""

import contextlib
import copy
import os
import re
import time

import blobfile as bf
import torch as th
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .cfg import label_dropout
from .checkpoints import load_model_state
from .errors import flag_errors
from .files import save_torch
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler, create_named_schedule_sampler


class _Loop:
    """What both loops share: the model and its resume, the mixed-precision trainer, AdamW, DDP, the step
    counter, microbatches, logging and checkpoint files. Subclasses define run_step(batch, cond).

    One counter, global_step: the optimizer steps done, those before the checkpoint resumed from included.
    run_step advances it; model{N:06d}.pt is saved when it is N, and it is the `step` logged. The
    original's names stay readable: resume_step (the N resumed from) and step (the steps of this run).

    :param max_steps: stop when global_step reaches it; None trains until interrupted.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        log_interval,
        save_interval,
        resume_checkpoint,
        max_steps=None,
        schedule_sampler=None,
        weight_decay=0.0,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        use_bf16=False,
    ):
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.max_steps = max_steps
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self._setup_model(model, resume_checkpoint)
        self.global_step = self.resume_step
        self.global_batch = batch_size * self.world_size
        self.mp_trainer = MixedPrecisionTrainer(
            model=model,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=initial_lg_loss_scale,
            use_bf16=use_bf16,
        )
        self.opt = make_optimizer(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        if self.resume_step:
            self._load_optimizer_state()
        self.ddp_model = self._wrap_ddp()
        self._last_log = (time.time(), self.resume_step)  # for samples_per_sec

    @property
    def step(self):
        """Optimizer steps taken in this run (the original's counter)."""
        return self.global_step - self.resume_step

    def run_loop(self):
        """Take steps until max_steps (forever when None), saving every save_interval global steps and at the end.

        Logs are dumped on the run's first and last steps and every log_interval global steps.
        """
        while not self._done():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self._dump_logs(first=self.step == 1, last=self._done())
            if self.global_step % self.save_interval == 0:
                self.save()
        if self.step and self.global_step % self.save_interval != 0:
            self.save()

    def run_step(self, batch, cond):
        raise NotImplementedError

    def _done(self):
        return self.max_steps is not None and self.global_step >= self.max_steps

    def log_step(self):
        """Log the steps done so far and the samples they saw (all ranks together)."""
        logger.logkv("step", self.global_step)
        logger.logkv("samples", self.global_step * self.global_batch)

    def save(self):
        """Write the checkpoint files of the current global step."""
        self._save_files(self._checkpoint_files(self.global_step))

    def _checkpoint_files(self, step):
        """{filename: state} of a checkpoint: the model's weights and the optimizer's state."""
        return {
            f"model{step:06d}.pt": self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params),
            f"opt{step:06d}.pt": self._optimizer_state(),
        }

    def _setup_model(self, model, resume_checkpoint):
        self.model = model
        self.device = next(model.parameters()).device
        self.world_size = dist_util.get_world_size()
        self.resume_checkpoint = find_resume_checkpoint() or resume_checkpoint
        self.resume_step = parse_resume_step_from_filename(self.resume_checkpoint) if self.resume_checkpoint else 0
        if self.resume_checkpoint:
            self._log_rank0(f"loading model from checkpoint: {self.resume_checkpoint}...")
            state = dist_util.load_state_dict(self.resume_checkpoint, map_location=self.device)
            load_model_state(model, state, source=self.resume_checkpoint)
        dist_util.sync_params(model.parameters())

    def _wrap_ddp(self):
        if self.world_size == 1:
            return self.model
        device_ids = [self.device] if self.device.type == "cuda" else None
        # The networks hold no buffers, so there is nothing for DDP to broadcast besides gradients.
        return DDP(
            self.model,
            device_ids=device_ids,
            output_device=device_ids and self.device,
            bucket_cap_mb=128,
            find_unused_parameters=False,
        )

    def _sync_context(self, sync):
        """Gradients are all-reduced only where sync is true: on the last microbatch of a training step."""
        if sync or self.ddp_model is self.model:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def _microbatches(self, batch, cond):
        """Yield (x, cond, is_last) slices of at most self.microbatch examples, on the model's device."""
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(self.device)
            micro_cond = {k: v[i : i + self.microbatch].to(self.device) for k, v in cond.items()}
            yield micro, micro_cond, i + self.microbatch >= batch.shape[0]

    def _load_optimizer_state(self):
        path = bf.join(bf.dirname(self.resume_checkpoint), f"opt{self.resume_step:06d}.pt")
        if not bf.exists(path):
            logger.warn(f"WARNING: no optimizer state {path} beside the checkpoint: Adam restarts from zero moments")
            return
        self._log_rank0(f"loading optimizer state from checkpoint: {path}")
        state = dist_util.load_state_dict(path, map_location=self.device)
        lg_loss_scale = state.pop("lg_loss_scale", None)
        self.opt.load_state_dict(state)
        if lg_loss_scale is not None and self.mp_trainer.use_fp16:
            self.mp_trainer.lg_loss_scale = float(lg_loss_scale)

    def _optimizer_state(self):
        state = self.opt.state_dict()
        if self.mp_trainer.use_fp16:
            # Beyond the original: keep the loss scale so a resumed fp16 run does not re-learn it.
            state["lg_loss_scale"] = self.mp_trainer.lg_loss_scale
        return state

    def _save_files(self, files):
        """Write {filename: state} into the log dir on rank 0, each atomically; all ranks wait."""
        if dist_util.is_main_process():
            for filename, state in files.items():
                logger.log(f"saving {filename}...")
                save_torch(state, bf.join(get_blob_logdir(), filename))
        dist_util.barrier()

    def _set_lr(self, frac_done):
        for param_group in self.opt.param_groups:
            param_group["lr"] = self.lr * (1 - frac_done)

    def _dump_logs(self, first, last):
        """Write the logged key/values every log_interval global steps, and on the run's first and last step.

        First: a run shorter than log_interval still shows a loss. Last: the steps since the
        previous dump would otherwise never be written. One dump per step at most.
        """
        if first or last or self.global_step % self.log_interval == 0:
            self._log_throughput()
            logger.dumpkvs()

    def _log_throughput(self):
        """Samples per second since the previous call (all ranks together)."""
        now = time.time()
        last_time, last_step = self._last_log
        if self.global_step > last_step:
            elapsed = max(now - last_time, 1e-9)
            logger.logkv("samples_per_sec", (self.global_step - last_step) * self.global_batch / elapsed)
        self._last_log = (now, self.global_step)

    @staticmethod
    def _log_rank0(message):
        if dist_util.is_main_process():
            logger.log(message)


class TrainLoop(_Loop):
    """Train a diffusion model: AdamW, EMA weights, loss-aware timestep sampling, checkpoints.

    :param ema_rate: a float or comma-separated rates, e.g. "0.9999" or "0.999,0.9999".
    :param microbatch: examples per forward pass (-1 or 0: the whole batch).
    :param lr_anneal_steps: anneal the learning rate linearly to 0 over this many
        steps and stop there; 0 trains until interrupted.
    :param use_bf16: run the forward pass under bfloat16 autocast (beyond the original).
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        use_bf16=False,
    ):
        self.ema_rate = parse_ema_rate(ema_rate)
        self.lr_anneal_steps = lr_anneal_steps
        super().__init__(
            model=model,
            diffusion=diffusion,
            data=data,
            batch_size=batch_size,
            microbatch=microbatch,
            lr=lr,
            log_interval=log_interval,
            save_interval=save_interval,
            resume_checkpoint=resume_checkpoint,
            max_steps=lr_anneal_steps or None,
            schedule_sampler=schedule_sampler,
            weight_decay=weight_decay,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            use_bf16=use_bf16,
        )
        self.ema_params = [self._initial_ema_parameters(rate) for rate in self.ema_rate]

    def _initial_ema_parameters(self, rate):
        """The EMA saved beside the checkpoint resumed from, or a copy of the current weights."""
        if not self.resume_step:
            return copy.deepcopy(self.mp_trainer.master_params)
        path = find_ema_checkpoint(self.resume_checkpoint, self.resume_step, rate)
        if path is None:
            logger.warn(
                f"WARNING: no EMA checkpoint for rate {rate} at step {self.resume_step} beside "
                f"{self.resume_checkpoint}: the EMA restarts from the current weights"
            )
            ema_params = copy.deepcopy(self.mp_trainer.master_params)
        else:
            self._log_rank0(f"loading EMA from checkpoint: {path}...")
            state = dist_util.load_state_dict(path, map_location=self.device)
            ema_params = self.mp_trainer.state_dict_to_master_params(state)
        dist_util.sync_params(ema_params)
        return ema_params

    def run_step(self, batch, cond):
        """One optimizer step on a batch (N, C, H, W) with its model kwargs; advances global_step."""
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self._anneal_lr()
        self.global_step += 1  # a step fp16 skipped for overflow counts too, as in the original
        self.log_step()

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        for micro, micro_cond, last in self._microbatches(batch, cond):
            t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
            with self._sync_context(last):
                with self.mp_trainer.autocast():
                    losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond)
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"] * weights).mean()
                log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
                self.mp_trainer.backward(loss)

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self):
        # Set before this step is counted, as in the original: step k + 1 (from 0) runs at lr * (1 - k / total).
        if self.lr_anneal_steps:
            self._set_lr(self.global_step / self.lr_anneal_steps)

    def _checkpoint_files(self, step):
        """The model, one EMA per rate, and the optimizer state (the original's files, in its order)."""
        to_state = self.mp_trainer.master_params_to_state_dict
        files = {f"model{step:06d}.pt": to_state(self.mp_trainer.master_params)}
        for rate, params in zip(self.ema_rate, self.ema_params):
            files[f"ema_{rate}_{step:06d}.pt"] = to_state(params)
        files[f"opt{step:06d}.pt"] = self._optimizer_state()
        return files


class ClassifierTrainLoop(_Loop):
    """Train the noisy-image classifier (ADM, Sec. 4.1): cross-entropy on x_t at t ~ the schedule sampler.

    Trains for `iterations` global steps; batches are (x (N, C, H, W), {"y": labels (N,)}).

    :param noised: classify q_sample(x_0, t) (True) or clean images at t = 0.
    :param val_data: an optional iterator of validation batches, evaluated every eval_interval steps.
    :param anneal_lr: anneal the learning rate linearly to 0 over `iterations`.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        iterations,
        log_interval,
        save_interval,
        resume_checkpoint,
        val_data=None,
        eval_interval=5,
        noised=True,
        anneal_lr=False,
        schedule_sampler=None,
        weight_decay=0.0,
        use_fp16=False,
        use_bf16=False,
    ):
        self.iterations = iterations
        self.val_data = val_data
        self.eval_interval = eval_interval
        self.noised = noised
        self.anneal_lr = anneal_lr
        # The original starts classifier loss scaling at 2^16 rather than 2^20.
        super().__init__(
            model=model,
            diffusion=diffusion,
            data=data,
            batch_size=batch_size,
            microbatch=microbatch,
            lr=lr,
            log_interval=log_interval,
            save_interval=save_interval,
            resume_checkpoint=resume_checkpoint,
            max_steps=iterations,
            schedule_sampler=schedule_sampler,
            weight_decay=weight_decay,
            use_fp16=use_fp16,
            initial_lg_loss_scale=16.0,
            use_bf16=use_bf16,
        )

    def run_step(self, batch, cond):
        """One optimizer step on labelled images, then (every eval_interval steps) one validation batch."""
        if self.anneal_lr:
            self._set_lr(self.global_step / self.iterations)
        self.forward_backward_log(batch, cond["y"], train=True)
        self.mp_trainer.optimize(self.opt)
        if self.val_data is not None and self.global_step % self.eval_interval == 0:
            self.evaluate()
        self.global_step += 1
        self.log_step()

    def evaluate(self):
        """Loss and top-1/top-5 accuracy on one validation batch, logged with the prefix val_."""
        batch, cond = next(self.val_data)
        self.model.eval()
        with th.no_grad():
            self.forward_backward_log(batch, cond["y"], train=False)
        self.model.train()

    def forward_backward_log(self, batch, labels, train=True):
        """Log loss and accuracies (prefix train_ or val_) of images (N, C, H, W) with labels (N,).

        train: also accumulate the gradient of the batch's mean loss, for the next optimizer step.
        """
        batch, t = self._classifier_inputs(batch.to(self.device))
        if train:
            self.mp_trainer.zero_grad()
        for micro, cond, last in self._microbatches(batch, {"y": labels.to(self.device), "t": t}):
            with self._sync_context(last and train):
                with self.mp_trainer.autocast():
                    logits = self.ddp_model(micro, timesteps=cond["t"]).float()
                loss = F.cross_entropy(logits, cond["y"], reduction="none")
                self._log_metrics("train" if train else "val", cond["t"], logits, cond["y"], loss)
                if train:
                    self.mp_trainer.backward(loss.mean() * len(micro) / len(batch))

    def _classifier_inputs(self, x_start):
        """(x_t, t): q_sample(x_0, t) at t ~ the schedule sampler (ADM, Sec. 4.1), or x_0 at t = 0 if not noised."""
        if not self.noised:
            return x_start, th.zeros(x_start.shape[0], dtype=th.long, device=self.device)
        t, _ = self.schedule_sampler.sample(x_start.shape[0], self.device)
        return self.diffusion.q_sample(x_start, t), t

    def _log_metrics(self, prefix, t, logits, labels, loss):
        log_loss_dict(
            self.diffusion,
            t,
            {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, labels, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits, labels, k=5, reduction="none"),
            },
        )


def schedule_sampler_from_flags(args, diffusion):
    """The timestep sampler named by --schedule_sampler (an unknown name is a usage error)."""
    with flag_errors(NotImplementedError):
        return create_named_schedule_sampler(args.schedule_sampler, diffusion)


def train_diffusion_from_flags(args, model, diffusion, data):
    """Run TrainLoop with the training flags of image_train.py / super_res_train.py; returns the loop.

    With --p_uncond > 0 labels are dropped to the null class num_classes, for classifier-free guidance.
    """
    if args.p_uncond > 0:
        logger.log(
            f"label dropout for classifier-free guidance: p_uncond {args.p_uncond}, null class {args.num_classes}"
        )
        data = label_dropout(data, args.p_uncond, null_label=args.num_classes)
    logger.log("training...")
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler_from_flags(args, diffusion),
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        use_bf16=args.use_bf16,
    )
    loop.run_loop()
    return loop


def train_classifier_from_flags(args, model, diffusion, data, val_data=None):
    """Run ClassifierTrainLoop with the flags of classifier_train.py; returns the loop."""
    logger.log("training classifier model...")
    loop = ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        iterations=args.iterations,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        eval_interval=args.eval_interval,
        resume_checkpoint=args.resume_checkpoint,
        noised=args.noised,
        anneal_lr=args.anneal_lr,
        weight_decay=args.weight_decay,
        schedule_sampler=schedule_sampler_from_flags(args, diffusion),
        use_fp16=args.classifier_use_fp16,
        use_bf16=args.use_bf16,
    )
    loop.run_loop()
    return loop


def make_optimizer(params, lr, weight_decay):
    """AdamW with its fused kernel (one pass over all tensors; the for-loop version costs about a
    tenth of a small model's training step on a CPU), or the multi-tensor one where it is missing."""
    params = list(params)
    try:
        return AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def compute_top_k(logits, labels, k, reduction="mean"):
    """1 where the label is among the k largest logits (k capped at the number of classes)."""
    _, top_ks = th.topk(logits, min(k, logits.shape[-1]), dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    return hits.mean().item() if reduction == "mean" else hits


def parse_ema_rate(ema_rate):
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    return [float(x) for x in str(ema_rate).split(",") if x.strip()]


def parse_resume_step_from_filename(filename):
    """The N of a path ending in modelNNNNNN.pt, else 0."""
    match = re.search(r"model(\d+)\.pt$", os.path.basename(filename))
    return int(match.group(1)) if match else 0


def get_blob_logdir():
    """Where checkpoints go: the logger's dir (override to write elsewhere, e.g. a blob store)."""
    return logger.get_dir()


def find_resume_checkpoint():
    """A hook for infrastructures that resume automatically; returns None by default."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    if main_checkpoint is None:
        return None
    path = bf.join(bf.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if bf.exists(path) else None


def log_loss_dict(diffusion, ts, losses):
    """Log the mean of each loss term, and its mean per quartile of t as `{key}_q0`..`_q3`."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        quartiles = (4 * ts.cpu() // diffusion.num_timesteps).tolist()
        for quartile, value in zip(quartiles, values.detach().float().cpu().tolist()):
            logger.logkv_mean(f"{key}_q{quartile}", value)
