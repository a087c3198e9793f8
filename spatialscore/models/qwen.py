"""The SpatialScore model: a Qwen2.5-VL backbone with LoRA reads image + prompt, and the last hidden state at a
`<reward>` token appended to the input feeds the Gaussian head.

The `<reward>` token's embedding is a parameter of this model, not a row of the backbone's embedding matrix: a
pretrained tokenizer gains the token with an id the matrix may not have, and a separate vector is saved on its own
(hidden_size floats) instead of the whole resized matrix. Checkpoints hold LoRA tensors + head + that vector.

Offline facts this file relies on (see the shared CPU notes): the processor is a subclass without the video
processor, the image processor is the PIL one (the torchvision one does not import here), `mm_token_type_ids`
is always passed so the 3D rope positions are right, and the tiny model's tokenizer is built in code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from spatialscore.errors import SpatialScoreError
from spatialscore.io import local_model_dir
from spatialscore.models.base import GaussianHead, RewardModel, register_arch

DEFAULTS = {"pretrained": None, "tiny": False, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "head_hidden": 128, "image_size": 448,
            "seed": 0,
            # the tiny backbone's language model (built in code): layers and width
            "tiny_layers": 2, "tiny_hidden": 128,
            # train every backbone weight, not only LoRA (a tiny backbone trained from scratch); checkpoints then
            # hold the whole backbone
            "train_backbone": False,
            # vision-token pruning (HiDrop-style): every vision token through the first `prune_layer` language
            # layers, then only the `prune_keep` share that the text and <reward> tokens attend to most; None: off
            "prune_layer": None, "prune_keep": 1.0}
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD, REWARD = (
    "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<reward>")
PATCH, MERGE = 14, 2


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images and text only: the video processor needs torchvision, absent here."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus the Qwen vision tokens and `<reward>`; the vocabulary
    is a fixed list, so every process builds the same ids."""
    specials = [VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD, REWARD]
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *specials, *map(chr, range(32, 127))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=specials)


def tiny_backbone_config(tokenizer: PreTrainedTokenizerFast, layers: int = 2, hidden: int = 128) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    if hidden % 32:
        raise SpatialScoreError(f"model.tiny_hidden must be a multiple of 32 (heads of 32), got {hidden}")
    heads = hidden // 32  # head_dim 32 at every width, so the rope sections [4, 6, 6] fit
    return Qwen2_5_VLConfig(
        vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                       "out_hidden_size": hidden, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": 2, "window_size": 4 * PATCH * MERGE, "fullatt_block_indexes": [0]},
        text_config={"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
                     "vocab_size": len(tokenizer), "bos_token_id": None, "eos_token_id": None,
                     "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}},
        image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD), vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END), pad_token_id=tokenizer.pad_token_id)


def tiny_processor(image_size: int) -> ImageTextProcessor:
    pixels = image_size * image_size  # min = max: every image becomes one fixed grid of patches
    images = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH, merge_size=MERGE,
                                      temporal_patch_size=2)
    return ImageTextProcessor(image_processor=images, tokenizer=tiny_tokenizer())


def load_pretrained(path: str) -> tuple[Qwen2_5_VLModel, ImageTextProcessor]:
    directory = local_model_dir(path, "model.pretrained", "a Qwen2.5-VL model")
    try:
        backbone = Qwen2_5_VLModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        processor = ImageTextProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory),
                                       tokenizer=AutoTokenizer.from_pretrained(directory, local_files_only=True))
    except (OSError, ValueError) as err:
        raise SpatialScoreError(f"model.pretrained: {path}: not a loadable Qwen2.5-VL directory: {err}") from err
    return backbone, processor


@torch.no_grad()
def vision_token_scores(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, vision: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """How much the text after the image (the prompt and `<reward>`) attends to each vision token in `layer`:
    the layer's own causal attention probabilities (its norm, q/k projections with LoRA, rotary positions), summed
    over those text queries and averaged over heads. [B, S]; -inf where the token is not a vision token."""
    attn = layer.self_attn
    b, s, _ = hidden.shape
    after_image = (vision.cumsum(1) == vision.sum(1, keepdim=True)) & ~vision & attention_mask.bool()
    # only the text after the image asks: its queries are the sequence's last `tail` positions in every row
    tail = s - int(after_image.float().argmax(1).min())
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, s - tail:]).view(b, tail, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, s - tail:], sin[:, s - tail:])
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    query_at = torch.arange(s - tail, s, device=x.device)
    allowed = (torch.arange(s, device=x.device)[None, :] <= query_at[:, None])[None] & attention_mask.bool()[:, None, :]
    logits = ((q @ k.transpose(-1, -2)) * attn.scaling).float()
    probs = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min).softmax(-1)  # [B, H, tail, S]
    received = (probs.mean(1) * after_image[:, s - tail:, None]).sum(1)  # [B, S]
    return received.masked_fill(~vision, float("-inf"))


