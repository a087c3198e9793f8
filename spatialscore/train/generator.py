"""Train a shapes-world base generator from scratch (`spatialscore train-generator`) on faithful renders of
shapes-world captions, with its text encoder trained alongside.

A latent base (`model.latent_factor`) first trains its autoencoder (`train_autoencoder`). The denoiser then learns
either flow matching (`shapes_flow`: x_sigma = (1 - sigma) x0 + sigma noise, sigma logit-normal and shifted by
`model.shift` as SD3 does, regressing the velocity noise - x0) or DDPM (`shapes_unet`: the noise at a uniform
timestep, SD1.5's objective). Captions are dropped to "" with probability `cond_dropout` so classifier-free guidance
works, and the saved weights are an exponential moving average. Every `eval_every` steps the EMA pipeline samples the
held-out prompt set (`data.eval_seed`), the oracle judges it, `prompt_gain` measures how much the denoiser uses its
text, and a grid of samples is written: the training log doubles as the model card's evidence. The result is an
ordinary diffusers pipeline directory, `final/`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from spatialscore.config import GeneratorConfig, save_config
from spatialscore.errors import SpatialScoreError
from spatialscore.models.generators import MIN_SIGMA, ShapesFlowPipeline, latent_shape, rebuilt
from spatialscore.io import atomic_write_text


def build_pipeline(cfg: GeneratorConfig):
    from spatialscore.models.generators import shapes_flow_pipeline, shapes_unet_pipeline

    m = cfg.model
    if m.arch == "shapes_unet":
        return shapes_unet_pipeline(image_size=m.image_size, latent_factor=m.latent_factor,
                                    latent_channels=m.latent_channels, ae_width=m.ae_width, unet_width=m.unet_width,
                                    text_dim=m.text_dim, text_layers=m.text_layers, seed=m.seed,
                                    top_attention=m.unet_top_attention, text_embed_std=m.text_embed_std)
    return shapes_flow_pipeline(image_size=m.image_size, patch_size=m.patch_size, layers=m.layers, heads=m.heads,
                                head_dim=m.head_dim, text_dim=m.text_dim, text_layers=m.text_layers, shift=m.shift,
                                prediction=m.prediction, seed=m.seed, latent_factor=m.latent_factor,
                                latent_channels=m.latent_channels, ae_width=m.ae_width, text_embed_std=m.text_embed_std,
                                text_encoder=m.text_encoder)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div(255)


def train_autoencoder(vae, images: torch.Tensor, cfg: GeneratorConfig, progress: bool = True,
                      centre: bool = True) -> dict:
    """Stage 1 of a latent generator: fit the autoencoder to the training renders (L1 + L2 reconstruction weighted
    towards the objects, a small KL), then normalise its latents (`_normalise`). Each batch depends only on
    (seed, step)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.train.ae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.train.ae_steps), desc="autoencoder", unit="step", disable=not progress)
    losses = []
    for step in bar:
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 777_777 + step)
        x = _pixels(images[torch.randint(len(images), (cfg.train.batch_size,), generator=generator)]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        weight = _foreground_weight(x, cfg.train.ae_foreground)
        error = recon - x
        loss = ((weight * (error.abs() + error.square())).mean() / weight.mean()
                + cfg.train.ae_kl * posterior.kl().mean())
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.ae_lr * min(1.0, (step + 1) / 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = _pixels(images[:512]) * 2 - 1
        latents = torch.cat([vae.encode(sample[i:i + 128]).latent_dist.mode() for i in range(0, len(sample), 128)])
    _normalise(vae, latents, centre)
    return {"ae_loss": sum(losses[-100:]) / len(losses[-100:])}


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, H, W]: the pixels of images x [B, 3, H, W] in [0, 1] that differ from the image's background (the
    median colour of its border) by more than faint anti-aliasing."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return (x - background).abs().amax(1, keepdim=True) > 0.05


def _foreground_weight(x: torch.Tensor, foreground: float) -> torch.Tensor:
    """[B, 1, H, W]: `foreground` on object pixels (`_foreground`), 1 elsewhere. Objects cover a few percent of a
    shapes-world image; unweighted, the reconstruction loss is mostly background and the autoencoder learns objects
    (their colours above all) many times slower."""
    return 1 + (foreground - 1) * _foreground(x).float()


