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


import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLModel
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from spatialscore.errors import SpatialScoreError
from spatialscore.io import local_model_dir
from spatialscore.models.base import GaussianHead, RewardModel, register_arch

DEFAULTS = {"pretrained": None, "tiny": False, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "head_hidden": 128, "image_size": 448,
            "seed": 0}
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


def tiny_backbone_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                       "out_hidden_size": 128, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": 2, "window_size": 4 * PATCH * MERGE, "fullatt_block_indexes": [0]},
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": None, "max_position_embeddings": 2048,
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
            self.backbone = Qwen2_5_VLModel(tiny_backbone_config(self.processor.tokenizer))
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
        table = self.backbone.get_input_embeddings().weight
        self.reward_embedding = torch.nn.Parameter(table.detach().mean(0).clone())
        self.head = GaussianHead(table.shape[1], config["head_hidden"])
        self.trained_names = {name for name, p in self.named_parameters() if p.requires_grad}

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k in self.trained_names}

    def encode(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        texts = [f"{VISION_START}{IMAGE_PAD}{VISION_END}{prompt}{REWARD}" for prompt in prompts]
        batch = self.processor(images=list(images.detach().float().cpu().clamp(0, 1)), text=texts, padding=True,
                               return_tensors="pt", images_kwargs={"do_rescale": False})
        return {k: v.to(images.device) for k, v in batch.items()}

    def forward(self, images: torch.Tensor, prompts: list[str], targets: dict | None = None):
        batch = self.encode(images, prompts)
        ids = batch["input_ids"]
        is_reward = ids == self.reward_token_id
        if not bool(is_reward.any(1).all()):
            raise SpatialScoreError("qwen2_5_vl: a prompt lost its <reward> token (truncated?)")
        embeds = self.backbone.get_input_embeddings()(ids.masked_fill(is_reward, self.pad_token_id))
        embeds = torch.where(is_reward[..., None], self.reward_embedding.to(embeds.dtype), embeds)
        hidden = self.backbone(input_ids=ids, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"].to(embeds.dtype),
                               image_grid_thw=batch["image_grid_thw"],
                               mm_token_type_ids=batch["mm_token_type_ids"]).last_hidden_state
        # The last <reward> in each row, wherever padding put it.
        positions = torch.arange(ids.shape[1], device=ids.device)
        at = torch.where(is_reward, positions, -1).argmax(1)
        return self.head(hidden[torch.arange(ids.shape[0], device=ids.device), at].float())


@register_arch("qwen2_5_vl")
def build(config: dict) -> QwenRewardModel:
    return QwenRewardModel(config)