def pruned_language_forward(language_model, embeds: torch.Tensor, attention_mask: torch.Tensor,
                            position_ids: torch.Tensor, vision: torch.Tensor, layer_index: int,
                            keep: float) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Qwen2.5-VL's text model over `embeds`, with every vision token in the first `layer_index` layers and only the
    `keep` share of them (the most attended by the text, `vision_token_scores`) from there on. Every row has the
    same number of vision tokens (one image of the model's fixed size), so the rows stay equally long; the kept
    tokens keep their order, rotary positions and padding. Returns (final-norm hidden states [B, S'], the kept
    positions [B, S'], the vision tokens per row entering each layer)."""
    from transformers.masking_utils import create_causal_mask

    def causal_mask(h, mask):
        return create_causal_mask(config=language_model.config, inputs_embeds=h, attention_mask=mask,
                                  past_key_values=None, position_ids=None)

    per_row = vision.sum(1)
    if not bool((per_row == per_row[0]).all()):
        raise SpatialScoreError("vision-token pruning needs the same number of vision tokens in every row")
    hidden = embeds
    cos, sin = language_model.rotary_emb(hidden, position_ids)
    mask4d = causal_mask(hidden, attention_mask)
    index = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    counts = []
    for i, layer in enumerate(language_model.layers):
        if i == layer_index:
            n = int(per_row[0])
            kept = max(1, math.ceil(keep * n - 1e-9)) if n else 0
            scores = vision_token_scores(layer, hidden, cos, sin, vision, attention_mask)
            top = scores.topk(kept, dim=1).indices
            text = (~vision).nonzero()[:, 1].view(hidden.shape[0], -1)  # same count per row
            select = torch.cat([text, top], 1).sort(1).values
            hidden = hidden.gather(1, select[..., None].expand(-1, -1, hidden.shape[-1]))
            cos, sin = (t.gather(1, select[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
            attention_mask, vision, index = (t.gather(1, select) for t in (attention_mask, vision, index))
            mask4d = causal_mask(hidden, attention_mask)
        counts.append(int(vision[0].sum()))
        hidden = layer(hidden, attention_mask=mask4d, position_embeddings=(cos, sin), position_ids=None)
    return language_model.norm(hidden), index, counts


class QwenRewardModel(RewardModel):
    arch = "qwen2_5_vl"

    def __init__(self, config: dict):
        config = {**DEFAULTS, **config}
        super().__init__(config)
        torch.manual_seed(config["seed"])
        if config["pretrained"]:
            self.backbone, self.processor = load_pretrained(config["pretrained"])
        elif config["tiny"]:
            self.processor = tiny_processor(config["image_size"])
            self.backbone = Qwen2_5_VLModel(tiny_backbone_config(self.processor.tokenizer, config["tiny_layers"],
                                                                 config["tiny_hidden"]))
        else:
            raise SpatialScoreError("model: qwen2_5_vl needs `pretrained` (a local directory) or `tiny: true`")
        tokenizer = self.processor.tokenizer
        if REWARD not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [REWARD]})
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        torch.manual_seed(config["seed"])  # the adapter and head start the same whichever way the backbone came
        self.backbone.requires_grad_(False)
        lora = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                          target_modules=list(config["lora_target_modules"]))
        inject_adapter_in_model(lora, self.backbone.language_model)
        if config["train_backbone"]:  # after the injection, which leaves only the adapters trainable
            self.backbone.requires_grad_(True)
        table = self.backbone.get_input_embeddings().weight
        self.reward_embedding = torch.nn.Parameter(table.detach().mean(0).clone())
        self.head = GaussianHead(table.shape[1], config["head_hidden"])
        self.trained_names = {name for name, p in self.named_parameters() if p.requires_grad}
        self.set_pruning(config["prune_layer"], config["prune_keep"])
        self.kept_vision_tokens: list[int] = []  # vision tokens per row entering each language layer, last forward

    def set_pruning(self, layer: int | None, keep: float = 1.0) -> None:
        """Vision-token pruning from language layer `layer` on, keeping the share `keep` (None: no pruning)."""
        layers = len(self.backbone.language_model.layers)
        if layer is not None and not (isinstance(layer, int) and 0 <= layer < layers):
            raise SpatialScoreError(f"model.prune_layer: must be a language-layer index in [0, {layers}) or null, "
                                    f"got {layer!r}")
        if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
            raise SpatialScoreError(f"model.prune_keep: must be a share in (0, 1], got {keep!r}")
        types = set(getattr(self.backbone.language_model.config, "layer_types", None) or ["full_attention"])
        if layer is not None and types != {"full_attention"}:
            raise SpatialScoreError(f"model.prune_layer: pruning needs full-attention layers only, got {sorted(types)}")
        self.config["prune_layer"], self.config["prune_keep"] = layer, float(keep)

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k in self.trained_names}

    def encode(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = images.detach().float().clamp(0, 1)
        if self._patchify_here(size):
            return self._encode_in_torch(images, prompts)
        texts = [f"{VISION_START}{IMAGE_PAD}{VISION_END}{prompt}{REWARD}" for prompt in prompts]
        batch = self.processor(images=list(images.cpu()), text=texts, padding=True,
                               return_tensors="pt", images_kwargs={"do_rescale": False})
        return {k: v.to(images.device) for k, v in batch.items()}

    def _patchify_here(self, size: int) -> bool:
        """Whether the image processor would keep a `size` x `size` image as it is (then its normalisation and
        patch layout are done here in torch, ~10x faster than its per-image numpy path at 448 px)."""
        processor = self.processor.image_processor
        factor = processor.patch_size * processor.merge_size
        pixels = size * size
        low, high = processor.size.shortest_edge, processor.size.longest_edge
        return (size % factor == 0 and (low is None or low <= pixels) and (high is None or pixels <= high)
                and processor.do_normalize)

    def _encode_in_torch(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's output for images already at its size: CLIP-normalised pixels in Qwen2-VL's patch
        order (merge blocks of patches, each patch repeated over the temporal axis) and the text with one
        <|image_pad|> per merged patch (the equality with the processor is a test)."""
        processor = self.processor.image_processor
        patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
        b, c, h, w = images.shape
        mean = torch.tensor(processor.image_mean, dtype=images.dtype, device=images.device).view(1, c, 1, 1)
        std = torch.tensor(processor.image_std, dtype=images.dtype, device=images.device).view(1, c, 1, 1)
        x = ((images - mean) / std).reshape(b, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (b, gh, gw, mh, mw, c, ph, pw)
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], temporal, patch, patch)
        pixels = x.reshape(b * (h // patch) * (w // patch), c * temporal * patch * patch)
        grid = torch.tensor([[1, h // patch, w // patch]] * b, dtype=torch.long, device=images.device)
        tokens = (h // patch) * (w // patch) // merge ** 2
        texts = [f"{VISION_START}{IMAGE_PAD * tokens}{VISION_END}{prompt}{REWARD}" for prompt in prompts]
        text = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        ids = text["input_ids"].to(images.device)
        return {"input_ids": ids, "attention_mask": text["attention_mask"].to(images.device),
                "mm_token_type_ids": (ids == self.backbone.config.image_token_id).long(),
                "pixel_values": pixels.contiguous(), "image_grid_thw": grid}

    def forward(self, images: torch.Tensor, prompts: list[str], targets: dict | None = None):
        batch = self.encode(images, prompts)
        ids = batch["input_ids"]
        is_reward = ids == self.reward_token_id
        if not bool(is_reward.any(1).all()):
            raise SpatialScoreError("qwen2_5_vl: a prompt lost its <reward> token (truncated?)")
        embeds = self.backbone.get_input_embeddings()(ids.masked_fill(is_reward, self.pad_token_id))
        embeds = torch.where(is_reward[..., None], self.reward_embedding.to(embeds.dtype), embeds)
        if self.config["prune_layer"] is None:
            hidden = self.backbone(input_ids=ids, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"].to(embeds.dtype),
                                   image_grid_thw=batch["image_grid_thw"],
                                   mm_token_type_ids=batch["mm_token_type_ids"]).last_hidden_state
            self.kept_vision_tokens = []
        else:
            hidden, index = self._pruned_forward(ids, embeds, batch)
            is_reward = is_reward.gather(1, index)
        # The last <reward> in each row, wherever padding put it.
        positions = torch.arange(is_reward.shape[1], device=ids.device)
        at = torch.where(is_reward, positions, -1).argmax(1)
        return self.head(hidden[torch.arange(ids.shape[0], device=ids.device), at].float())

    def _pruned_forward(self, ids: torch.Tensor, embeds: torch.Tensor,
                        batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's forward with the language model's layers run here, so that vision tokens can leave the
        sequence part-way: (last hidden state [B, S'], the kept positions [B, S'] in the input sequence)."""
        backbone = self.backbone
        grid = batch["image_grid_thw"]
        features = backbone.get_image_features(batch["pixel_values"].to(embeds.dtype), grid, return_dict=True)
        vision = ids == backbone.config.image_token_id
        embeds = embeds.masked_scatter(vision[..., None], torch.cat(features.pooler_output).to(embeds.dtype))
        positions = backbone.compute_3d_position_ids(
            input_ids=ids, image_grid_thw=grid, video_grid_thw=None, inputs_embeds=embeds,
            attention_mask=batch["attention_mask"], past_key_values=None, mm_token_type_ids=batch["mm_token_type_ids"])
        hidden, index, self.kept_vision_tokens = pruned_language_forward(
            backbone.language_model, embeds, batch["attention_mask"], positions, vision, self.config["prune_layer"],
            self.config["prune_keep"])
        return hidden, index


@register_arch("qwen2_5_vl")
def build(config: dict) -> QwenRewardModel:
    return QwenRewardModel(config)
