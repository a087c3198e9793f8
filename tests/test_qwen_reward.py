"""The Qwen2.5-VL reward model at tiny scale: shapes, LoRA-only training, save/load round trips, error messages."""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from spatialscore.data.pairs import PairSpec, make_pair  # noqa: E402
from spatialscore.errors import SpatialScoreError  # noqa: E402
from spatialscore.models.base import load_model, save_model  # noqa: E402
from spatialscore.models.qwen import (QwenRewardModel, tiny_backbone_config, tiny_processor,  # noqa: E402
                                      tiny_tokenizer)
from transformers import Qwen2_5_VLModel  # noqa: E402

TINY = {"arch": "qwen2_5_vl", "tiny": True, "image_size": 56, "lora_r": 4, "lora_alpha": 8, "head_hidden": 32,
        "seed": 0}


def _pairs(n: int = 2, seed: int = 5):
    """chosen images, rejected images and prompts of n shapes-world pairs (128 px; the model resizes them)."""
    chosen, rejected, prompts = [], [], []
    for i in range(n):
        record, c, r = make_pair(i, PairSpec(seed=seed))
        chosen.append(torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255)
        rejected.append(torch.from_numpy(np.array(r)).permute(2, 0, 1).float() / 255)
        prompts.append(record["prompt"])
    return torch.stack(chosen), torch.stack(rejected), prompts


def _trained(steps: int = 2) -> tuple[QwenRewardModel, list[float]]:
    model = QwenRewardModel(TINY)
    chosen, rejected, prompts = _pairs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        mu_c, s_c = model(chosen, prompts)
        mu_r, s_r = model(rejected, prompts)
        loss = -torch.special.log_ndtr((mu_c - mu_r) / torch.sqrt(s_c**2 + s_r**2)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


@pytest.fixture(scope="module")
def trained():
    return _trained()


def test_forward_shapes_and_positive_sigma():
    model = QwenRewardModel(TINY)
    images = torch.rand(3, 3, 64, 64)
    prompts = ["a red circle left of a blue square", "x", "a green triangle above a yellow star"]
    mu, sigma = model(images, prompts)
    assert mu.shape == sigma.shape == (3,)
    assert bool((sigma > 0).all())
    # Padding does not move the <reward> read-out: a row scores the same alone as in a padded batch.
    alone, _ = model(images[1:2], prompts[1:2])
    assert torch.allclose(alone, mu[1:2], atol=1e-5)


def test_training_moves_only_lora_head_and_reward_embedding(trained):
    model, losses = trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") or n == "reward_embedding" for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert all(np.isfinite(losses))
    fresh = QwenRewardModel(TINY).state_dict()
    after = model.state_dict()
    changed = {n for n in after if not torch.equal(after[n], fresh[n])}
    assert changed, "two AdamW steps changed nothing"
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"
    assert any("lora_B" in n for n in changed) and any(n.startswith("head.") for n in changed)


def test_save_load_gives_identical_scores_and_saves_only_trained_tensors(trained, tmp_path):
    model, _ = trained
    chosen, _, prompts = _pairs()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        loaded.train(mode == "train")
        with torch.no_grad():
            assert torch.equal(model(chosen, prompts)[0], loaded(chosen, prompts)[0]), mode
            assert torch.equal(model(chosen, prompts)[1], loaded(chosen, prompts)[1]), mode

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(model.saved_state())
    assert len(saved) < len(model.state_dict()) // 2
    assert sum(t.numel() for t in saved.values()) < sum(t.numel() for t in model.state_dict().values()) // 10


def test_scores_survive_a_fresh_process(trained, tmp_path):
    model, _ = trained
    model.eval()
    chosen, _, prompts = _pairs()
    save_model(model, tmp_path / "ckpt")
    torch.save({"images": chosen, "prompts": prompts}, tmp_path / "inputs.pt")
    script = (f"import torch; from spatialscore.models.base import load_model\n"
              f"m = load_model({str(tmp_path / 'ckpt')!r}).eval(); x = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
              f"with torch.no_grad(): torch.save(m(x['images'], x['prompts']), {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    with torch.no_grad():
        mu, sigma = model(chosen, prompts)
    mu2, sigma2 = torch.load(tmp_path / "out.pt")
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)


def test_missing_pretrained_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-qwen"
    with pytest.raises(SpatialScoreError, match="no-such-qwen"):
        QwenRewardModel({**TINY, "tiny": False, "pretrained": str(missing)})


def test_loads_a_real_from_pretrained_directory(tmp_path):
    torch.manual_seed(TINY["seed"])
    Qwen2_5_VLModel(tiny_backbone_config(tiny_tokenizer())).save_pretrained(tmp_path / "base")
    tiny_processor(TINY["image_size"]).save_pretrained(tmp_path / "base")
    tiny = QwenRewardModel(TINY)
    model = QwenRewardModel({**TINY, "tiny": False, "pretrained": str(tmp_path / "base")})
    base = {k: v for k, v in tiny.backbone.state_dict().items() if "lora_" not in k}
    loaded = model.backbone.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in base.items())
    chosen, _, prompts = _pairs()
    mu, sigma = model.eval()(chosen, prompts)
    mu_tiny, _ = tiny.eval()(chosen, prompts)
    assert mu.shape == sigma.shape == (2,) and bool((sigma > 0).all())
    assert torch.allclose(mu, mu_tiny, atol=1e-5)  # same base weights, same seed for LoRA + head
