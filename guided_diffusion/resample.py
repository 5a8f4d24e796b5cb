"""Timestep samplers for training: importance sampling of t to lower loss variance."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """A ScheduleSampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name!r} (use 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """A distribution over timesteps, used with importance weights so the loss stays unbiased."""

    @abstractmethod
    def weights(self):
        """Non-negative numpy weights, one per timestep (need not sum to 1)."""

    def sample(self, batch_size, device):
        """Draw timesteps t ~ p(t) and the weights 1 / (T p(t)) that undo the bias.

        :return: (indices, weights), a (batch_size,) long tensor and a float tensor.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        weights_np = 1 / (len(p) * p[indices_np])
        return th.from_numpy(indices_np).long().to(device), th.from_numpy(weights_np).float().to(device)


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the losses it is told about."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Record this rank's (t, loss) pairs, gathered from every rank when distributed.

        :param local_ts: (N,) long tensor of timesteps.
        :param local_losses: (N,) tensor of per-example losses.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            timesteps, losses = _all_gather_pairs(local_ts, local_losses)
        else:
            timesteps, losses = local_ts.tolist(), local_losses.tolist()
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Record (t, loss) pairs from every rank, identically on every rank."""


def _all_gather_pairs(local_ts, local_losses):
    """Gather variable-length (ts, losses) from all ranks; same lists on every rank."""
    world = dist.get_world_size()
    size = th.tensor([len(local_ts)], dtype=th.int64, device=local_ts.device)
    sizes = [th.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    pad = max(sizes) - len(local_ts)
    # all_gather needs equal shapes: pad to the largest batch, then trim.
    ts = th.cat([local_ts, local_ts.new_zeros(pad)])
    losses = th.cat([local_losses.detach(), local_losses.new_zeros(pad)])
    ts_all = [th.zeros_like(ts) for _ in range(world)]
    losses_all = [th.zeros_like(losses) for _ in range(world)]
    dist.all_gather(ts_all, ts)
    dist.all_gather(losses_all, losses)
    timesteps = [x for t, n in zip(ts_all, sizes) for x in t[:n].tolist()]
    loss_values = [x for l, n in zip(losses_all, sizes) for x in l[:n].tolist()]
    return timesteps, loss_values


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over a history of recent losses (IDDPM, Eq. 18).

    Uniform until every timestep has `history_per_term` losses recorded; then a
    small `uniform_prob` mass is mixed in so no timestep is starved.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
