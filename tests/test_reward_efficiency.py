"""Faster reward scoring: vision-token pruning of the Qwen2.5-VL reward model and dynamic int8 quantization."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from spatialscore.errors import SpatialScoreError  # noqa: E402
from spatialscore.heads import get_head  # noqa: E402
from spatialscore.heads.learned import TINY_RELATION  # noqa: E402
from spatialscore.models.base import build_model, load_model, save_model  # noqa: E402
from spatialscore.models.qwen import REWARD, QwenRewardModel  # noqa: E402

# 112 px: 8x8 patches of 14 px, merged 2x2 -> 16 vision tokens per image
TINY = {"arch": "qwen2_5_vl", "tiny": True, "image_size": 112, "tiny_layers": 4, "lora_r": 4, "lora_alpha": 8,
        "head_hidden": 32, "seed": 0}
PROMPTS = ["a red circle left of a blue square", "x", "a green triangle above a yellow star and a purple circle"]


def _model(**overrides) -> QwenRewardModel:
    model = QwenRewardModel({**TINY, **overrides}).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: LoRA B starts at zero, which would hide the adapter's path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def _images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_pruning_that_keeps_every_token_scores_like_no_pruning(layer):
    model, images = _model(), _images()
    with torch.no_grad():
        mu, sigma = model(images, PROMPTS)
        model.set_pruning(layer, 1.0)
        mu_p, sigma_p = model(images, PROMPTS)
    assert model.kept_vision_tokens == [16] * 4
    torch.testing.assert_close(mu_p, mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma_p, sigma, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer, keep, counts", [(2, 0.25, [16, 16, 4, 4]), (1, 0.3, [16, 5, 5, 5]),
                                                 (0, 0.5, [8, 8, 8, 8]), (3, 0.01, [16, 16, 16, 1])])
def test_the_vision_tokens_kept_in_each_layer_follow_the_config(layer, keep, counts):
    model = _model(prune_layer=layer, prune_keep=keep)
    with torch.no_grad():
        mu, _ = model(_images(), PROMPTS)
    assert model.kept_vision_tokens == counts
    assert torch.isfinite(mu).all()


def test_pruning_changes_scores_and_keeps_the_most_attended_tokens():
    model, images = _model(), _images()
    with torch.no_grad():
        full = model(images, PROMPTS)[0]
        model.set_pruning(1, 0.25)
        kept = model(images, PROMPTS)[0]
    assert not torch.allclose(full, kept, atol=1e-4)  # dropping 12 of 16 tokens is not a no-op


def test_a_pruned_model_trains():
    model = _model(prune_layer=1, prune_keep=0.5).train()
    images, prompts = _images(4), PROMPTS + ["a blue star"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        mu, sigma = model(images, prompts)
        loss = -torch.special.log_ndtr((mu[:2] - mu[2:]) / torch.sqrt(sigma[:2] ** 2 + sigma[2:] ** 2)).mean()
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert model.kept_vision_tokens == [16, 8, 8, 8]
    assert losses[-1] < losses[0]
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "layers.0." in n)  # before pruning
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "layers.3." in n)  # after


def test_a_pruned_model_saves_and_loads_with_its_setting(tmp_path):
    model, images = _model(prune_layer=2, prune_keep=0.25), _images()
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["prune_layer"], config["prune_keep"]) == (2, 0.25)
    loaded = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, PROMPTS)[0], model(images, PROMPTS)[0])
    assert loaded.kept_vision_tokens == [16, 16, 4, 4]
    # the head can override the saved setting
    head = get_head("spatialscore", checkpoint=str(tmp_path / "m"), prune_layer=1, prune_keep=0.5)
    head.score(images, PROMPTS, [{}] * 3)
    assert head.model.kept_vision_tokens == [16, 8, 8, 8]


def test_images_at_the_processor_size_are_encoded_in_torch_exactly_as_the_processor_does():
    model = _model()
    images = _images(size=112)
    fast = model.encode(images, PROMPTS)
    texts = [f"<|vision_start|><|image_pad|><|vision_end|>{p}{REWARD}" for p in PROMPTS]
    slow = model.processor(images=list(images), text=texts, padding=True, return_tensors="pt",
                           images_kwargs={"do_rescale": False, "do_resize": False})
    assert set(fast) == set(slow)
    for key in slow:
        assert torch.equal(fast[key].to(slow[key].dtype), slow[key]), key


def test_bad_pruning_settings_name_the_field():
    with pytest.raises(SpatialScoreError, match="model.prune_layer"):
        QwenRewardModel({**TINY, "prune_layer": 4})
    with pytest.raises(SpatialScoreError, match="model.prune_keep"):
        QwenRewardModel({**TINY, "prune_layer": 1, "prune_keep": 0})
    with pytest.raises(SpatialScoreError, match="model.tiny_hidden"):
        QwenRewardModel({**TINY, "tiny_hidden": 100})


def _saved(tmp_path, config: dict) -> str:
    model = build_model(config)
    if "lora_r" in config:  # give the adapter weight, so merging it matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    save_model(model, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


@pytest.mark.parametrize("config", [TINY, TINY_RELATION], ids=["qwen2_5_vl", "relation"])
def test_int8_scores_stay_close_to_float_and_the_head_stays_float(tmp_path, config):
    checkpoint = _saved(tmp_path, config)
    images, prompts = _images(8), (PROMPTS * 3)[:8]
    exact = get_head("spatialscore", checkpoint=checkpoint).score(images, prompts, [{}] * 8).scores
    head = get_head("spatialscore", checkpoint=checkpoint, quantize="int8")
    quantized = head.score(images, prompts, [{}] * 8).scores
    kinds = {type(m).__name__ for m in head.model.modules()}
    assert "Linear" in kinds and head.quantized["quantized"] > 0
    assert type(head.model.head.net[0]) is torch.nn.Linear  # the Gaussian head is left in float
    assert not any(type(m) is torch.nn.Linear for name, m in head.model.named_modules() if not name.startswith("head"))
    assert torch.isfinite(quantized).all()
    spread = float(exact.max() - exact.min()) + float(exact.abs().mean())
    assert float((quantized - exact).abs().max()) < 0.1 * spread
    if config is TINY:
        assert head.quantized["lora_merged"] > 0


def test_int8_bias_correction_is_measured_on_calibration_images(tmp_path):
    checkpoint = _saved(tmp_path, TINY)
    head = get_head("spatialscore", checkpoint=checkpoint, quantize="int8", calibration=4)
    assert head.quantized["bias_corrected"] == head.quantized["quantized"]
    plain = get_head("spatialscore", checkpoint=checkpoint, quantize="int8")
    layer = "backbone.language_model.layers.0.mlp.down_proj"
    corrected, uncorrected = (dict(h.model.named_modules())[layer].bias() for h in (head, plain))
    assert uncorrected is None and corrected is not None and corrected.abs().sum() > 0


def test_bad_efficiency_options_are_refused(tmp_path):
    checkpoint = _saved(tmp_path, TINY_RELATION)
    with pytest.raises(SpatialScoreError, match="quantize"):
        get_head("spatialscore", checkpoint=checkpoint, quantize="int4")
    with pytest.raises(SpatialScoreError, match="calibration"):
        get_head("spatialscore", checkpoint=checkpoint, calibration=8)
    with pytest.raises(SpatialScoreError, match="qwen2_5_vl"):
        get_head("spatialscore", checkpoint=checkpoint, prune_layer=1, prune_keep=0.5)


def test_train_backbone_trains_and_saves_every_backbone_weight(tmp_path):
    model = _model(train_backbone=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.visual.patch_embed.proj.weight" in trainable
    assert "backbone.language_model.layers.0.mlp.up_proj.weight" in trainable
    mu, _ = model(_images(), PROMPTS)
    mu.sum().backward()
    assert model.backbone.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.backbone.language_model.layers[0].mlp.up_proj.weight.mul_(1.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.backbone.language_model.layers[0].mlp.up_proj.weight,
                               model.backbone.language_model.layers[0].mlp.up_proj.weight)
    assert "backbone.visual.patch_embed.proj.weight" not in _model().saved_state()  # LoRA-only by default
