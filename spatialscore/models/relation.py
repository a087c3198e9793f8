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
from spatialscore.data.targets import CELL_COLORS, CELL_SHAPES, LETTERS
from spatialscore.models.text import PromptEncoder

DEFAULTS = {"image_size": 128, "channels": 64, "grid": 8, "objects": 8, "text_dim": 128, "g_dim": 128, "f_dim": 128,
            "seed": 0}


def conv_trunk(channels: int, image_size: int, grid: int) -> nn.Sequential:
    """Stride-2 convolutions from image_size down to a grid x grid map of `channels` features."""

    def block(cin: int, cout: int, k: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride=2, padding=k // 2), nn.GroupNorm(8, cout), nn.ReLU())

    layers, side, width = [block(3, channels // 2, 5)], image_size // 2, channels // 2
    while side // 2 >= grid:
        layers.append(block(width, channels, 3))
        width, side = channels, side // 2
    if side != grid or width != channels:  # sizes that are not grid * 2^k: pool to the grid exactly
        layers += [block(width, channels, 3) if width != channels else nn.Identity(), nn.AdaptiveAvgPool2d(grid)]
    return nn.Sequential(*layers)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images


class RelationReward(RewardModel):
    """Cells -> (auxiliary) per-cell colour, shape, offset and sign letters -> the `objects` most object-like cells
    -> g over all their ordered pairs with the prompt -> sum -> f -> Gaussian head."""

    arch = "relation"

    def __init__(self, config: dict):
        config = {**DEFAULTS, **config}
        super().__init__(config)
        torch.manual_seed(config["seed"])
        c, t, g = config["channels"], config["text_dim"], config["g_dim"]
        self.trunk = conv_trunk(c, config["image_size"], config["grid"])
        self.position_slice = slice(c, c + 2)  # where read_cells puts (x, y) in an object vector
        self.cell_heads = nn.Conv2d(c, len(CELL_COLORS) + len(CELL_SHAPES) + 2 + len(LETTERS), 1)
        self.text = PromptEncoder(t)
        obj = c + 2 + len(CELL_COLORS) + len(CELL_SHAPES) + len(LETTERS)  # features, position, and the cell reading
        q = t + len(LETTERS)  # the prompt's encoding and the letters it quotes
        self.g_first, self.g_second = nn.Linear(obj, g), nn.Linear(obj, g, bias=False)
        self.g_text = nn.Linear(q, g, bias=False)
        # each object looks up the words that describe it; g sees both objects' readings (attribute binding)
        self.word_query = nn.Linear(obj, t)
        self.g_word_first, self.g_word_second = nn.Linear(t, g, bias=False), nn.Linear(t, g, bias=False)
        # the pair's displacement, given explicitly: "left of" becomes a sign test instead of something to discover
        self.g_offset = nn.Linear(2, g, bias=False)
        self.g_rest = nn.Sequential(nn.ReLU(), nn.Linear(g, g), nn.ReLU(), nn.Linear(g, g), nn.ReLU())
        self.f = nn.Sequential(nn.Linear(g + q, config["f_dim"]), nn.ReLU())
        self.head = GaussianHead(config["f_dim"], config["f_dim"])

    def read_cells(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-cell object vectors [B, n, obj] and the raw per-cell predictions (logits) for the auxiliary loss."""
        feats = self.trunk(resize_to(images, self.config["image_size"]) * 2 - 1)  # [B, c, G, G]
        b, _, gh, gw = feats.shape
        out = self.cell_heads(feats)
        nc, ns = len(CELL_COLORS), len(CELL_SHAPES)
        pred = {"color": out[:, :nc], "shape": out[:, nc:nc + ns], "offset": out[:, nc + ns:nc + ns + 2],
                "letters": out[:, nc + ns + 2:]}
        ys, xs = torch.meshgrid(torch.arange(gh, device=feats.device), torch.arange(gw, device=feats.device),
                                indexing="ij")
        centre = torch.stack([xs, ys]).float().add(0.5).expand(b, 2, gh, gw)
        # explicit positions: the cell's centre moved by the predicted offset, in [-1, 1] image units
        position = (centre + torch.tanh(pred["offset"])) / torch.tensor([gw, gh], device=feats.device).view(1, 2, 1, 1)
        objects = torch.cat([feats, position * 2 - 1, pred["color"].softmax(1), pred["shape"].softmax(1),
                             pred["letters"].sigmoid()], 1)
        return objects.flatten(2).transpose(1, 2), pred

    def relate(self, objects: torch.Tensor, shape_logits: torch.Tensor, prompts: list[str]):
        k = min(self.config["objects"] or objects.shape[1], objects.shape[1])
        if k < objects.shape[1]:
            objectness = 1 - shape_logits.detach().softmax(1)[:, 0].flatten(1)  # 1 - P(no object here)
            top = objectness.topk(k, dim=1).indices
            objects = objects.gather(1, top[..., None].expand(-1, -1, objects.shape[-1]))
        pooled, words, mask = self.text(prompts, objects.device, words=True)
        q = torch.cat([pooled, self.text.tokenizer.letter_bag(prompts).to(objects.device)], -1)
        scores = self.word_query(objects) @ words.transpose(1, 2) / words.shape[-1] ** 0.5  # [B, k, T]
        reading = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1) @ words  # [B, k, t]
        position = objects[..., self.position_slice]
        displacement = position[:, :, None, :] - position[:, None, :, :]  # [B, k, k, 2]
        first = (self.g_first(objects)[:, :, None, :] + self.g_second(objects)[:, None, :, :]
                 + self.g_word_first(reading)[:, :, None, :] + self.g_word_second(reading)[:, None, :, :]
                 + self.g_offset(displacement * 4) + self.g_text(q)[:, None, None, :])
        pairs = self.g_rest(first).sum(dim=(1, 2)) / (k * k)
        return self.head(self.f(torch.cat([pairs, q], dim=-1)))

    def forward(self, images: torch.Tensor, prompts: list[str], targets: dict | None = None):
        objects, pred = self.read_cells(images)
        mu, sigma = self.relate(objects, pred["shape"], prompts)
        return (mu, sigma) if targets is None else (mu, sigma, cell_loss(pred, targets))


def cell_loss(pred: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour and shape cross-entropy, averaged separately over object cells and empty cells — most cells are
    empty, and a plain mean lets the model ignore the few that matter — plus, where there is an object, the
    offset regression and the sign letters."""
    color, shape = targets["color"].long(), targets["shape"].long()
    present = (shape > 0).float()
    empty = 1 - present

    def balanced(per_cell: torch.Tensor) -> torch.Tensor:
        return (per_cell * present).sum() / present.sum().clamp(min=1) + (per_cell * empty).sum() / empty.sum().clamp(min=1)

    loss = balanced(F.cross_entropy(pred["color"], color, reduction="none"))
    loss = loss + balanced(F.cross_entropy(pred["shape"], shape, reduction="none"))
    offset = torch.tanh(pred["offset"]).permute(0, 2, 3, 1)
    loss = loss + ((offset - targets["offset"]) ** 2).sum(-1).mul(present).sum() / present.sum().clamp(min=1)
    letters = F.binary_cross_entropy_with_logits(pred["letters"].permute(0, 2, 3, 1), targets["letters"].float(),
                                                 reduction="none").mean(-1)
    return loss + (letters * present).sum() / present.sum().clamp(min=1)


@register_arch("relation")
def build(config: dict) -> RelationReward:
    return RelationReward(config)
