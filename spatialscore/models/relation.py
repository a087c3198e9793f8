"""The shapes-world reward backbone: a Relation Network (Santoro et al., 2017) over a grid of convolutional cells.

Generic transformers over patches stay at chance on this task for many minutes on a CPU; a model whose positions
are explicit and whose relations are pairwise learns in minutes (see the reward-model issue). Cells carry their
(x, y) centre; g(o_i, o_j, q) runs on every ordered pair of cells with the prompt's encoding q, the pair outputs are
summed, and f maps the sum to the Gaussian head. g's first layer is split as A o_i + B o_j + C q, so it costs
O(cells) matmuls instead of O(cells^2); only the later layers run per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spatialscore.models.base import GaussianHead, RewardModel, register_arch
from spatialscore.models.text import PromptEncoder

DEFAULTS = {"image_size": 128, "channels": 64, "grid": 4, "text_dim": 128, "g_dim": 128, "f_dim": 128, "seed": 0}


def conv_trunk(channels: int, image_size: int, grid: int) -> nn.Sequential:
    """Stride-2 convolutions from image_size down to a grid x grid map of `channels` features."""

    def block(cin: int, cout: int, k: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride=2, padding=k // 2), nn.GroupNorm(8, cout), nn.ReLU())

    layers, side, width = [block(3, channels // 2, 5)], image_size // 2, channels // 2
    while side > grid:
        layers.append(block(width, channels, 3))
        width, side = channels, side // 2
    return nn.Sequential(*layers)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images


class RelationReward(RewardModel):
    arch = "relation"

    def __init__(self, config: dict):
        config = {**DEFAULTS, **config}
        super().__init__(config)
        torch.manual_seed(config["seed"])
        c, t = config["channels"], config["text_dim"]
        self.trunk = conv_trunk(c, config["image_size"], config["grid"])
        self.text = PromptEncoder(t)
        cell = c + 2  # features + (x, y)
        g = config["g_dim"]
        self.g_first, self.g_second = nn.Linear(cell, g), nn.Linear(cell, g, bias=False)
        self.g_text = nn.Linear(t, g, bias=False)
        self.g_rest = nn.Sequential(nn.ReLU(), nn.Linear(g, g), nn.ReLU(), nn.Linear(g, g), nn.ReLU())
        self.f = nn.Sequential(nn.Linear(g + t, config["f_dim"]), nn.ReLU())
        self.head = GaussianHead(config["f_dim"], config["f_dim"])

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(resize_to(images, self.config["image_size"]) * 2 - 1)  # [B, c, grid, grid]
        b, _, gh, gw = feats.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, gh, device=feats.device),
                                torch.linspace(-1, 1, gw, device=feats.device), indexing="ij")
        coords = torch.stack([xs, ys]).expand(b, 2, gh, gw)
        return torch.cat([feats, coords], 1).flatten(2).transpose(1, 2)  # [B, n, c + 2]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cells = self.cells(images)
        q = self.text(prompts, images.device)
        first = self.g_first(cells)[:, :, None, :] + self.g_second(cells)[:, None, :, :] + self.g_text(q)[:, None, None, :]
        pairs = self.g_rest(first).sum(dim=(1, 2)) / cells.shape[1]
        return self.head(self.f(torch.cat([pairs, q], dim=-1)))


@register_arch("relation")
def build(config: dict) -> RelationReward:
    return RelationReward(config)
