"""Typed configuration: dataclasses + OmegaConf, precedence defaults < recipe YAML < `key=value` overrides.

Every recipe YAML names its `kind`, which picks the dataclass that validates it. Unknown keys and wrong types are
errors that name the file or override, the key, and the closest valid key. `save_config` writes the resolved
config next to a run's outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from spatialscore.errors import SpatialScoreError
from spatialscore.io import atomic_write_text

T = TypeVar("T")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*=.*$", re.S)


def project_path(path: str) -> str:
    """A recipe's relative path as given when it exists from here, else from the project root (recipes name the
    shipped models as `data/...`, and runs may start elsewhere)."""
    if Path(path).exists() or Path(path).is_absolute():
        return path
    shipped = RECIPES_DIR.parent / path
    return str(shipped) if shipped.exists() else path


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise SpatialScoreError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class PairsConfig:
    """Shapes-world preference pairs (`spatialscore data make-pairs`)."""

    kind: str = "pairs"
    n: int = 1000
    seed: int = 0
    style: str = "mixed"  # short | long | text | mixed
    phrasing: str = "train"  # train | heldout | all: which template set words the prompts
    image_size: int = 128
    multi_prob: float = 0.5  # share of pairs with 2-3 perturbations instead of one
    rough: float = 0.0  # share of pairs drawn by the rough, generator-like renderer (data/augment.py)
    workers: int = 0  # 0: one per core

    def __post_init__(self):
        from spatialscore.data.prompts import PHRASINGS, STYLES

        _one_of("style", self.style, STYLES)
        _one_of("phrasing", self.phrasing, PHRASINGS)
        if self.n < 1 or self.image_size < 16 or not 0 <= self.multi_prob <= 1 or self.workers < 0:
            raise SpatialScoreError("pairs config: need n >= 1, image_size >= 16, 0 <= multi_prob <= 1, workers >= 0")
        _check_share("rough", self.rough)


@dataclass
class PromptsConfig:
    """Shapes-world prompt metadata (`spatialscore data make-prompts`)."""

    kind: str = "prompts"
    n: int = 500
    seed: int = 0
    style: str = "mixed"
    phrasing: str = "train"

    def __post_init__(self):
        from spatialscore.data.prompts import PHRASINGS, STYLES

        _one_of("style", self.style, STYLES)
        _one_of("phrasing", self.phrasing, PHRASINGS)
        if self.n < 1:
            raise SpatialScoreError(f"prompts config: n must be at least 1, got {self.n}")


@dataclass
class ModelConfig:
    """One block for every architecture; each reads the keys it needs (see spatialscore/models/)."""

    arch: str = "relation"  # relation | clip_dual | qwen2_5_vl
    image_size: int = 128
    channels: int = 64
    grid: int = 8  # relation: cells per side of the feature grid
    objects: int = 8  # relation: the most object-like cells that enter the pairwise relation module
    text_dim: int = 128
    g_dim: int = 128
    f_dim: int = 128
    seed: int = 0
    pretrained: str | None = None  # qwen2_5_vl: a local from_pretrained directory
    tiny: bool = False  # qwen2_5_vl: a tiny model built from a config in code (tests, CI)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    head_hidden: int = 128
    tiny_layers: int = 2  # qwen2_5_vl tiny: language layers
    tiny_hidden: int = 128  # qwen2_5_vl tiny: language width
    train_backbone: bool = False  # qwen2_5_vl: train every backbone weight too (a tiny backbone from scratch)
    prune_layer: int | None = None  # qwen2_5_vl: vision-token pruning from this language layer on (None: off)
    prune_keep: float = 1.0  # qwen2_5_vl: the share of vision tokens kept from prune_layer on
    init: str | None = None  # warm start: every saved weight of a trained reward model (run or checkpoint dir)


@dataclass
class RewardDataConfig:
    train: str | None = None  # a pairs file (JSONL / parquet / HF dir); None: generate shapes-world pairs in memory
    val: str | None = None
    n_train: int = 20000
    n_val: int = 1000
    seed: int = 0  # generated training pairs; validation uses val_seed, so it is held out
    val_seed: int = 1000
    style: str = "mixed"
    phrasing: str = "all"
    tag_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {position: 3, long: 3}
    rough: float = 0.0  # generated training pairs: share drawn rough, like a generator's images (data/augment.py)
    # pixels per side the pairs are drawn (or read) at; None: model.image_size. A model that resizes its input
    # itself (qwen2_5_vl) can read small drawings at a large processor size without holding large pixels
    image_size: int | None = None

    def __post_init__(self):
        _check_tags("data", self.style, self.phrasing, self.tag_weights)
        if self.image_size is not None and self.image_size < 16:
            raise SpatialScoreError(f"data.image_size must be >= 16 pixels or null, got {self.image_size}")
        _check_share("data.rough", self.rough)


@dataclass
class RewardTrainConfig:
    steps: int = 2000
    batch_size: int = 32  # per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    loss: str = "gaussian_bt"  # gaussian_bt | bt
    max_grad_norm: float = 1.0
    aux_weight: float = 1.0  # dense per-cell supervision from the scene graphs (relation backbone, generated data)
    eval_every: int = 500
    save_every: int = 500
    seed: int = 0

    def __post_init__(self):
        _one_of("train.loss", self.loss, ("gaussian_bt", "bt"))
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise SpatialScoreError("train: need steps >= 1, batch_size >= 1, and batch_size divisible by grad_accum")


@dataclass
class WandbConfig:
    """wandb logging, on with `report_to: wandb`. Offline by default: the run is written under <out>/wandb/ and sent
    later with `wandb sync`; `wandb.mode: online` logs live (network and WANDB_API_KEY needed). A resumed run continues
    the same wandb run."""

    mode: str = ""  # offline | online | disabled; empty: $WANDB_MODE if set, else offline
    project: str = "spatialscore"
    entity: str = ""  # your wandb team or user; empty: wandb's default
    name: str = ""  # empty: the run directory's name
    tags: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.mode not in ("", "offline", "online", "disabled"):
            raise SpatialScoreError(f"wandb.mode: {self.mode!r} is not one of offline, online, disabled (empty: "
                                    f"$WANDB_MODE if set, else offline)")


@dataclass
class RewardConfig:
    """SpatialScore reward-model training (`spatialscore train-reward`)."""

    kind: str = "reward"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: RewardDataConfig = dataclasses.field(default_factory=RewardDataConfig)
    train: RewardTrainConfig = dataclasses.field(default_factory=RewardTrainConfig)
    report_to: str = "none"  # none | wandb (see wandb:)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def __post_init__(self):
        _one_of("report_to", self.report_to, ("none", "wandb"))


def _check_share(field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise SpatialScoreError(f"{field} must be a share in [0, 1], got {value}")


def _check_tags(field: str, style: str, phrasing: str, tag_weights: dict[str, float]) -> None:
    from spatialscore.data.prompts import PHRASINGS, STYLES, TAGS

    _one_of(f"{field}.style", style, STYLES)
    _one_of(f"{field}.phrasing", phrasing, PHRASINGS)
    for tag, weight in tag_weights.items():
        _one_of(f"{field}.tag_weights", tag, TAGS)
        if weight < 0:
            raise SpatialScoreError(f"{field}.tag_weights.{tag}: weights must be >= 0, got {weight}")


@dataclass
class GeneratorModelConfig:
    """A shapes-world base generator built from diffusers parts (models/generators.py)."""

    arch: str = "shapes_flow"  # shapes_flow: SD3-style MMDiT + flow matching; shapes_unet: SD1.5-style UNet + DDPM
    image_size: int = 64
    patch_size: int = 8
    layers: int = 4
    heads: int = 6
    head_dim: int = 32
    text_dim: int = 64
    text_layers: int = 2
    text_embed_std: float = 0.0  # > 0: the text encoder's word embeddings drawn at this scale (1.0: words stay apart)
    text_encoder: str = "clip"  # shapes_flow: clip (causal attention) | t5 (bidirectional, SD3/FLUX's token states)
    shift: float = 1.0  # the flow-matching schedule's timestep shift (SD3: 3.0)
    prediction: str = "x"  # x: the transformer predicts the clean image (JiT); v: the velocity (SD3)
    latent_factor: int = 0  # 0: denoise pixels; 4: denoise the latents of an autoencoder trained first (SD-style)
    latent_channels: int = 8
    ae_width: int = 32  # the autoencoder's first-block channels
    unet_width: int = 64  # shapes_unet: the UNet's first-block channels (then 2x, 2x)
    unet_top_attention: bool = True  # shapes_unet: attention at the full latent resolution too (2x the step time)
    autoencoder: str | None = None  # reuse a trained autoencoder (an AutoencoderKL directory, e.g. a base's vae/)
    init: str | None = None  # warm start: every weight (denoiser, text encoder, autoencoder) from a saved base pipeline
    seed: int = 0

    def __post_init__(self):
        _one_of("model.arch", self.arch, ("shapes_flow", "shapes_unet"))
        if self.latent_factor < 0 or self.latent_channels < 1 or self.ae_width < 1:
            raise SpatialScoreError("model: need latent_factor >= 0, latent_channels >= 1, ae_width >= 1")
        _one_of("model.prediction", self.prediction, ("x", "v"))
        _one_of("model.text_encoder", self.text_encoder, ("clip", "t5"))
        if self.text_encoder != "clip" and self.arch != "shapes_flow":
            raise SpatialScoreError(f"model.text_encoder={self.text_encoder} needs model.arch=shapes_flow (SD1.5-style "
                                    f"UNets read CLIP), got {self.arch}")
        if self.text_embed_std < 0:
            raise SpatialScoreError(f"model.text_embed_std must be >= 0 (0: CLIP's own initialisation), got "
                                    f"{self.text_embed_std}")
        if self.init and self.autoencoder:
            raise SpatialScoreError("model.init already brings its pipeline's autoencoder: drop model.autoencoder")


@dataclass
class PromptSetConfig:
    """Shapes-world prompts drawn by tag (data/prompts.py); the held-out evaluation uses `eval_seed`."""

    n_train: int = 40000
    seed: int = 0
    style: str = "short"
    phrasing: str = "train"
    tag_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_n: int = 200
    eval_seed: int = 5000
    object_scale: float = 1.0  # train-generator: object sizes of the training scenes, relative to the world's
    # train-generator: "centred" frames each relation scene's items around the canvas centre (data/scene.py)
    composition: str = "free"

    def __post_init__(self):
        from spatialscore.data.scene import COMPOSITIONS

        _check_tags("data", self.style, self.phrasing, self.tag_weights)
        if not 0.5 <= self.object_scale <= 2.5:
            raise SpatialScoreError(f"data.object_scale must be in [0.5, 2.5], got {self.object_scale}")
        if self.composition not in COMPOSITIONS:
            raise SpatialScoreError(f"data.composition must be one of {list(COMPOSITIONS)}, got {self.composition!r}")


@dataclass
class GeneratorTrainConfig:
    steps: int = 20000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 500
    max_grad_norm: float = 1.0
    cond_dropout: float = 0.1  # share of captions replaced by "" so classifier-free guidance works
    ema_decay: float = 0.999  # the saved weights are the EMA
    loss_space: str = "v"  # v: velocity error (SD3, JiT); x: clean-image error, the same weight at every noise level
    ae_steps: int = 2000  # with model.latent_factor: autoencoder training steps, before the transformer's
    ae_lr: float = 2e-3
    ae_kl: float = 1e-6  # the KL weight of the autoencoder (SD's VAE uses ~1e-6)
    ae_foreground: float = 10.0  # reconstruction weight of object pixels relative to background ones
    # the denoiser's loss weight on the latent cells under (or within foreground_dilate cells of) an object,
    # relative to background cells (1 = unweighted): objects are a few percent of an image, their outlines less
    foreground_weight: float = 1.0
    foreground_dilate: int = 1
    # shapes_flow: weight of the scene-layout loss, a training-only head on one transformer block's tokens that
    # predicts each token's shape and colour classes (REPA-style representation guidance; 0 = off)
    layout_weight: float = 0.0
    layout_layer: int = -1  # the block whose output the layout head reads (-1: the middle one)
    layout_min_sigma: float = 0.0  # the layout loss only at noise levels >= this (0.6: where the text must tell shapes)
    # shapes_flow: weights of the shape and colour losses, a frozen per-pixel shape and colour classifier (fitted
    # first, shape_reader_steps) run on the denoiser's clean-image estimate at noise levels in
    # [shape_min_sigma, shape_max_sigma] (0 = off)
    shape_weight: float = 0.0
    colour_weight: float = 0.0
    shape_reader_steps: int = 600
    shape_min_sigma: float = 0.4
    shape_max_sigma: float = 0.9
    # steps of training the text encoder alone on the captions first (what each prompt asks for, from its tokens;
    # 0 = none): the text then tells shapes apart before the denoiser starts to read it
    text_pretrain_steps: int = 0
    text_lr_scale: float = 1.0  # the text encoder's learning rate relative to train.lr (0: it stays fixed)
    eval_every: int = 2000
    save_every: int = 1000  # checkpoints/step-N: weights, EMA, optimizer (resume with --resume)
    sample_steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        _one_of("train.loss_space", self.loss_space, ("v", "x"))
        if self.steps < 1 or self.batch_size < 1 or not 0 <= self.cond_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise SpatialScoreError("train: need steps >= 1, batch_size >= 1, 0 <= cond_dropout < 1, "
                                    "0 <= ema_decay < 1")
        if self.foreground_weight < 1 or self.foreground_dilate < 0:
            raise SpatialScoreError(f"train: need foreground_weight >= 1 and foreground_dilate >= 0, got "
                                    f"{self.foreground_weight} and {self.foreground_dilate}")
        if self.shape_weight < 0 or self.colour_weight < 0 or self.shape_reader_steps < 1:
            raise SpatialScoreError(f"train: need shape_weight >= 0, colour_weight >= 0 and shape_reader_steps >= 1, "
                                    f"got {self.shape_weight}, {self.colour_weight} and {self.shape_reader_steps}")
        if not 0 <= self.shape_min_sigma <= self.shape_max_sigma <= 1:
            raise SpatialScoreError(f"train: need 0 <= shape_min_sigma <= shape_max_sigma <= 1, got "
                                    f"{self.shape_min_sigma} and {self.shape_max_sigma}")
        if self.layout_weight < 0:
            raise SpatialScoreError(f"train.layout_weight must be >= 0, got {self.layout_weight}")
        if not 0 <= self.layout_min_sigma < 1:
            raise SpatialScoreError(f"train.layout_min_sigma must be in [0, 1), got {self.layout_min_sigma}")
        if self.text_pretrain_steps < 0 or self.text_lr_scale < 0:
            raise SpatialScoreError("train: need text_pretrain_steps >= 0 and text_lr_scale >= 0")


@dataclass
class GeneratorConfig:
    """A shapes-world base generator trained from scratch (`spatialscore train-generator`)."""

    kind: str = "generator"
    model: GeneratorModelConfig = dataclasses.field(default_factory=GeneratorModelConfig)
    data: PromptSetConfig = dataclasses.field(default_factory=PromptSetConfig)
    train: GeneratorTrainConfig = dataclasses.field(default_factory=GeneratorTrainConfig)
    report_to: str = "none"

    def __post_init__(self):
        _one_of("report_to", self.report_to, ("none", "wandb"))
        if self.train.layout_weight and self.model.arch != "shapes_flow":
            raise SpatialScoreError(f"train.layout_weight: the layout head reads transformer blocks (model.arch "
                                    f"shapes_flow), not model.arch {self.model.arch}")
        if (self.train.shape_weight or self.train.colour_weight) and self.model.arch != "shapes_flow":
            raise SpatialScoreError(f"train.shape_weight / colour_weight: the reader's losses read a flow denoiser's "
                                    f"clean-image estimate (model.arch shapes_flow), not model.arch {self.model.arch}")


@dataclass
class PolicyModelConfig:
    """The generator RL fine-tunes: a local diffusers pipeline directory (the shapes base, SD3, FLUX, SD1.5) or a
    tiny random one of a named architecture (`tiny: sd3`), for tests."""

    pipeline: str | None = None
    tiny: str | None = None  # shapes_flow | shapes_latent | sd3 | flux | sd15: a tiny random pipeline built in code
    image_size: int = 0  # 0: the pipeline's default
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"])
    # only the blocks with these indices of lora_layers_pattern get the LoRA (peft's layers_to_transform; None:
    # every block), e.g. FLUX's double-stream blocks without its single-stream ones
    lora_layers: list[int] | None = None
    lora_layers_pattern: str = "transformer_blocks"  # the module list lora_layers indexes (SD1.5: e.g. up_blocks)
    precision: str = "fp32"  # fp32 | bf16 (the frozen weights; LoRA trains in fp32)

    def __post_init__(self):
        if self.tiny is not None:
            _one_of("model.tiny", self.tiny, ("shapes_flow", "shapes_latent", "sd3", "flux", "sd15"))
        _one_of("model.precision", self.precision, ("fp32", "bf16"))
        if self.lora_r < 1:
            raise SpatialScoreError(f"model.lora_r must be >= 1, got {self.lora_r}")
        if self.lora_layers is not None and (not self.lora_layers or min(self.lora_layers) < 0):
            raise SpatialScoreError(f"model.lora_layers: need a non-empty list of block indices >= 0 (or null for "
                                    f"every block), got {list(self.lora_layers)}")

    def check_source(self) -> None:
        """Exactly one of a pipeline directory and a tiny architecture (checked by the enclosing config, since the
        defaults have neither)."""
        if (self.pipeline is None) == (self.tiny is None):
            raise SpatialScoreError("model: give exactly one of model.pipeline (a local diffusers pipeline directory) "
                                    "and model.tiny (shapes_flow | shapes_latent | sd3 | flux | sd15)")


@dataclass
class RLRewardConfig:
    """Registered reward heads, summed with weights (one head: used as is; several: a normalised composite)."""

    heads: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {spatialscore: 1.0, counting: 0.5}
    kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per head, e.g. {spatialscore: {checkpoint: runs/reward}}
    # http://HOST:PORT of a `spatialscore serve` hosting these heads (kwargs then belong to the server); empty: in-process
    remote: str = ""
    token_file: str | None = None  # the server's bearer token (or set SPATIALSCORE_REWARD_TOKEN)

    def __post_init__(self):
        if self.remote:
            from spatialscore.serve.client import check_url

            check_url(self.remote, "reward.remote")


@dataclass
class RLPromptsConfig:
    """Training prompts: a prompt file (JSONL of GenEval-style records or plain text lines), or shapes-world prompts
    drawn fresh every iteration. Evaluation prompts come from `eval_file` or `eval_seed`; prompts seen in
    evaluation are never trained on."""

    file: str | None = None
    style: str = "short"
    phrasing: str = "train"
    tag_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_file: str | None = None
    eval_n: int = 200
    eval_seed: int = 777
    eval_tag_weights: dict[str, float] | None = None  # None: as tag_weights

    def __post_init__(self):
        _check_tags("prompts", self.style, self.phrasing, self.tag_weights)
        _check_tags("prompts", self.style, self.phrasing, self.eval_tag_weights or {})


@dataclass
class GrpoSampleConfig:
    steps: int = 10  # denoising steps per image
    noise_level: float = 0.7  # flow-matching pipelines: the SDE's a (Flow-GRPO); 0 would be the deterministic ODE
    eta: float = 1.0  # DDIM pipelines (DDPO): the share of the DDPM posterior's noise; 0 would be deterministic
    guidance_scale: float = 1.0  # classifier-free guidance (> 1 doubles the batch)
    group_size: int = 8  # G images per prompt
    prompts_per_iter: int = 8  # over all processes
    batch_size: int = 32  # images per sampling forward, per process
    eval_steps: int = 20  # ODE steps of the evaluation samples
    # the G images of a group start from one initial latent (Flow-GRPO's same_latent): the group's rewards then
    # differ only through the step noise that the log-probabilities credit
    same_initial_noise: bool = False
    # only these step indices are stochastic (the SDE; 0 = the noisiest), the others deterministic ODE steps
    # (Flow-GRPO-Fast / MixGRPO): the group's rewards then differ only through the noise of the steps that are
    # trained, not through later steps' noise that no trained log-probability accounts for. None: every step
    sde_steps: list[int] | None = None

    def __post_init__(self):
        for t in self.sde_steps or []:
            if not 0 <= t < self.steps:
                raise SpatialScoreError(f"sample.sde_steps: {t} is not a step index in [0, {self.steps})")
        if self.sde_steps is not None and not self.sde_steps:
            raise SpatialScoreError("sample.sde_steps: name at least one stochastic step (or leave it unset: all)")
        if self.steps < 1 or self.group_size < 1 or self.prompts_per_iter < 1 or self.noise_level < 0 or self.eta < 0:
            raise SpatialScoreError("sample: need steps >= 1, group_size >= 1, prompts_per_iter >= 1, "
                                    "noise_level >= 0, eta >= 0")


@dataclass
class GrpoTrainConfig:
    iterations: int = 100
    lr: float = 3e-4
    weight_decay: float = 0.0
    clip_range: float = 1e-4  # PPO's c on the importance ratio
    kl_beta: float = 0.01  # KL to the reference (the base with LoRA disabled); 0 skips the reference forward
    top_k: int = 0  # keep the k best and k worst of each group (0: every sample)
    timestep_fraction: float = 1.0  # share of the denoising steps trained each iteration
    timesteps: list[int] | None = None  # or exactly these step indices (0 = the noisiest)
    inner_epochs: int = 1
    micro_batch: int = 16  # samples per forward in the update, per process
    adv_clip: float = 5.0
    max_grad_norm: float = 1.0
    max_bad_steps: int = 3  # consecutive non-finite losses or gradients before the run stops
    eval_every: int = 10
    save_every: int = 10
    save_merged: bool = True  # final/pipeline: the base with LoRA merged (small models); final/lora always
    log_train_oracle: bool = True  # log the oracle's pass rate on the training samples (shapes-world prompts)
    hacking_tolerance: float = 0.05  # oracle drop (vs. the base) that, with a rising reward, flags reward hacking
    per_prompt: bool = True  # DDPO: standardise by each prompt's own reward history
    buffer_size: int = 32  # DDPO: rewards kept per prompt
    min_count: int = 16  # DDPO: below this many, the batch's statistics stand in
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1 or self.inner_epochs < 1 or self.micro_batch < 1 or self.top_k < 0:
            raise SpatialScoreError("train: need iterations >= 1, inner_epochs >= 1, micro_batch >= 1, top_k >= 0")
        if not 0 < self.timestep_fraction <= 1:
            raise SpatialScoreError(f"train.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")


@dataclass
class GrpoConfig:
    """Flow-GRPO on a flow-matching pipeline (`spatialscore train-grpo`)."""

    kind: str = "grpo"
    model: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    reward: RLRewardConfig = dataclasses.field(default_factory=RLRewardConfig)
    prompts: RLPromptsConfig = dataclasses.field(default_factory=RLPromptsConfig)
    sample: GrpoSampleConfig = dataclasses.field(default_factory=GrpoSampleConfig)
    train: GrpoTrainConfig = dataclasses.field(default_factory=GrpoTrainConfig)
    report_to: str = "none"  # none | wandb (see wandb:)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def __post_init__(self):
        _one_of("report_to", self.report_to, ("none", "wandb"))
        if not self.reward.heads:
            raise SpatialScoreError("reward.heads: name at least one reward head with its weight, e.g. "
                                    "reward.heads={oracle: 1.0} (see `spatialscore heads ls`)")
        self.model.check_source()
        if self.train.top_k and 2 * self.train.top_k > self.sample.group_size:
            raise SpatialScoreError(f"train.top_k={self.train.top_k}: keeping the k best and k worst needs "
                                    f"2k <= sample.group_size ({self.sample.group_size})")
        for t in self.train.timesteps or []:
            if not 0 <= t < self.sample.steps:
                raise SpatialScoreError(f"train.timesteps: {t} is not a step index in [0, {self.sample.steps})")
        if self.sample.sde_steps is not None:
            if self.train.timesteps is None:
                raise SpatialScoreError("sample.sde_steps: also set train.timesteps (a subset of them); a "
                                        "deterministic step has no log-probability to train")
            if off := sorted(set(self.train.timesteps) - set(self.sample.sde_steps)):
                raise SpatialScoreError(f"train.timesteps: {off} are deterministic steps (not in sample.sde_steps "
                                        f"{self.sample.sde_steps}); only stochastic steps have a log-probability")


@dataclass
class DdpoConfig(GrpoConfig):
    """DDPO on a DDIM UNet pipeline (`spatialscore train-ddpo`): the same sections as Flow-GRPO's, with DDPO's
    defaults (eta 1, guidance 5, no KL, no top-k, per-prompt reward statistics)."""

    kind: str = "ddpo"
    sample: GrpoSampleConfig = dataclasses.field(
        default_factory=lambda: GrpoSampleConfig(steps=20, eta=1.0, guidance_scale=5.0, group_size=8))
    train: GrpoTrainConfig = dataclasses.field(default_factory=lambda: GrpoTrainConfig(kl_beta=0.0, top_k=0))

    def __post_init__(self):
        super().__post_init__()
        if self.train.top_k:
            raise SpatialScoreError("train.top_k: DDPO trains on every sample (top-k filtering is Flow-GRPO's)")


@dataclass
class DpoDataConfig:
    """Preference pairs: a pairs file (JSONL / parquet / HF directory / Pick-a-Pic table), or shapes-world pairs
    generated at the generator's image size."""

    train: str | None = None
    n_train: int = 4000
    seed: int = 0
    style: str = "short"
    phrasing: str = "train"
    tag_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    object_scale: float = 1.0  # generated pairs: objects' sizes times this (the base's own data.object_scale)

    def __post_init__(self):
        _check_tags("data", self.style, self.phrasing, self.tag_weights)
        if not 0.5 <= self.object_scale <= 2.5:
            raise SpatialScoreError(f"data.object_scale must be in [0.5, 2.5], got {self.object_scale}")


