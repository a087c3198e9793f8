"""DDPO (Black et al., 2023) for DDIM UNet pipelines (SD1.5-style): DDIM sampling with eta = 1 and the log-probability
of every step, advantages from per-prompt reward statistics, the clipped objective, LoRA.

Per-prompt tracking (DDPO's `PerPromptStatTracker`): each prompt keeps a buffer of its last `train.buffer_size`
rewards; once it holds `train.min_count`, a reward is standardised by its own prompt's mean and std, before that by
the batch's. Prompts drawn again in later iterations so compare against their own history, not against easier or
harder prompts. The buffers are part of every checkpoint, so resuming keeps them. Sampling, the update and the
runtime are shared with Flow-GRPO (policy_gradient.py).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from spatialscore.config import DdpoConfig
from spatialscore.models.generators import UNET_PIPELINES
from spatialscore.train.policy_gradient import Algorithm, train_policy


class PerPromptStats:
    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        rewards = rewards.double()
        batch = rewards[finite] if finite.any() else rewards
        batch_mean, batch_std = batch.mean(), batch.std(unbiased=False)
        for prompt, reward, ok in zip(prompts, rewards.tolist(), finite.tolist()):
            if ok:
                self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size)).append(reward)
        out = torch.empty_like(rewards)
        for i, prompt in enumerate(prompts):
            seen = self.buffers.get(prompt, ())
            if len(seen) >= self.min_count:
                history = torch.tensor(list(seen), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            else:
                mean, std = batch_mean, batch_std
            out[i] = (rewards[i] - mean) / (std + 1e-6)
        return out.float()

    def state_dict(self) -> dict:
        return {"buffers": {prompt: list(values) for prompt, values in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.get("buffers", {}).items()}


class DDPO(Algorithm):
    name = "DDPO"
    pipelines = UNET_PIPELINES

    def __init__(self, cfg: DdpoConfig):
        self.stats = PerPromptStats(cfg.train.buffer_size, cfg.train.min_count) if cfg.train.per_prompt else None

    def advantages(self, rewards, finite, prompts, cfg):
        if self.stats is None:
            kept = rewards[finite] if finite.any() else rewards
            advantages = (rewards - kept.mean()) / (kept.std(unbiased=False) + 1e-6)
        else:
            advantages = self.stats.advantages(prompts, rewards, finite)
        return advantages, torch.ones_like(finite)

    def state_dict(self) -> dict:
        return self.stats.state_dict() if self.stats else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stats:
            self.stats.load_state_dict(state)


def train_ddpo(cfg: DdpoConfig, out: Path, resume: str | None = None, deepspeed: str | None = None,
               precision: str = "no", progress: bool = True) -> dict:
    return train_policy(cfg, out, DDPO(cfg), resume, deepspeed, precision, progress)
