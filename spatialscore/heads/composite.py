"""A composite reward: several heads, each normalised by its own running mean and standard deviation, summed with
weights. Normalising per head keeps one head's scale (say a counting score in [0, 1] against a learned reward with
a spread of 5) from drowning the others; the running statistics travel in `state_dict` so a resumed RL run
normalises exactly as the uninterrupted one would."""

from __future__ import annotations

import torch

from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead, RewardOutput, get_head


class RunningNorm:
    """Mean and variance over every score seen so far (Chan et al.'s parallel update, exact in float64)."""

    def __init__(self, eps: float = 1e-6):
        self.count, self.mean, self.m2, self.eps = 0, torch.zeros((), dtype=torch.float64), \
            torch.zeros((), dtype=torch.float64), eps

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_m2 = x.mean(), ((x - x.mean()) ** 2).sum()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.count, 1)).sqrt()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / (self.std + self.eps)).float()


class CompositeReward(RewardHead):
    """sum_i w_i * norm_i(head_i(images, prompts, meta)); extras hold every head's raw scores."""

    name = "composite"

    def __init__(self, weights: dict[str, float], normalize: bool = True, head_kwargs: dict | None = None,
                 heads: dict[str, RewardHead] | None = None):
        """`weights` by registered head name; `heads` may supply ready-built heads for some of those names."""
        if not weights:
            raise SpatialScoreError("a composite reward needs at least one head, e.g. {'oracle': 1.0}")
        self.weights = dict(weights)
        built = heads or {}
        self.heads = {name: built[name] if name in built else get_head(name, **(head_kwargs or {}).get(name, {}))
                      for name in self.weights}
        self.normalize = normalize
        self.norms = {name: RunningNorm() for name in self.weights}
        self.needs_meta = any(h.needs_meta for h in self.heads.values())

    def score(self, images, prompts, meta) -> RewardOutput:
        total = torch.zeros(len(prompts))
        extras = {}
        for name, head in self.heads.items():
            raw = head(images, prompts, meta).scores
            extras[name] = raw
            if self.normalize:
                self.norms[name].update(raw[torch.isfinite(raw)])  # one NaN would poison the statistics
                raw = self.norms[name](raw)
            total = total + self.weights[name] * raw
        return RewardOutput(total, extras)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, norm in self.norms.items():
            state[f"{name}.count"] = torch.tensor(norm.count, dtype=torch.int64)
            state[f"{name}.mean"], state[f"{name}.m2"] = norm.mean.clone(), norm.m2.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, norm in self.norms.items():
            try:
                norm.count = int(state[f"{name}.count"])
                norm.mean, norm.m2 = state[f"{name}.mean"].double(), state[f"{name}.m2"].double()
            except KeyError as err:
                raise SpatialScoreError(f"composite reward state has no statistics for head {name!r}") from err
