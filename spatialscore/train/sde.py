"""Stochastic sampling steps with the log-probability of every step, as pure functions of tensors, so the sampler
and the trainer compute exactly the same numbers: the Flow-GRPO SDE step for flow-matching models, and the DDIM step
(eta > 0) that DDPO trains for noise-predicting UNets.

A rectified flow x_t = (1 - t) x_0 + t eps is sampled from t = 1 (noise) to t = 0 by the ODE dx = v dt. Online RL
needs a stochastic policy, so each Euler step is replaced by an Euler–Maruyama step of the reverse-time SDE with the
same marginals (Liu et al., Flow-GRPO, 2025):

    x_{t+dt} = x_t + [v + s_t^2 / (2t) (x_t + (1 - t) v)] dt + s_t sqrt(-dt) z,    s_t = a sqrt(t / (1 - t)),

with dt < 0 and noise level a. Given x_t the step is Gaussian, so its log-density is exact and cheap. Sigmas follow
diffusers' FlowMatchEulerDiscreteScheduler (`scheduler.sigmas`, decreasing, ending at 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sde_noise_scales(sigmas: Tensor, noise_level: float) -> Tensor:
    """s_t for every step of a schedule (all sigmas but the final 0). At t = 1 the formula is infinite; like
    Flow-GRPO, the first sigma below 1 stands in for the denominator there."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    t = sigmas[:-1].double()
    below_one = t[t < 1]
    cap = below_one.max() if len(below_one) else torch.tensor(0.5, dtype=torch.float64)
    return (noise_level * torch.sqrt(t / (1 - torch.where(t >= 1, cap, t)))).to(sigmas.dtype)


def sde_step(sample: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
             noise_scale: float | Tensor, noise: Tensor | None = None,
             next_sample: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Euler–Maruyama step from `sigma` to `sigma_next` (< sigma). Returns (next sample, log-probability of it
    per sample [B] — the mean over its elements, as Flow-GRPO does, so it does not grow with the image size — the
    Gaussian's mean and its standard deviation). With `next_sample` given (a stored step) nothing is drawn: its
    log-probability under the current velocity is computed, which is what the policy-gradient update needs."""
    sample, velocity = sample.float(), velocity.float()
    sigma, sigma_next, noise_scale = (torch.as_tensor(v, dtype=torch.float32, device=sample.device)
                                      for v in (sigma, sigma_next, noise_scale))
    dt = sigma_next - sigma
    if (dt >= 0).any():
        raise ValueError("sde_step integrates from noise to data: sigma_next must be smaller than sigma")
    mean = (sample * (1 + noise_scale ** 2 / (2 * sigma) * dt)
            + velocity * (1 + noise_scale ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    std = noise_scale * torch.sqrt(-dt)
    if next_sample is None:
        next_sample = mean + std * (torch.randn_like(mean) if noise is None else noise)
    log_prob = gaussian_log_prob(next_sample.float().detach(), mean, std)
    return next_sample, log_prob, mean, std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the first dimension: [B]."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    per_element = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per_element.flatten(1).mean(1)


def ddim_step(sample: Tensor, eps: Tensor, alpha_prod: float | Tensor, alpha_prod_prev: float | Tensor, eta: float,
              noise: Tensor | None = None, prev_sample: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step (Song et al.) from cumulative alpha `alpha_prod` to `alpha_prod_prev` for an epsilon-predicting
    model, with eta-scaled noise (eta = 1: the DDPM posterior's variance). Returns (previous sample, its
    log-probability per sample [B], mean, std); with `prev_sample` given it is rescored, not drawn (DDPO's update).
    Matches diffusers' DDIMScheduler.step given the same noise."""
    sample, eps = sample.float(), eps.float()
    a, a_prev = (torch.as_tensor(v, dtype=torch.float32, device=sample.device) for v in (alpha_prod, alpha_prod_prev))
    original = (sample - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * torch.sqrt(variance)
    mean = torch.sqrt(a_prev) * original + torch.sqrt(1 - a_prev - std ** 2) * eps
    if prev_sample is None:
        prev_sample = mean + std * (torch.randn_like(mean) if noise is None else noise)
    return prev_sample, gaussian_log_prob(prev_sample.float().detach(), mean, std), mean, std


class FlowSchedule:
    """Flow-GRPO's SDE over a flow-matching schedule; the model's output is a velocity, its time input the sigma."""

    def __init__(self, sigmas: Tensor, noise_level: float):
        self.sigmas = sigmas.float()
        self.noise_scales = sde_noise_scales(self.sigmas, noise_level)

    def __len__(self) -> int:
        return len(self.sigmas) - 1

    def model_time(self, i: int) -> Tensor:
        return self.sigmas[i]

    def step(self, i: int, sample: Tensor, output: Tensor, noise: Tensor | None = None,
             next_sample: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return sde_step(sample, output, self.sigmas[i], self.sigmas[i + 1], self.noise_scales[i], noise, next_sample)

    def ode_step(self, i: int, sample: Tensor, output: Tensor) -> Tensor:
        return sample.float() + (self.sigmas[i + 1] - self.sigmas[i]) * output.float()


class DDIMSchedule:
    """DDPO's DDIM steps over a noise-predicting model's discrete schedule: `timesteps` (decreasing) with the
    cumulative alphas at each and at the step after it; the model's time input is the integer timestep."""

    def __init__(self, timesteps: Tensor, alphas: Tensor, alphas_prev: Tensor, eta: float):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.timesteps, self.alphas, self.alphas_prev, self.eta = timesteps, alphas.float(), alphas_prev.float(), eta

    def __len__(self) -> int:
        return len(self.timesteps)

    def model_time(self, i: int) -> Tensor:
        return self.timesteps[i]

    def step(self, i: int, sample: Tensor, output: Tensor, noise: Tensor | None = None,
             next_sample: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return ddim_step(sample, output, self.alphas[i], self.alphas_prev[i], self.eta, noise, next_sample)

    def ode_step(self, i: int, sample: Tensor, output: Tensor) -> Tensor:
        return ddim_step(sample, output, self.alphas[i], self.alphas_prev[i], 0.0)[2]
