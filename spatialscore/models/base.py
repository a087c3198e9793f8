"""The interface every reward model follows, the Gaussian (mu, sigma) head, and save/load as safetensors.

A reward model takes `images: FloatTensor[B, 3, H, W]` in [0, 1] and `prompts: list[str]` and returns
`(mu, sigma)`, both FloatTensor[B] (plus an auxiliary loss when a training step passes dense `targets`). Its `config` (JSON-able) is enough to rebuild the architecture; `save` writes
`config.json` + `model.safetensors` (only the trainable tensors for adapter models), atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from spatialscore.errors import SpatialScoreError
from spatialscore.io import atomic_write_bytes, atomic_write_text

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
_BUILDERS: dict[str, Callable[[dict], "RewardModel"]] = {}


class GaussianHead(torch.nn.Module):
    """MLP -> (mu, sigma); sigma = softplus(.) + min_sigma, so the Bradley–Terry denominator never reaches 0."""

    def __init__(self, dim: int, hidden: int = 128, min_sigma: float = 1e-3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 2))
        self.min_sigma = min_sigma

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(h).float()
        return out[:, 0], F.softplus(out[:, 1]) + self.min_sigma


class RewardModel(torch.nn.Module):
    arch = "?"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)

    def forward(self, images: torch.Tensor, prompts: list[str], targets: dict | None = None):
        """(mu, sigma); models with dense supervision return (mu, sigma, auxiliary loss) when given `targets`.
        The targets go through forward itself so DDP and DeepSpeed wrappers see one call."""
        raise NotImplementedError

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds (adapter models override this to save only what they train)."""
        return self.state_dict()


def register_arch(name: str):
    def decorate(builder):
        _BUILDERS[name] = builder
        return builder

    return decorate


def _known_archs() -> list[str]:
    from spatialscore.models import clip_dual, relation  # noqa: F401  (register on import)

    try:
        from spatialscore.models import qwen  # noqa: F401
    except ImportError:  # the Qwen path needs transformers + peft, which a minimal install may lack
        pass
    return sorted(_BUILDERS)


def build_model(config: dict) -> RewardModel:
    arch = config.get("arch")
    if arch not in _known_archs():
        raise SpatialScoreError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(_known_archs())}")
    return _BUILDERS[arch](config)


def save_model(model: RewardModel, directory: str | Path) -> None:
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.saved_state().items()}
    atomic_write_bytes(directory / MODEL_FILE, save(tensors))
    atomic_write_text(directory / CONFIG_FILE, json.dumps({**model.config, "arch": model.arch}, indent=2))


def load_model(directory: str | Path) -> RewardModel:
    """A model saved by `save_model` (a checkpoint dir, or a run dir meaning its final/)."""
    directory = Path(directory)
    if (directory / "final" / CONFIG_FILE).is_file():
        directory = directory / "final"
    if not (directory / CONFIG_FILE).is_file() or not (directory / MODEL_FILE).is_file():
        raise SpatialScoreError(f"{directory}: not a reward-model checkpoint (expected {CONFIG_FILE} and {MODEL_FILE}, "
                                f"or a run directory with final/)")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / MODEL_FILE))
    except (OSError, ValueError) as err:
        raise SpatialScoreError(f"{directory}: unreadable checkpoint: {err}") from err
    model = build_model(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    expected = set(model.saved_state())
    if unexpected or expected & set(missing):
        raise SpatialScoreError(f"{directory}: checkpoint does not match the architecture "
                                f"(missing {sorted(expected & set(missing))[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model
