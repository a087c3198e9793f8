"""Flow-GRPO (Liu et al., 2025) with the SpatialScore paper's top-k filtering, for flow-matching pipelines (the
shapes base, SD3, FLUX).

Rewards are standardised within each prompt's group of G images (group-relative advantages, no value function);
with `train.top_k = k` only the k best and k worst images of each group are trained on — the samples whose
advantages carry the signal (the paper keeps 6+6 of 24, halving the update's cost). The sampler, the clipped PPO
update, the KL to the LoRA-disabled reference and the runtime are shared with DDPO (policy_gradient.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spatialscore.config import GrpoConfig
from spatialscore.models.generators import FLOW_PIPELINES
from spatialscore.train.losses import group_advantages, top_k_mask
from spatialscore.train.policy_gradient import Algorithm, train_policy


class FlowGRPO(Algorithm):
    name = "GRPO"
    pipelines = FLOW_PIPELINES

    def advantages(self, rewards, finite, prompts, cfg):
        advantages = group_advantages(rewards, cfg.sample.group_size)
        k = cfg.train.top_k
        keep = top_k_mask(rewards, cfg.sample.group_size, k) if k else torch.ones_like(finite)
        return advantages, keep


def train_grpo(cfg: GrpoConfig, out: Path, resume: str | None = None, deepspeed: str | None = None,
               precision: str = "no", progress: bool = True) -> dict:
    return train_policy(cfg, out, FlowGRPO(), resume, deepspeed, precision, progress)
