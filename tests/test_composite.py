"""Composite rewards: running normalisation against hand-computed statistics, weights, and exact state round-trip."""

import pytest
import torch

from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead, RewardOutput
from spatialscore.heads.composite import CompositeReward, RunningNorm


class Ramp(RewardHead):
    """Scores 0, 1, 2, ... times 10: a head with a large scale."""

    def score(self, images, prompts, meta):
        return RewardOutput(torch.arange(len(prompts), dtype=torch.float32) * 10)


def test_running_norm_matches_numpy_style_statistics():
    norm = RunningNorm(eps=0.0)
    norm.update(torch.tensor([1.0, 2.0]))
    norm.update(torch.tensor([3.0, 4.0, 5.0]))
    # all five values 1..5: mean 3, population variance (4+1+0+1+4)/5 = 2
    assert norm.count == 5 and norm.mean.item() == pytest.approx(3.0) and norm.std.item() == pytest.approx(2 ** 0.5)
    assert norm(torch.tensor([3.0 + 2 ** 0.5])).item() == pytest.approx(1.0)


def test_composite_normalises_each_head_and_weights_them():
    images = torch.rand(3, 3, 8, 8)
    reward = CompositeReward({"ramp": 2.0}, heads={"ramp": Ramp()})
    out = reward(images, ["a", "b", "c"])
    # raw 0, 10, 20: mean 10, std sqrt(200/3) = 8.165; normalised -1.2247, 0, 1.2247; times weight 2
    assert out.scores.tolist() == pytest.approx([-2.4495, 0.0, 2.4495], abs=1e-4)
    assert out.extras["ramp"].tolist() == [0.0, 10.0, 20.0]
    raw = CompositeReward({"ramp": 0.5}, normalize=False, heads={"ramp": Ramp()})(images, ["a", "b", "c"])
    assert raw.scores.tolist() == [0.0, 5.0, 10.0]


def test_state_round_trip_continues_exactly():
    images, prompts = torch.rand(3, 3, 8, 8), ["a", "b", "c"]
    first = CompositeReward({"ramp": 1.0}, heads={"ramp": Ramp()})
    first(images, prompts)
    second = CompositeReward({"ramp": 1.0}, heads={"ramp": Ramp()})
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    assert torch.equal(first(images, prompts).scores, second(images, prompts).scores)
    with pytest.raises(SpatialScoreError, match="no statistics for head 'oracle'"):
        CompositeReward({"oracle": 1.0}).load_state_dict({})


def test_composite_errors():
    with pytest.raises(SpatialScoreError, match="at least one head"):
        CompositeReward({})
    with pytest.raises(SpatialScoreError, match="unknown reward head"):
        CompositeReward({"nope": 1.0})
