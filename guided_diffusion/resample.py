"""Timestep samplers for training: importance sampling of t to lower loss variance."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th


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
        # Imported here: the math core imports only torch and numpy at module level.
        from .dist_util import gather_rows

        timesteps, losses = gather_rows(local_ts), gather_rows(local_losses.detach())
        self.update_with_all_losses(timesteps.tolist(), losses.tolist())

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Record (t, loss) pairs from every rank, identically on every rank."""


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