@torch.no_grad()
def encode_dataset(pipe, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Every training image as what the denoiser sees (pixels in [-1, 1], or normalised latents), encoded as the
    policy view encodes images for RL."""
    from spatialscore.models.generators import policy_for

    encode = policy_for(pipe, 1.0).encode_images
    return torch.cat([encode(_pixels(images[i:i + batch])) for i in range(0, len(images), batch)])


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if isinstance(pipe, ShapesFlowPipeline) else pipe.unet


def _ema_pipeline(pipe, ema: torch.nn.ModuleList):
    """The same pipeline with the EMA denoiser and text encoder (sharing the frozen autoencoder and tokenizer)."""
    return rebuilt(pipe, text_encoder=ema[1], scheduler=copy.deepcopy(pipe.scheduler),
                   **{"transformer" if isinstance(pipe, ShapesFlowPipeline) else "unet": ema[0]})


def _denoising(pipe, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor,
               prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output, regression target) for clean x0 noised to `level` [B]. Flow matching (ShapesFlowPipeline):
    level is sigma, x = (1 - sigma) x0 + sigma noise, target the velocity noise - x0. DDPM (StableDiffusionPipeline):
    level is an integer timestep, x = sqrt(a_t) x0 + sqrt(1 - a_t) noise, target the noise. Gradients reach the text
    encoder through the pipeline's own prompt encoding."""
    xt = _noised(pipe, x0, noise, level)
    if isinstance(pipe, ShapesFlowPipeline):
        embeds, pooled = pipe.encode_prompt(prompts)
        return pipe.predict(xt, level, embeds, pooled).float(), noise - x0
    embeds = pipe.encode_prompt(prompts, x0.device, 1, False)[0]
    return pipe.unet(xt, level, encoder_hidden_states=embeds).sample.float(), noise


def _noised(pipe, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """x0 noised to `level` [B] as `_denoising` describes."""
    if isinstance(pipe, ShapesFlowPipeline):
        s = level.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise
    a = pipe.scheduler.alphas_cumprod.float()[level].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


class LayoutHead(torch.nn.Module):
    """Training-only: reads the image tokens one transformer block outputs and predicts, per token, the share of
    each shape class and each colour class under it (render.render_labels, pooled to the token grid). Its loss
    (train.layout_weight) makes the denoiser's features carry which object is where, and of which shape, from high
    noise on, where the pixel loss alone hardly rewards drawing the named shape (REPA, Yu et al. 2025, aligns such
    features with a pretrained encoder; the shapes world knows the exact layout instead). Never saved with the
    pipeline."""

    def __init__(self, dim: int, shape_classes: int, colour_classes: int):
        super().__init__()
        self.split = shape_classes
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.SiLU(),
                                       torch.nn.Linear(dim, shape_classes + colour_classes))
        self.tokens: torch.Tensor | None = None

    def attach(self, block: torch.nn.Module):
        """Keep `block`'s image-token output ([B, T, dim]) of every forward pass for the next loss."""
        def keep(_module, _inputs, output):
            self.tokens = output[1] if isinstance(output, tuple) else output
        return block.register_forward_hook(keep)

    def loss(self, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Soft cross-entropy against targets [B, T, shape_classes + colour_classes] (two distributions per token),
        over the captions that were not dropped (`keep` [B])."""
        logits = self.net(self.tokens.float())
        self.tokens = None
        loss = 0.0
        for part in (slice(0, self.split), slice(self.split, None)):
            loss = loss - (targets[..., part] * torch.log_softmax(logits[..., part], -1)).sum(-1).mean(-1)
        return (loss * keep).sum() / keep.sum().clamp(min=1)


class ShapeReader(torch.nn.Module):
    """Training-only: a small convolutional net that reads a clean latent grid [B, C, h, w] and predicts the shape
    and the colour class of every pixel under it (logits [B, SHAPE_CLASSES + COLOR_CLASSES, h * f, w * f] by
    sub-pixel convolution, f = image size / grid). It is fitted first to the training set's latents and class maps,
    then frozen; the shape and colour losses (train.shape_weight, train.colour_weight) run it on the denoiser's
    clean-image estimate, so the named outline, and one pure colour per object, are rewarded at the denoiser's output,
    where the pixel loss alone hardly tells a circle from a square or a blue object from one that fades into purple.
    Never saved with the pipeline."""

    def __init__(self, channels: int, factor: int, width: int = 64, object_weight: float = 5.0):
        from spatialscore.data.render import COLOR_CLASSES, SHAPE_CLASSES

        super().__init__()
        self.object_weight, self.split = object_weight, SHAPE_CLASSES
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, (SHAPE_CLASSES + COLOR_CLASSES) * factor * factor, 1),
            torch.nn.PixelShuffle(factor))

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape logits, colour logits), each [B, classes, H, W]."""
        logits = self.net(latents.float())
        return logits[:, :self.split], logits[:, self.split:]

    def loss(self, latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample cross-entropies (shape [B], colour [B]) against class maps labels [B, 2, H, W] (render_labels:
        shape, colour), object pixels weighted `object_weight` times the background, which still counts: a square's
        corners drawn around a circle are wrong. Signs have no colour class; their pixels count as background there."""
        weight = 1 + (self.object_weight - 1) * (labels[:, 0] > 0).float()
        total = weight.flatten(1).sum(1)
        return tuple((torch.nn.functional.cross_entropy(logits, target.long(), reduction="none") * weight)
                     .flatten(1).sum(1) / total for logits, target in zip(self(latents), labels.unbind(1)))


def fit_shape_reader(data: torch.Tensor, maps: torch.Tensor, cfg: GeneratorConfig,
                     progress: bool = True) -> tuple[ShapeReader, dict]:
    """Fit a `ShapeReader` to clean latents `data` [N, C, h, w] and their class maps uint8 [N, 2, H, W]
    (train.shape_reader_steps of Adam, batch 64, latents jittered by N(0, 0.1) so it reads shapes, not exact codes),
    then freeze it. Returns it and its accuracies on the object pixels of a slice it was not fitted on."""
    torch.manual_seed(cfg.train.seed + 17)
    reader = ShapeReader(data.shape[1], maps.shape[-1] // data.shape[-1])
    optimizer = torch.optim.Adam(reader.parameters(), lr=2e-3)
    held = min(512, len(data) // 10)
    generator = torch.Generator().manual_seed(cfg.train.seed + 17)
    bar = tqdm(range(cfg.train.shape_reader_steps), desc="shape reader", unit="step", disable=not progress)
    for _ in bar:
        index = held + torch.randint(len(data) - held, (64,), generator=generator)
        x = data[index] + 0.1 * torch.randn(data[index].shape, generator=generator)
        loss = sum(part.mean() for part in reader.loss(x, maps[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    reader.eval().requires_grad_(False)
    with torch.no_grad():
        objects = maps[:held, 0] > 0
        accuracy = [(logits.argmax(1) == target.long())[objects].float().mean().item()
                    for logits, target in zip(reader(data[:held]), maps[:held].unbind(1))]
    return reader, {"shape_reader_accuracy": accuracy[0], "colour_reader_accuracy": accuracy[1]}


def layout_targets(labels: torch.Tensor, grid: int) -> torch.Tensor:
    """Class maps uint8 [N, 2, H, W] -> per-token class shares [N, grid * grid, shape classes + colour classes]
    (row-major tokens, as SD3's patch embedding flattens them), float16."""
    from spatialscore.data.render import COLOR_CLASSES, SHAPE_CLASSES

    out = []
    for start in range(0, len(labels), 1024):
        chunk = labels[start:start + 1024].long()
        onehot = torch.cat([torch.nn.functional.one_hot(chunk[:, 0], SHAPE_CLASSES),
                            torch.nn.functional.one_hot(chunk[:, 1], COLOR_CLASSES)], -1).permute(0, 3, 1, 2).float()
        pooled = torch.nn.functional.adaptive_avg_pool2d(onehot, grid)
        out.append(pooled.flatten(2).transpose(1, 2).half())
    return torch.cat(out)


def _layout_head(pipe, cfg: GeneratorConfig) -> tuple[LayoutHead, torch.nn.Module]:
    """(a fresh layout head, the transformer block it reads)."""
    from spatialscore.data.render import COLOR_CLASSES, SHAPE_CLASSES

    blocks = pipe.transformer.transformer_blocks
    index = cfg.train.layout_layer if cfg.train.layout_layer >= 0 else len(blocks) // 2
    if index >= len(blocks):
        raise SpatialScoreError(f"train.layout_layer: {index} >= the transformer's {len(blocks)} blocks")
    torch.manual_seed(cfg.train.seed)
    head = LayoutHead(pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim,
                      SHAPE_CLASSES, COLOR_CLASSES)
    return head, blocks[index]


def caption_targets(records: list[dict]) -> torch.Tensor:
    """What each prompt asks for, from its metadata, as multi-hot rows: every (shape, colour or none) entity, every
    (relation, subject shape, object shape) triple, and every (shape, count) -- the text encoder's pretraining
    target."""
    from spatialscore.data.vocab import COLORS, MAX_COUNT, RELATIONS, SHAPES, SIGN_CLASS

    classes, colours = [*SHAPES, SIGN_CLASS], [*COLORS, None]
    entity, relation = len(classes) * len(colours), len(RELATIONS) * len(classes) ** 2
    rows = torch.zeros(len(records), entity + relation + len(classes) * (MAX_COUNT + 1))
    for row, record in zip(rows, records):
        entries = record.get("include", [])
        for entry in entries:
            shape = classes.index(entry["class"])
            row[shape * len(colours) + colours.index(entry.get("color"))] = 1
            row[entity + relation + shape * (MAX_COUNT + 1) + min(int(entry.get("count", 1)), MAX_COUNT)] = 1
            if entry.get("position"):
                rel, target = entry["position"][0], int(entry["position"][1])
                anchor = classes.index(entries[target]["class"])
                row[entity + (RELATIONS.index(rel) * len(classes) + shape) * len(classes) + anchor] = 1
    return rows


def pretrain_text_encoder(pipe, records: list[dict], cfg: GeneratorConfig, progress: bool = True) -> dict:
    """Train the pipeline's text encoder alone, before the denoiser, to say from its pooled embedding what each
    caption asks for (caption_targets: which shape has which colour, which relation holds between which shapes,
    how many of each) and to keep every word recoverable from its token state. Trained jointly from scratch, the
    encoder amplifies the words the denoiser learns first (colours) and leaves the shape words nearly identical
    (their pooled embeddings at cosine 1.000 in the first shapes base), so nothing tells the denoiser which shape to
    draw."""
    from spatialscore.models.generators import text_states

    prompts = [r["prompt"] for r in records]
    targets = caption_targets(records)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    dim = encoder.config.hidden_size
    torch.manual_seed(cfg.train.seed)
    pooled_head = torch.nn.Linear(encoder.config.projection_dim if hasattr(encoder, "text_projection") else dim,
                                  targets.shape[1])
    token_head = torch.nn.Linear(dim, len(tokenizer))
    params = [*encoder.parameters(), *pooled_head.parameters(), *token_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.train.seed + 17)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt")
    ids, attention = tokens.input_ids, tokens.attention_mask

    def read(index):
        states, pooled = text_states(encoder, ids[index], attention[index])
        return states, pooled_head(pooled)

    encoder.train()
    bar = tqdm(range(cfg.train.text_pretrain_steps), desc="text encoder", unit="step", disable=not progress)
    for _ in bar:
        index = torch.randint(len(prompts), (min(256, len(prompts)),), generator=generator)
        states, logits = read(index)
        caption_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[index])
        mask = attention[index].bool()
        word_loss = torch.nn.functional.cross_entropy(token_head(states[mask]), ids[index][mask])
        loss = caption_loss * targets.shape[1] / 8 + word_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(caption=f"{caption_loss.item():.4f}", word=f"{word_loss.item():.3f}")
    with torch.no_grad():
        index = torch.arange(min(2048, len(prompts)))
        exact = ((read(index)[1] > 0).float() == targets[index]).all(-1).float().mean().item()
    return {"text_caption_loss": caption_loss.item(), "text_exact": exact}


def foreground_cells(images: torch.Tensor, grid: int, dilate: int = 1, batch: int = 1024) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> bool [N, 1, grid, grid]: the cells of the denoiser's grid that hold a pixel of an
    object (not the background colour), grown by `dilate` cells, so a wrong outline drawn just outside the object
    (a square's corners around a circle) also counts."""
    out = []
    for start in range(0, len(images), batch):
        mask = _foreground(_pixels(images[start:start + batch])).float()
        cells = torch.nn.functional.adaptive_max_pool2d(mask, grid)
        if dilate:
            cells = torch.nn.functional.max_pool2d(cells, 2 * dilate + 1, stride=1, padding=dilate)
        out.append(cells > 0)
    return torch.cat(out)


def _mse(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, or with weight [B, 1, h, w] the weighted one, normalised by the batch's mean weight
    (the loss keeps its scale, the objects get the share)."""
    if weight is None:
        return torch.nn.functional.mse_loss(output, target)
    return ((output - target).pow(2) * weight).mean() / weight.mean()


def _flow_loss(pipe, x0: torch.Tensor, prompts: list[str], generator: torch.Generator, cfg: GeneratorConfig,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, sigma [B], the clean-image estimate): flow matching at a logit-normal, shifted sigma: the velocity error
    (or the clean-image error, `train.loss_space: x`), per position weighted by `weight` [B, 1, h, w] when given."""
    sigma = shifted(torch.sigmoid(torch.randn(len(x0), generator=generator)), cfg.model.shift)
    noise = torch.randn(x0.shape, generator=generator)
    velocity, target = _denoising(pipe, x0, noise, sigma, prompts)
    s = sigma.view(-1, 1, 1, 1)
    clean = (1 - s) * x0 + s * noise - sigma.clamp(min=MIN_SIGMA).view(-1, 1, 1, 1) * velocity
    if cfg.train.loss_space == "x":  # the clean-image error: every noise level weighs the same
        return _mse(clean, x0, weight), sigma, clean
    # the velocity error: under x-prediction it weighs low-noise steps by 1 / sigma^2
    return _mse(velocity, target, weight), sigma, clean


def _ddpm_loss(pipe, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
               weight: torch.Tensor | None = None):
    """DDPM (SD1.5) at a uniform integer timestep: the noise error (weighted per position, as in `_flow_loss`)."""
    t = torch.randint(pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return _mse(*_denoising(pipe, x0, noise, t, prompts), weight)


def eval_prompts(cfg: GeneratorConfig) -> list[dict]:
    """The held-out prompt set: same tags and phrasing as training, another seed."""
    from spatialscore.data.prompts import PromptWriter

    writer = PromptWriter(random.Random(f"eval-{cfg.data.eval_seed}"), cfg.data.phrasing)
    return [writer.sample(cfg.data.style, dict(cfg.data.tag_weights)) for _ in range(cfg.data.eval_n)]


@torch.no_grad()
def sample_images(pipe, prompts: list[str], steps: int, guidance_scale: float, seed: int,
                  batch_size: int = 64) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1]; the noise of image i depends only on (seed, i), not on the batching."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        seeds = [seed * 100003 + start + i for i in range(len(chunk))]
        latents = torch.stack([torch.randn(latent_shape(pipe), generator=torch.Generator().manual_seed(s))
                               for s in seeds])
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                        output_type="pt").images)
    return torch.cat(out)


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift, the same map the sampler's scheduler applies: shift > 1 moves training (and sampling)
    toward high noise, where a small object's position is decided."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _lr(step: int, cfg: GeneratorConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.train.warmup))
    progress = step / max(1, cfg.train.steps)
    return cfg.train.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(pipe, cfg: GeneratorConfig, prompts: list[dict], out_png: Path | None = None) -> dict:
    from spatialscore.eval.generation import oracle_accuracy, save_grid

    images = sample_images(pipe, [p["prompt"] for p in prompts], cfg.train.sample_steps, cfg.train.guidance_scale,
                           seed=cfg.train.seed)
    report = oracle_accuracy(images, prompts)
    if out_png is not None:
        save_grid(images[:32], out_png, columns=8)
    return {k: v for k, v in report.items() if k != "passed"}


@torch.no_grad()
def prompt_gain(pipe, x0: torch.Tensor, prompts: list[str], noise_level: float = 0.8, seed: int = 0) -> float:
    """How much the denoiser uses its prompt: 1 - (error with the right prompts) / (error with the prompts rolled by
    one), at one fixed noise level on fixed images and noise. ~0 means it ignores the text (it draws the average
    scene: the wrong colours, too many objects); it should grow as training learns the conditioning."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    if isinstance(pipe, ShapesFlowPipeline):
        level = torch.full((len(x0),), noise_level)
    else:
        level = torch.full((len(x0),), int(noise_level * (pipe.scheduler.config.num_train_timesteps - 1)))
    right, wrong = (torch.nn.functional.mse_loss(*_denoising(pipe, x0, noise, level, texts))
                    for texts in (prompts, prompts[1:] + prompts[:1]))
    return float(1 - right / wrong)


def shape_word_pairs(n: int, seed: int, image_size: int, object_scale: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """n pairs of single-object scenes that differ only in the object's shape (same colour, place, size, rotation):
    uint8 images [2n, H, W, 3] (pair i at rows 2i, 2i + 1) and their prompts."""
    import copy
    import numpy as np

    from spatialscore.data.render import render
    from spatialscore.data.scene import sample_scene
    from spatialscore.data.vocab import COLORS, SHAPES

    rng = random.Random(f"shape-words-{seed}")
    images, prompts = [], []
    for _ in range(n):
        shape, other = rng.sample(list(SHAPES), 2)
        colour = rng.choice(list(COLORS))
        meta = {"prompt": f"a photo of a {colour} {shape}", "tag": "single_object",
                "include": [{"class": shape, "count": 1, "color": colour}]}
        scene = sample_scene(meta, rng, scale=object_scale)
        twin = copy.deepcopy(scene)
        twin.objects[0].shape = other
        images += [np.asarray(render(scene, image_size)), np.asarray(render(twin, image_size))]
        prompts += [meta["prompt"], f"a photo of a {colour} {other}"]
    return torch.from_numpy(np.stack(images)), prompts


@torch.no_grad()
def shape_word_gain(pipe, x0: torch.Tensor, prompts: list[str], noise_level: float = 0.7, seed: int = 0) -> float:
    """How much the shape word moves the denoiser: for pairs of scenes that differ only in the shape (x0 [2n, ...]
    as `shape_word_pairs` orders them), one noisy copy of the first is denoised under both prompts, and the change
    of the clean-image estimate is measured against the difference of the two true images (squared norms). 0: the
    denoiser ignores the shape words (it draws the same blob for "circle" and "square"); a denoiser that knows the
    shapes moves its estimate by a good part of the difference at noise levels that hide the shape."""
    first, second = x0[0::2], x0[1::2]
    noise = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed))
    flow = isinstance(pipe, ShapesFlowPipeline)
    if flow:
        level = torch.full((len(first),), noise_level)
    else:
        level = torch.full((len(first),), int(noise_level * (pipe.scheduler.config.num_train_timesteps - 1)))
        a = pipe.scheduler.alphas_cumprod.float()[level[0]]
    xt = _noised(pipe, first, noise, level)
    estimates = []
    for texts in (prompts[0::2], prompts[1::2]):
        out, _ = _denoising(pipe, first, noise, level, texts)  # the velocity, or the noise
        estimates.append(xt - noise_level * out if flow else (xt - (1 - a).sqrt() * out) / a.sqrt())
    moved = (estimates[1] - estimates[0]).pow(2).flatten(1).sum(1)
    apart = (second - first).pow(2).flatten(1).sum(1).clamp(min=1e-8)
    return float((moved / apart).mean())


@torch.no_grad()
def relation_gain(pipe, n: int = 24, noise_level: float = 0.85, guidance_scale: float = 1.0, seed: int = 0) -> float:
    """Does the relation word move the objects? For n two-object prompts "a C1 S1 REL a C2 S2" (distinct chromatic
    colours) and the same prompts with the opposite relation, the clean-image estimate from one pure-noise input at
    `noise_level` (where the sampler fixes the layout), decoded: the colour-weighted centre of C1 minus that of C2
    along the relation's axis, in image widths. The gain is the mean shift between the two wordings in the direction
    the words ask (0: relation-blind, the noise alone places the objects; the estimate of a denoiser that follows the
    relation moves by a good part of the image). Flow pipelines with an autoencoder or in pixels
    (ShapesFlowPipeline)."""
    import colorsys

    from spatialscore.data.vocab import CHROMATIC, COLORS, OPPOSITE, SHAPES

    rng = random.Random(f"relation-gain-{seed}")
    rows, asked, axes = [], [], []
    for _ in range(n):
        c1, c2 = rng.sample(CHROMATIC, 2)
        s1, s2, rel = rng.choice(SHAPES), rng.choice(SHAPES), rng.choice(list(OPPOSITE))
        rows.append((c1, c2))
        asked += [f"a {c1} {s1} {rel} a {c2} {s2}", f"a {c1} {s1} {OPPOSITE[rel]} a {c2} {s2}"]
        axes.append((0 if rel in ("left of", "right of") else 1, 1.0 if rel in ("left of", "above") else -1.0))
    noise = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(seed))
    noise = noise.repeat_interleave(2, 0)
    sigma = torch.tensor(noise_level)
    xt = noise_level * noise  # a clean part of zero: the denoiser's view of pure noise at this level
    embeds, pooled = pipe.encode_prompt(asked)
    velocity = pipe.predict(xt, sigma, embeds, pooled)
    if guidance_scale != 1.0:
        empty, empty_pooled = pipe.encode_prompt([""] * len(asked))
        unconditional = pipe.predict(xt, sigma, empty, empty_pooled)
        velocity = unconditional + guidance_scale * (velocity - unconditional)
    images = pipe.to_images(xt - noise_level * velocity).float()  # [2n, 3, H, W] in [0, 1]
    where = torch.linspace(0, 1, images.shape[-1])
    shifts = []
    for i, ((c1, c2), (axis, sign)) in enumerate(zip(rows, axes)):
        centres = []
        for colour in (c1, c2):
            h, sat, val = COLORS[colour]
            rgb = torch.tensor(colorsys.hsv_to_rgb(h / 360, sat, val)).view(1, 3, 1, 1)
            weight = torch.exp(-(images[2 * i:2 * i + 2] - rgb).pow(2).sum(1) / 0.05)  # [2, H, W]
            profile = weight.sum(1 + axis)  # mass along the relation's axis: for x the rows are summed away
            centres.append((profile * where).sum(-1) / profile.sum(-1).clamp(min=1e-6))
        offset = centres[0] - centres[1]  # [2]: asked wording, opposite wording
        # "left of"/"above" ask for a negative offset: the opposite wording should sit higher by the gain
        shifts.append(float(sign * (offset[1] - offset[0])))
    return sum(shifts) / len(shifts)


def _state_io(modules: torch.nn.Module, ema: torch.nn.Module):
    """(writer, reader) of a checkpoint's weights: the trained modules and their EMA, fp32."""
    from safetensors.torch import load_file, save

    from spatialscore.io import atomic_write_bytes

    def write(_model, directory: Path) -> None:
        for name, module in (("model", modules), ("ema", ema)):
            # cloned: tied weights (T5's shared and encoder.embed_tokens) are one tensor, which safetensors refuses
            tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
            atomic_write_bytes(Path(directory) / f"{name}.safetensors", save(tensors))

    def read(path: Path, _model) -> None:
        for name, module in (("model", modules), ("ema", ema)):
            file = Path(path) / f"{name}.safetensors"
            if not file.is_file():
                raise SpatialScoreError(f"--resume {path}: no {file.name} (not a train-generator checkpoint?)")
            module.load_state_dict(load_file(str(file)))

    return write, read


def train_generator(cfg: GeneratorConfig, out: str | Path, resume: str | None = None, progress: bool = True) -> dict:
    """Train from scratch, or continue exactly from `resume` (a run directory or one of its checkpoints/step-N):
    weights, EMA, optimizer moments and the step; each step's batch and noise depend only on (seed, step)."""
    from spatialscore.data.tensors import captioned_images
    from spatialscore.train.runtime import load_checkpoint, resolve_resume, save_checkpoint

    out = Path(out)
    resume_from = resolve_resume(resume) if resume else None
    if cfg.model.autoencoder:
        _autoencoder_dir(cfg)  # a bad path fails before anything is written
    pipe = build_pipeline(cfg)
    stats = _warm_start(pipe, _init_pipeline(cfg), cfg) if cfg.model.init else {}  # a bad init fails here, too
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    t0 = time.time()
    images, records = captioned_images(cfg.data.n_train, cfg.data.seed, cfg.data.style, cfg.data.phrasing,
                                       cfg.model.image_size, cfg.data.tag_weights, progress=progress,
                                       object_scale=cfg.data.object_scale, composition=cfg.data.composition)
    captions = [r["prompt"] for r in records]
    if pipe.vae is not None and not cfg.model.init:
        stats = _autoencoder_stage(pipe.vae, images, cfg, out, resume_from, progress)
    data = encode_dataset(pipe, images)
    cells = (foreground_cells(images, data.shape[-1], cfg.train.foreground_dilate)
             if cfg.train.foreground_weight != 1 else None)
    if cfg.train.text_pretrain_steps and not resume_from:  # a resumed run loads the pretrained encoder below
        stats |= pretrain_text_encoder(pipe, records, cfg, progress)
        tqdm.write(f"text encoder pretrained {cfg.train.text_pretrain_steps} steps: every caption's content read "
                   f"exactly from the pooled embedding for {stats['text_exact']:.3f} of them")
    trained = [_denoiser(pipe), pipe.text_encoder]
    layout = None
    read_maps = bool(cfg.train.shape_weight or cfg.train.colour_weight)
    class_maps = None
    if cfg.train.layout_weight or read_maps:  # the exact class maps of the training scenes, read once
        from spatialscore.data.tensors import captioned_labels

        class_maps = captioned_labels(cfg.data.n_train, cfg.data.seed, cfg.data.style, cfg.data.phrasing,
                                      cfg.model.image_size, cfg.data.tag_weights, progress=progress,
                                      object_scale=cfg.data.object_scale, composition=cfg.data.composition)
    if cfg.train.layout_weight:
        grid = pipe.latent_shape[1] // pipe.transformer.config.patch_size
        (layout, block), layout_data = _layout_head(pipe, cfg), layout_targets(class_maps, grid)
        trained.append(layout)
    reader = None
    if read_maps:
        reader, reader_stats = fit_shape_reader(data, class_maps, cfg, progress)  # from (seed): the same on resume
        stats |= reader_stats
        tqdm.write(f"shape reader fitted: object-pixel accuracy {reader_stats['shape_reader_accuracy']:.3f} (shape), "
                   f"{reader_stats['colour_reader_accuracy']:.3f} (colour)")
    else:
        class_maps = None  # only the layout targets were needed
    modules = torch.nn.ModuleList(trained)
    ema = copy.deepcopy(modules).requires_grad_(False)
    if layout is not None:
        layout.attach(block)  # after the copy: the EMA transformer (sampling, evaluation) carries no hook
    ema_pipe = _ema_pipeline(pipe, ema)
    text_ids = {id(p) for p in pipe.text_encoder.parameters()}
    groups = [{"params": [p for p in modules.parameters() if id(p) not in text_ids], "scale": 1.0}]
    if cfg.train.text_lr_scale:
        groups.append({"params": list(pipe.text_encoder.parameters()), "scale": cfg.train.text_lr_scale})
    else:
        pipe.text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    stepped = [p for group in groups for p in group["params"]]  # clipped: a fixed encoder's old gradients don't count
    write_state, read_state = _state_io(modules, ema)
    held_out = eval_prompts(cfg)
    word_images, word_prompts = shape_word_pairs(16, cfg.data.eval_seed, cfg.model.image_size, cfg.data.object_scale)
    word_pairs = encode_dataset(pipe, word_images)
    log_path = out / "metrics.jsonl"
    start, history, losses, layout_losses, shape_losses = 0, [], [], [], []
    if resume_from:
        state = load_checkpoint(resume_from, modules, optimizer, read_model=read_state)
        start, history = state["step"], state["history"]
        t0 -= state["minutes"] * 60
    else:
        log_path.unlink(missing_ok=True)
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train-generator",
               unit="step", disable=not progress)
    for step in bar:
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        index = torch.randint(len(captions), (cfg.train.batch_size,), generator=generator)
        x0 = data[index]
        drop = torch.rand(len(index), generator=generator) < cfg.train.cond_dropout
        prompts = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        weight = None if cells is None else 1 + (cfg.train.foreground_weight - 1) * cells[index].float()
        if isinstance(pipe, ShapesFlowPipeline):
            loss, sigma, clean = _flow_loss(pipe, x0, prompts, generator, cfg, weight)
            if reader is not None:  # the named outline in the clean estimate, where the noise leaves it open
                keep = (~drop & (sigma >= cfg.train.shape_min_sigma) & (sigma <= cfg.train.shape_max_sigma)).float()
                shape_ce, colour_ce = reader.loss(clean, class_maps[index])
                shape_loss = ((cfg.train.shape_weight * shape_ce + cfg.train.colour_weight * colour_ce) * keep).sum()
                shape_loss = shape_loss / keep.sum().clamp(min=1)
                shape_losses.append(shape_loss.item())
                loss = loss + shape_loss
            if layout is not None:  # where the noise hides the shapes, only the caption can tell them
                keep = ~drop & (sigma >= cfg.train.layout_min_sigma)
                layout_loss = layout.loss(layout_data[index].float(), keep.float())
                layout_losses.append(layout_loss.item())
                loss = loss + cfg.train.layout_weight * layout_loss
        else:
            loss = _ddpm_loss(pipe, x0, prompts, generator, weight)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg) * group["scale"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stepped, cfg.train.max_grad_norm)
        optimizer.step()
        decay = min(cfg.train.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), modules.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        last = step + 1 == cfg.train.steps
        if (step + 1) % cfg.train.eval_every == 0 or last:
            report = evaluate(ema_pipe, cfg, held_out, out / "samples" / f"step-{step + 1:06d}.png")
            report["prompt_gain"] = prompt_gain(ema_pipe, data[:64], captions[:64])
            report["shape_word_gain"] = shape_word_gain(ema_pipe, word_pairs, word_prompts)
            # where the sampler fixes the outlines (sigma ~0.92-0.81 at shift 3)
            report["shape_word_gain_high"] = shape_word_gain(ema_pipe, word_pairs, word_prompts, noise_level=0.85)
            if isinstance(ema_pipe, ShapesFlowPipeline):  # the layout's answer to the relation word
                report["relation_gain"] = relation_gain(ema_pipe, guidance_scale=cfg.train.guidance_scale)
            row = {"step": step + 1, "loss": sum(losses) / len(losses), "minutes": (time.time() - t0) / 60, **stats,
                   **report}
            if layout_losses:
                row["layout_loss"] = sum(layout_losses) / len(layout_losses)
            if shape_losses:
                row["shape_loss"] = sum(shape_losses) / len(shape_losses)
            history.append(row)
            losses, layout_losses, shape_losses = [], [], []
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            tqdm.write(f"step {step + 1}: loss {row['loss']:.4f}, prompt gain {report['prompt_gain']:.3f}, "
                       f"shape-word gain {report['shape_word_gain']:.3f} (sigma 0.7), "
                       f"{report['shape_word_gain_high']:.3f} (0.85), "
                       f"relation gain {report.get('relation_gain', float('nan')):.3f}, "
                       f"held-out oracle accuracy {report['overall']:.3f} "
                       f"{json.dumps({k: round(v, 3) for k, v in report['by_tag'].items()})}")
        if (step + 1) % cfg.train.save_every == 0 and not last:
            save_checkpoint(out, step + 1, modules, optimizer,
                            {"history": history, "minutes": (time.time() - t0) / 60}, write_model=write_state)
    save_pipeline(ema_pipe, out / "final")
    result = {"out": str(out), "final": str(out / "final"), "minutes": (time.time() - t0) / 60, **history[-1]}
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    return result


def _autoencoder_stage(vae, images: torch.Tensor, cfg: GeneratorConfig, out: Path, resume_from, progress: bool) -> dict:
    """Train the autoencoder, or (resuming) load the one this run already trained: `out/autoencoder/`, written
    atomically when the stage ends, with its held-out reconstruction accuracy as the oracle judges it."""
    from safetensors.torch import load_file, save

    from spatialscore.eval.generation import oracle_accuracy
    from spatialscore.io import atomic_write_bytes

    directory = out / "autoencoder"
    if cfg.model.autoencoder:
        return _reuse_autoencoder(vae, images, cfg)
    trained = Path(resume_from).parents[1] / "autoencoder" if resume_from else None  # <run>/checkpoints/step-N
    if trained is not None and (trained / "stats.json").is_file():
        stats = json.loads((trained / "stats.json").read_text())
        vae.load_state_dict(load_file(str(trained / "model.safetensors")))
        vae.register_to_config(shift_factor=stats["shift_factor"], scaling_factor=stats["scaling_factor"])
        vae.eval().requires_grad_(False)
        if trained.resolve() != directory.resolve():
            shutil.copytree(trained, directory, dirs_exist_ok=True)
        return stats["metrics"]
    from spatialscore.data.tensors import captioned_images

    metrics = train_autoencoder(vae, images, cfg, progress, centre=cfg.model.arch == "shapes_flow")
    held_out, records = captioned_images(cfg.data.eval_n, cfg.data.eval_seed, cfg.data.style, cfg.data.phrasing,
                                         cfg.model.image_size, cfg.data.tag_weights, progress=False,
                                         object_scale=cfg.data.object_scale, composition=cfg.data.composition)
    with torch.no_grad():
        pixels = _pixels(held_out)
        recon = torch.cat([_decode_encode(vae, pixels[i:i + 128]) for i in range(0, len(pixels), 128)])
    metrics["ae_oracle"] = oracle_accuracy(recon, records)["overall"]
    metrics["faithful_oracle"] = oracle_accuracy(pixels, records)["overall"]
    tqdm.write(f"autoencoder: loss {metrics['ae_loss']:.4f}, held-out oracle accuracy of reconstructions "
               f"{metrics['ae_oracle']:.3f} (of the renders themselves {metrics['faithful_oracle']:.3f})")
    atomic_write_bytes(directory / "model.safetensors", save({k: v.contiguous() for k, v in vae.state_dict().items()}))
    atomic_write_text(directory / "stats.json", json.dumps({"shift_factor": vae.config.shift_factor,
                                                            "scaling_factor": vae.config.scaling_factor,
                                                            "metrics": metrics}))
    return metrics


def _reuse_autoencoder(vae, images: torch.Tensor, cfg: GeneratorConfig) -> dict:
    """model.autoencoder: the weights of an already trained autoencoder of the same shape (normalised anew for this
    pipeline)."""
    from diffusers import AutoencoderKL

    path = _autoencoder_dir(cfg)
    trained = AutoencoderKL.from_pretrained(str(path), dtype=torch.float32)
    try:
        vae.load_state_dict(trained.state_dict())
    except RuntimeError as err:
        raise SpatialScoreError(f"model.autoencoder: {path} does not match model.latent_factor / latent_channels / "
                                f"ae_width ({str(err).splitlines()[0]})") from None
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(_pixels(images[:512]) * 2 - 1).latent_dist.mode()
    _normalise(vae, latents, centre=cfg.model.arch == "shapes_flow")
    return {"autoencoder": str(cfg.model.autoencoder)}


def _init_pipeline(cfg: GeneratorConfig):
    """model.init: the saved base pipeline a run starts from, of this recipe's kind (checked before anything is
    written)."""
    from spatialscore.config import project_path
    from spatialscore.models.generators import load_pipeline_dir

    kind = "StableDiffusionPipeline" if cfg.model.arch == "shapes_unet" else "ShapesFlowPipeline"
    return load_pipeline_dir(project_path(cfg.model.init), "model.init", (kind,), f"model.arch {cfg.model.arch}")


def _warm_start(pipe, init, cfg: GeneratorConfig) -> dict:
    """Copy every weight of `init` (a saved base: its EMA) into the freshly built pipeline, and its autoencoder's
    normalisation: training continues from that base instead of from scratch (the optimizer starts afresh, so this
    is a warm start, not a resume). The recipe's model section must describe the same architecture, except that a
    recipe may swap the text encoder's kind (model.text_encoder): the new encoder then starts fresh (pretrain it with
    train.text_pretrain_steps) under the base's denoiser."""
    pairs = {"vae": (pipe.vae, init.vae), "text_encoder": (pipe.text_encoder, init.text_encoder),
             "transformer" if isinstance(pipe, ShapesFlowPipeline) else "unet": (_denoiser(pipe), _denoiser(init))}
    swapped = type(pipe.text_encoder) is not type(init.text_encoder)
    if swapped:
        del pairs["text_encoder"]
    for name, (target, source) in pairs.items():
        if (target is None) != (source is None):
            raise SpatialScoreError(f"model.init: {cfg.model.init} {'has no' if source is None else 'has a'} {name}, "
                                    f"the recipe's model {'does' if source is None else 'does not'}")
        if target is None:
            continue
        try:
            target.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
        except RuntimeError as err:
            raise SpatialScoreError(f"model.init: {cfg.model.init}'s {name} does not match the recipe's model section "
                                    f"({str(err).splitlines()[0]})") from None
    if pipe.vae is not None:
        pipe.vae.register_to_config(shift_factor=init.vae.config.shift_factor,
                                    scaling_factor=init.vae.config.scaling_factor)
        pipe.vae.eval().requires_grad_(False)
    return {"init": str(cfg.model.init), **({"text_encoder_swapped": type(init.text_encoder).__name__} if swapped else {})}


def _autoencoder_dir(cfg: GeneratorConfig) -> Path:
    from spatialscore.config import project_path

    path = Path(project_path(cfg.model.autoencoder))
    if not (path / "config.json").is_file():
        raise SpatialScoreError(f"model.autoencoder: {path} is not an AutoencoderKL directory (no config.json)")
    return path


def _normalise(vae, latents: torch.Tensor, centre: bool) -> None:
    if centre:  # SD3: (latents - shift) * scale
        vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    else:  # SD1.5's pipelines only scale
        vae.register_to_config(shift_factor=0.0, scaling_factor=1 / latents.square().mean().sqrt().item())


def _decode_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return ((vae.decode(vae.encode(pixels * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)


def save_pipeline(pipe, directory: Path, dtype: torch.dtype = torch.float16) -> Path:
    """save_pretrained into a temporary directory renamed into place (a crash leaves the old directory or the new
    one); weights stored in `dtype` (fp16 halves a zoo model, it loads back as fp32 with torch_dtype)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    saved = copy.deepcopy(pipe)
    if saved.dtype != dtype:
        saved.to(dtype=dtype)
    saved.save_pretrained(str(tmp), safe_serialization=True)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
