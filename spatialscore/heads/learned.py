"""Learned heads: `spatialscore`, a trained SpatialScore reward model (its mu), and `clip`, the CLIP-score
baseline (cosine similarity of a CLIP model's image and text embeddings). Neither promises scores in [0, 1].

transformers is imported when a `clip` head is built, not when this module registers it, so listing heads stays
fast. The tiny CLIP (`tiny=True`) is built from a config and a vocabulary in code, for offline tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from spatialscore.errors import SpatialScoreError
from spatialscore.io import local_model_dir
from spatialscore.heads import RewardHead, RewardOutput, register_head
from spatialscore.models.base import build_model, load_model, save_model

CHECKPOINT_ENV = "SPATIALSCORE_REWARD_CHECKPOINT"
TINY_RELATION = {"arch": "relation", "channels": 16, "text_dim": 32, "g_dim": 32, "f_dim": 32, "image_size": 64,
                 "grid": 4}


@register_head("spatialscore")
class SpatialScoreHead(RewardHead):
    """A trained SpatialScore reward model: score = mu, extras: sigma (unbounded, in the model's own units)."""

    bounded = False

    def __init__(self, checkpoint: str | None = None, batch_size: int = 32, device: str = "cpu",
                 prune_layer: int | None = None, prune_keep: float | None = None, quantize: str | None = None,
                 calibration: int = 0):
        """`prune_layer` / `prune_keep`: vision-token pruning of a qwen2_5_vl model (overriding its saved config);
        `quantize: int8`: dynamic int8 linear layers for CPU scoring, with a bias correction measured on
        `calibration` faithful shapes-world images when > 0 (spatialscore/models/quantize.py)."""
        checkpoint = checkpoint or os.environ.get(CHECKPOINT_ENV)
        if not checkpoint:
            raise SpatialScoreError(f"head 'spatialscore' needs a reward-model checkpoint (a run or checkpoint "
                                    f"directory): pass get_head('spatialscore', checkpoint=...) or set {CHECKPOINT_ENV}")
        if batch_size < 1:
            raise SpatialScoreError(f"head 'spatialscore': batch_size must be >= 1, got {batch_size}")
        if quantize not in (None, "int8"):
            raise SpatialScoreError(f"head 'spatialscore': quantize must be 'int8' or unset, got {quantize!r}")
        if quantize and device != "cpu":
            raise SpatialScoreError(f"head 'spatialscore': quantize=int8 is for CPU scoring, got device={device!r}")
        if calibration < 0 or (calibration and not quantize):
            raise SpatialScoreError("head 'spatialscore': calibration (images for the int8 bias correction) needs "
                                    "quantize=int8 and a count >= 0")
        self.model = load_model(checkpoint).to(device).eval()
        self.batch_size, self.device = batch_size, device
        if prune_layer is not None or prune_keep is not None:
            if not hasattr(self.model, "set_pruning"):
                raise SpatialScoreError(f"head 'spatialscore': prune_layer / prune_keep need a model with vision "
                                        f"tokens (qwen2_5_vl); {checkpoint} is {self.model.arch!r}")
            self.model.set_pruning(prune_layer, 1.0 if prune_keep is None else prune_keep)
        self.quantized = None
        if quantize:
            from spatialscore.models.quantize import quantize_int8

            self.quantized = quantize_int8(self.model, self._calibration(calibration) if calibration else None)

    def _calibration(self, n: int):
        """Runs the model on n faithful shapes-world images of their prompts (a seed no recipe trains on)."""
        from spatialscore.data.tensors import generated_pairs

        data = generated_pairs(n, seed=424242, style="mixed", phrasing="all", image_size=128, progress=False)

        def run():
            for start in range(0, n, self.batch_size):
                index = torch.arange(start, min(start + self.batch_size, n))
                self.model(data.images("chosen", index).to(self.device), [data.prompts[i] for i in index.tolist()])
        return run

    @classmethod
    def example_kwargs(cls, tmp_path: Path) -> dict:
        directory = Path(tmp_path) / "spatialscore-head"
        save_model(build_model(TINY_RELATION), directory)
        return {"checkpoint": str(directory)}

    @torch.no_grad()
    def score(self, images, prompts, meta) -> RewardOutput:
        mus, sigmas = [], []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            mu, sigma = self.model(images[start:end].to(self.device), prompts[start:end])[:2]
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
        if not mus:
            return RewardOutput(torch.zeros(0), {"sigma": torch.zeros(0)})
        return RewardOutput(torch.cat(mus), {"sigma": torch.cat(sigmas)})


def tiny_clip_tokenizer(specials_last: bool = False):
    """A CLIP BPE tokenizer over the 256 byte-level characters (each alone and word-final, so no text is unknown)
    with a few merges; a fixed list, so every process builds the same ids. `specials_last` numbers
    <|startoftext|> and <|endoftext|> last and pads with "!" (id 0), as real CLIP and OWLv2 do: OWLv2 pools each
    query at its highest token id and takes a query that starts with id 0 for padding."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("l", "e"), ("le", "f"), ("lef", "t</w>"),
              ("r", "i"), ("ri", "g"), ("rig", "h"), ("righ", "t</w>")]  # pairs: the backend rejects "a b" strings
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges)]
    tokens = [*tokens, *specials] if specials_last else [*specials, *tokens]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, **({"pad_token": chars[0]} if specials_last else {}))


def tiny_towers(tokenizer, image_size: int) -> tuple[dict, dict]:
    """Text and vision tower configs of a tiny CLIP-family model: one layer of width 32 each, 32 text positions,
    8 px patches."""
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    return text, vision


def tiny_clip(tokenizer):
    """A random CLIP (vision: 32 px images in 8 px patches; text: 32 positions; one layer of width 32 each)."""
    from transformers import CLIPConfig, CLIPModel

    text, vision = tiny_towers(tokenizer, 32)
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))


def load_clip(path: str):
    from transformers import AutoTokenizer, CLIPModel

    directory = local_model_dir(path, "head 'clip': pretrained", "a CLIP model and its tokenizer")
    try:
        model = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SpatialScoreError(f"head 'clip': pretrained={path}: not a loadable CLIP directory: {err}") from err
    return model, tokenizer


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIPProcessor's image steps in torch: shortest side to `size` (bicubic), centre crop, CLIP mean/std."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@register_head("clip")
class ClipHead(RewardHead):
    """CLIP score: cosine similarity of CLIP's image and prompt embeddings, in [-1, 1] (a baseline)."""

    bounded = False

    def __init__(self, pretrained: str | None = None, tiny: bool = False):
        if pretrained:
            self.model, self.tokenizer = load_clip(pretrained)
        elif tiny:
            self.tokenizer = tiny_clip_tokenizer()
            self.model = tiny_clip(self.tokenizer)
        else:
            raise SpatialScoreError("head 'clip' needs pretrained=<a local from_pretrained CLIP directory> "
                                    "or tiny=True (a random tiny CLIP, for tests)")
        self.model.eval()

    @classmethod
    def example_kwargs(cls, tmp_path: Path) -> dict:
        return {"tiny": True}

    @torch.no_grad()
    def score(self, images, prompts, meta) -> RewardOutput:
        if not prompts:
            return RewardOutput(torch.zeros(0))
        config, device = self.model.config, self.model.device
        text = self.tokenizer(list(prompts), padding=True, truncation=True,
                              max_length=config.text_config.max_position_embeddings, return_tensors="pt")
        out = self.model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                         pixel_values=clip_pixels(images.to(device).float(), config.vision_config.image_size))
        return RewardOutput(F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).float().cpu())
