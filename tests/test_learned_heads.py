"""The learned heads: `spatialscore` (a reward model's mu) and `clip` (CLIP score), at tiny scale, offline."""

import pytest
import torch

from spatialscore.errors import SpatialScoreError
from spatialscore.heads import get_head, head_class
from spatialscore.heads.learned import CHECKPOINT_ENV, tiny_clip, tiny_clip_tokenizer
from spatialscore.models.base import load_model

PROMPTS = ["a red circle left of a blue square", "two green triangles", "a sign that says CAT above a circle"]


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def checkpoint(tmp_path):
    return head_class("spatialscore").example_kwargs(tmp_path)["checkpoint"]


def test_spatialscore_head_scores_are_the_models_mu(checkpoint):
    images = _images(3)
    out = get_head("spatialscore", checkpoint=checkpoint)(images, PROMPTS)
    model = load_model(checkpoint).eval()
    with torch.no_grad():
        mu, sigma = model(images, PROMPTS)[:2]
    assert torch.equal(out.scores, mu) and torch.equal(out.extras["sigma"], sigma)
    assert not head_class("spatialscore").needs_meta and not head_class("spatialscore").bounded
    batched = get_head("spatialscore", checkpoint=checkpoint, batch_size=2)(images, PROMPTS)
    assert torch.allclose(batched.scores, mu, atol=1e-5)


def test_spatialscore_head_reads_the_checkpoint_from_the_environment(checkpoint, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, checkpoint)
    images = _images(2)
    assert torch.equal(get_head("spatialscore")(images, PROMPTS[:2]).scores,
                       get_head("spatialscore", checkpoint=checkpoint)(images, PROMPTS[:2]).scores)


def test_spatialscore_head_without_a_checkpoint_says_how_to_pass_one(monkeypatch, tmp_path):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    with pytest.raises(SpatialScoreError, match=rf"checkpoint=\.\.\..*{CHECKPOINT_ENV}"):
        get_head("spatialscore")
    with pytest.raises(SpatialScoreError, match="not a reward-model checkpoint"):
        get_head("spatialscore", checkpoint=str(tmp_path / "nowhere"))


def test_tiny_clip_is_deterministic_and_scores_pairs_not_batches():
    images = _images(3, size=48)
    first = get_head("clip", tiny=True)(images, PROMPTS)
    second = get_head("clip", tiny=True)(images, PROMPTS)
    assert first.extras == {} and torch.equal(first.scores, second.scores)
    assert ((first.scores >= -1) & (first.scores <= 1)).all()
    repeated = get_head("clip", tiny=True)(images[[0, 0, 1]], [PROMPTS[0], PROMPTS[0], PROMPTS[1]]).scores
    assert repeated[0] == repeated[1]
    assert repeated[2].item() == pytest.approx(first.scores[1].item(), abs=1e-6)


def test_tiny_clip_truncates_long_prompts():
    head = get_head("clip", tiny=True)
    long = " ".join(["a red circle left of a blue square"] * 20)
    assert torch.isfinite(head(_images(1), [long]).scores).all()


def test_a_saved_tiny_clip_loads_through_pretrained(tmp_path):
    tokenizer = tiny_clip_tokenizer()
    tiny_clip(tokenizer).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    images = _images(3)
    loaded = get_head("clip", pretrained=str(tmp_path / "clip"))(images, PROMPTS).scores
    assert torch.equal(loaded, get_head("clip", tiny=True)(images, PROMPTS).scores)


def test_clip_head_errors_name_what_is_missing(tmp_path):
    with pytest.raises(SpatialScoreError, match=str(tmp_path / "missing")):
        get_head("clip", pretrained=str(tmp_path / "missing"))
    with pytest.raises(SpatialScoreError, match="pretrained=.*tiny=True"):
        get_head("clip")