@dataclass
class DpoTrainConfig:
    steps: int = 500
    batch_size: int = 16  # pairs per optimizer step, over all processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta: float = 500.0  # Diffusion-DPO's beta (the paper: 2500 for SD1.5); larger keeps closer to the reference
    # training times u ~ logit-normal moved by SD3's shift, u' = shift u / (1 + (shift - 1) u): the shift the base
    # was pretrained with (the shapes flow base: 3) weighs the high-noise steps where layouts are decided
    time_shift: float = 1.0
    max_grad_norm: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    save_merged: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.beta <= 0 or self.time_shift <= 0:
            raise SpatialScoreError("train: need steps >= 1, batch_size >= 1, beta > 0, time_shift > 0")


@dataclass
class DpoConfig:
    """Diffusion-DPO (`spatialscore train-dpo`): offline preference optimisation of a UNet or flow-matching
    pipeline's LoRA; the reference is the pipeline with the LoRA disabled."""

    kind: str = "dpo"
    model: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    data: DpoDataConfig = dataclasses.field(default_factory=DpoDataConfig)
    train: DpoTrainConfig = dataclasses.field(default_factory=DpoTrainConfig)
    prompts: RLPromptsConfig = dataclasses.field(default_factory=RLPromptsConfig)  # the held-out evaluation set
    sample: GrpoSampleConfig = dataclasses.field(default_factory=GrpoSampleConfig)  # eval_steps, guidance, batch
    reward: RLRewardConfig = dataclasses.field(default_factory=lambda: RLRewardConfig(heads={"oracle": 1.0}))
    report_to: str = "none"  # none | wandb (see wandb:)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def __post_init__(self):
        _one_of("report_to", self.report_to, ("none", "wandb"))
        self.model.check_source()


