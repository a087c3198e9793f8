"""Pairwise preference losses for reward models, as small pure functions.

SpatialScore's reward head predicts a Gaussian (mu, sigma) per image, so the chance that the chosen image beats the
rejected one is Phi of the standardised mean gap (probabilistic Bradley–Terry). Plain Bradley–Terry on scalar
rewards is kept beside it as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def _check_same_shape(**tensors: Tensor) -> None:
    # Broadcasting would silently pair every chosen with every rejected; a pair loss needs one-to-one pairs.
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {first_name}'s shape {tuple(first.shape)}")


def _check_nonnegative(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if (t < 0).any():
            raise ValueError(f"{name} must be >= 0 (a standard deviation), got min {t.min().item():g}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")


def _gaussian_z(mu_c: Tensor, sigma_c: Tensor, mu_r: Tensor, sigma_r: Tensor, eps: float) -> Tensor:
    """Standardised margin (mu_c - mu_r) / sd of the difference of two independent Gaussians."""
    _check_same_shape(mu_c=mu_c, sigma_c=sigma_c, mu_r=mu_r, sigma_r=sigma_r)
    _check_nonnegative(sigma_c=sigma_c, sigma_r=sigma_r)
    # eps keeps z (and its gradient) finite as both sigmas reach 0, where the loss becomes a hard step.
    return (mu_c - mu_r) / torch.sqrt(sigma_c**2 + sigma_r**2 + eps)


def gaussian_bt_prob(mu_c: Tensor, sigma_c: Tensor, mu_r: Tensor, sigma_r: Tensor, eps: float = 1e-6) -> Tensor:
    """P(chosen > rejected) = Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2 + eps)), elementwise."""
    return torch.special.ndtr(_gaussian_z(mu_c, sigma_c, mu_r, sigma_r, eps))


def gaussian_bt_loss(mu_c: Tensor, sigma_c: Tensor, mu_r: Tensor, sigma_r: Tensor, eps: float = 1e-6,
                     reduction: str = "mean") -> Tensor:
    """-log P(chosen > rejected); log_ndtr stays finite where log(ndtr(z)) underflows to -inf (z << 0)."""
    return _reduce(-torch.special.log_ndtr(_gaussian_z(mu_c, sigma_c, mu_r, sigma_r, eps)), reduction)


def bt_loss(r_c: Tensor, r_r: Tensor, margin: float | Tensor = 0.0, reduction: str = "mean") -> Tensor:
    """-log sigmoid(r_c - r_r - margin): the chosen reward must beat the rejected one by `margin` (as TRL's)."""
    _check_same_shape(r_c=r_c, r_r=r_r)
    if isinstance(margin, Tensor):
        _check_same_shape(r_c=r_c, margin=margin)
    return _reduce(-F.logsigmoid(r_c - r_r - margin), reduction)


def pairwise_accuracy(score_c: Tensor, score_r: Tensor) -> float:
    """Share of pairs ranked correctly; a tie is a coin flip, so it counts 0.5."""
    _check_same_shape(score_c=score_c, score_r=score_r)
    if score_c.numel() == 0:
        raise ValueError("score_c is empty: accuracy of zero pairs is undefined")
    wins = (score_c > score_r).double() + 0.5 * (score_c == score_r).double()
    return wins.mean().item()
