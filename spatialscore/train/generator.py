"""Train a shapes-world base generator from scratch (`spatialscore train-generator`): flow matching on faithful
renders of shapes-world captions, with the text encoder trained alongside.

x_sigma = (1 - sigma) * image + sigma * noise with sigma ~ logit-normal (SD3's sampling), the transformer regresses
the velocity noise - image; captions are dropped to "" with probability `cond_dropout` so classifier-free guidance
works. The saved weights are an exponential moving average. Every `eval_every` steps the EMA pipeline samples the
held-out prompt set (`data.eval_seed`), the oracle judges it, and a grid of samples is written: the training log
doubles as the model card's evidence. The result is an ordinary diffusers pipeline directory, `final/`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from spatialscore.config import GeneratorConfig, save_config
from spatialscore.errors import SpatialScoreError
from spatialscore.models.generators import MIN_SIGMA
from spatialscore.io import atomic_write_text


def build_pipeline(cfg: GeneratorConfig):
    from spatialscore.models.generators import shapes_flow_pipeline

    m = cfg.model
    return shapes_flow_pipeline(image_size=m.image_size, patch_size=m.patch_size, layers=m.layers, heads=m.heads,
                                head_dim=m.head_dim, text_dim=m.text_dim, text_layers=m.text_layers, shift=m.shift,
                                prediction=m.prediction, seed=m.seed)


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
        size = pipe.image_size
        latents = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed * 100003 + start + i))
                               for i in range(len(chunk))])
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                        output_type="pt").images)
    return torch.cat(out)


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


def _state_io(modules: torch.nn.Module, ema: torch.nn.Module):
    """(writer, reader) of a checkpoint's weights: the trained modules and their EMA, fp32."""
    from safetensors.torch import load_file, save

    from spatialscore.io import atomic_write_bytes

    def write(_model, directory: Path) -> None:
        for name, module in (("model", modules), ("ema", ema)):
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
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
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    t0 = time.time()
    images, records = captioned_images(cfg.data.n_train, cfg.data.seed, cfg.data.style, cfg.data.phrasing,
                                       cfg.model.image_size, cfg.data.tag_weights, progress=progress)
    captions = [r["prompt"] for r in records]
    pipe = build_pipeline(cfg)
    modules = torch.nn.ModuleList([pipe.transformer, pipe.text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    ema_pipe = type(pipe)(transformer=ema[0], scheduler=copy.deepcopy(pipe.scheduler), text_encoder=ema[1],
                          tokenizer=pipe.tokenizer, prediction=pipe.config.prediction)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    write_state, read_state = _state_io(modules, ema)
    held_out = eval_prompts(cfg)
    log_path = out / "metrics.jsonl"
    start, history, losses = 0, [], []
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
        x0 = images[index].permute(0, 3, 1, 2).float().div(127.5).sub(1)
        drop = torch.rand(len(index), generator=generator) < cfg.train.cond_dropout
        prompts = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        sigma = torch.sigmoid(torch.randn(len(index), generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        embeds, pooled = pipe.encode_prompt(prompts)
        velocity = pipe.predict(xt, sigma, embeds, pooled)  # an x-predicting transformer, read as a velocity
        if cfg.train.loss_space == "x":  # the clean-image error: every noise level weighs the same
            clamped = sigma.clamp(min=MIN_SIGMA).view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(xt - clamped * velocity.float(), x0)
        else:  # the velocity error: weighs low-noise steps by 1 / sigma^2 under x-prediction
            loss = torch.nn.functional.mse_loss(velocity.float(), noise - x0)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), cfg.train.max_grad_norm)
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
            row = {"step": step + 1, "loss": sum(losses) / len(losses), "minutes": (time.time() - t0) / 60, **report}
            history.append(row)
            losses = []
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            tqdm.write(f"step {step + 1}: loss {row['loss']:.4f}, held-out oracle accuracy {report['overall']:.3f} "
                       f"{json.dumps({k: round(v, 3) for k, v in report['by_tag'].items()})}")
        if (step + 1) % cfg.train.save_every == 0 and not last:
            save_checkpoint(out, step + 1, modules, optimizer,
                            {"history": history, "minutes": (time.time() - t0) / 60}, write_model=write_state)
    save_pipeline(ema_pipe, out / "final")
    result = {"out": str(out), "final": str(out / "final"), "minutes": (time.time() - t0) / 60, **history[-1]}
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    return result


def save_pipeline(pipe, directory: Path, dtype: torch.dtype = torch.float16) -> Path:
    """save_pretrained into a temporary directory renamed into place (a crash leaves the old directory or the new
    one); weights stored in `dtype` (fp16 halves a zoo model, it loads back as fp32 with torch_dtype)."""
    import shutil

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