KINDS: dict[str, type] = {"pairs": PairsConfig, "prompts": PromptsConfig, "reward": RewardConfig,
                          "generator": GeneratorConfig, "grpo": GrpoConfig, "ddpo": DdpoConfig,
                          "dpo": DpoConfig}


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(schema: type, dotted: str) -> list[str]:
    """Valid keys at the level of `dotted` ("model.lr" -> the fields of the `model` dataclass)."""
    cls = schema
    for part in dotted.split(".")[:-1]:
        sub = typing.get_type_hints(cls).get(part)
        if sub is None or not dataclasses.is_dataclass(sub):
            break
        cls = sub
    return [f.name for f in dataclasses.fields(cls)]


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> SpatialScoreError:
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "?")
    if isinstance(err, ConfigKeyError) or "not in" in str(err).lower():
        return SpatialScoreError(f"{source}: unknown key {key!r}{_did_you_mean(key.split('.')[-1], _fields_at(schema, key))}; "
                                 f"valid keys: {', '.join(_fields_at(schema, key))}")
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return SpatialScoreError(f"{source}: bad value for {key!r}: {first}")
    return SpatialScoreError(f"{source}: {str(err).splitlines()[0]}")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpatialScoreError(f"{path}: no such recipe file (see `spatialscore recipes ls`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SpatialScoreError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise SpatialScoreError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def schema_for(path: str | Path) -> type:
    kind = read_yaml(path).get("kind")
    if kind not in KINDS:
        raise SpatialScoreError(f"{path}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    return KINDS[kind]


def parse_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise SpatialScoreError(f"bad override {item!r}: expected key=value (for example seed=3 or model.lr=1e-4)")
    return overrides


def load_config(schema: type[T], recipe: str | Path | None = None, overrides: list[str] = ()) -> T:
    """defaults < recipe YAML < overrides, validated against `schema`."""
    cfg = OmegaConf.structured(schema)
    if recipe is not None:
        data = read_yaml(recipe)
        expected = cfg.kind
        if data.get("kind", expected) != expected:
            raise SpatialScoreError(f"{recipe}: field 'kind' is {data['kind']!r}, but this command takes a "
                                    f"{expected!r} recipe")
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, str(recipe)) from None
    for item in parse_overrides(list(overrides)):
        try:
            override = OmegaConf.from_dotlist([item])
            key = item.split("=", 1)[0]
            value = OmegaConf.select(override, key)
            if OmegaConf.is_dict(value) and OmegaConf.select(cfg, key) is not None:
                # `reward.heads={oracle: 1.0}` means these heads, not these added to the recipe's
                OmegaConf.update(cfg, key, value, merge=False)
                continue
            cfg = OmegaConf.merge(cfg, override)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, f"override {item!r}") from None
    if cfg.kind != OmegaConf.structured(schema).kind:
        raise SpatialScoreError(f"field 'kind' cannot be changed to {cfg.kind!r}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, str(recipe or "config")) from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, to_yaml(cfg))
    return path


def list_recipes() -> list[tuple[str, str, str]]:
    """(name, kind, description) of every shipped recipe; description = the first comment line."""
    rows = []
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        text = path.read_text()
        first = next((l[1:].strip() for l in text.splitlines() if l.startswith("#")), "")
        kind = (yaml.safe_load(text) or {}).get("kind", "?")
        rows.append((str(path.relative_to(RECIPES_DIR).with_suffix("")), kind, first))
    return rows


def find_recipe(name: str) -> Path:
    """A recipe by path, or by its name under recipes/ ("shapes/pairs")."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = [r[0] for r in list_recipes()]
    raise SpatialScoreError(f"no recipe {name!r}{_did_you_mean(name, names)}; shipped: {', '.join(names)}")


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    src, dest = find_recipe(name), Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise SpatialScoreError(f"{dest} already exists (pass --force to overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest

