"""The training objectives as small pure functions: pairwise preference losses for reward models, and the pieces of
the group policy-gradient objective (GRPO) for generators.

SpatialScore's reward head predicts a Gaussian (mu, sigma) per image, so the chance that the chosen image beats the
rejected one is Phi of the standardised mean gap (probabilistic Bradley–Terry). Plain Bradley–Terry on scalar
rewards is kept beside it as the baseline.

GRPO samples G images per prompt, standardises each reward within its group (the advantage), may train on only the
k best and k worst of each group (top-k filtering, as SpatialScore does with 6 + 6 of 24), and maximises the clipped
importance-weighted advantage (PPO), with a KL penalty between the policy's and the reference's Gaussian steps.
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


def _groups(values: Tensor, group_size: int) -> Tensor:
    if values.ndim != 1 or group_size < 1 or len(values) % group_size:
        raise ValueError(f"expected a 1-D tensor of whole groups of {group_size}, got shape {tuple(values.shape)}")
    return values.view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Each reward standardised within its group of `group_size` consecutive samples (one prompt's images); a group
    whose rewards are all equal gets zero advantages."""
    groups = _groups(rewards.float(), group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def top_k_mask(rewards: Tensor, group_size: int, k: int) -> Tensor:
    """True for the k best and the k worst samples of each group (all of them when 2k >= group_size): the samples
    whose advantages carry the signal; the middle of the group is skipped. Ties keep the earlier sample."""
    groups = _groups(rewards, group_size)
    if k < 1:
        raise ValueError(f"top-k filtering keeps k >= 1 samples at each end of a group, got k={k}")
    if 2 * k >= group_size:
        return torch.ones(len(rewards), dtype=torch.bool, device=rewards.device)
    order = torch.argsort(groups, dim=1, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.cat([order[:, :k], order[:, -k:]], 1), True)
    return keep.flatten()


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float,
                        reduction: str = "mean") -> Tensor:
    """PPO's clipped surrogate, negated to be minimised: -min(r A, clip(r, 1 - c, 1 + c) A), r = exp(lp - lp_old)."""
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return _reduce(loss, reduction)


def gaussian_step_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float, reduction: str = "mean") -> Tensor:
    """KL between two Gaussian steps with the same std, N(mean, std^2) || N(ref_mean, std^2), averaged over each
    sample's elements (like the step log-probabilities): [B] before the reduction."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    per_sample = (((mean - ref_mean) ** 2) / (2 * std ** 2)).flatten(1).mean(1)
    return _reduce(per_sample, reduction)
