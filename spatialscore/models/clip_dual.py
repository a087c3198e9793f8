"""The baseline the SpatialScore paper beats: a CLIP-style dual encoder. Image and prompt are encoded separately
and the reward is their scaled cosine similarity, so where objects are relative to each other can only enter
through one pooled image vector — which is why such models sit near chance on swap and flip pairs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spatialscore.models.base import RewardModel, register_arch
from spatialscore.models.relation import conv_trunk, resize_to
from spatialscore.models.text import PromptEncoder

DEFAULTS = {"image_size": 128, "channels": 64, "grid": 4, "text_dim": 128, "seed": 0}


class DualEncoderReward(RewardModel):
    arch = "clip_dual"

    def __init__(self, config: dict):
        config = {**DEFAULTS, **config}
        super().__init__(config)
        torch.manual_seed(config["seed"])
        c, t = config["channels"], config["text_dim"]
        self.trunk = conv_trunk(c, config["image_size"], config["grid"])
        self.image_proj = nn.Linear(c * config["grid"] ** 2, t)
        self.text = PromptEncoder(t)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.log_sigma = nn.Parameter(torch.zeros(()))  # one learned uncertainty: the encoders meet only in a dot product

    def forward(self, images: torch.Tensor, prompts: list[str], targets: dict | None = None):
        feats = self.trunk(resize_to(images, self.config["image_size"]) * 2 - 1).flatten(1)
        img = F.normalize(self.image_proj(feats), dim=-1)
        txt = F.normalize(self.text(prompts, images.device), dim=-1)
        mu = self.logit_scale.exp() * (img * txt).sum(-1)
        return mu, F.softplus(self.log_sigma).expand_as(mu) + 1e-3


@register_arch("clip_dual")
def build(config: dict) -> DualEncoderReward:
    return DualEncoderReward(config)
