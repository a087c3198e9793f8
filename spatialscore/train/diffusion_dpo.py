"""Diffusion-DPO (Wallace et al., 2023): offline preference optimisation of a generator's LoRA on preference pairs,
for UNet (epsilon-prediction) and flow-matching (velocity) pipelines alike.

For a pair (chosen w, rejected l) both images are noised with the same noise at the same time; with e the model's
per-sample denoising error and e_ref the reference's (the pipeline with the LoRA disabled),

    loss = -log sigmoid(-beta / 2 * ((e_w - e_l) - (e_ref_w - e_ref_l))),

which lowers the error on the chosen image relative to the rejected one, measured against the reference. Batches
are a pure function of (seed, step), the noise of (seed, step, process): resume is exact. Pairs come from a pairs
file (our JSONL, parquet / HF directories, Pick-a-Pic tables) or are generated in the shapes world at the generator's
image size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spatialscore.config import DpoConfig
from spatialscore.errors import SpatialScoreError
from spatialscore.models.generators import FLOW_PIPELINES, UNET_PIPELINES
from spatialscore.train.generator import shifted

PIPELINES = FLOW_PIPELINES + UNET_PIPELINES


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair inside term) from per-sample denoising errors; inside > 0 means the model prefers the
    chosen image more than the reference does."""
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), inside


def load_pairs(cfg: DpoConfig, image_size: int, progress: bool):
    from spatialscore.data.tensors import file_pairs, generated_pairs

    d = cfg.data
    if d.train:
        from spatialscore.config import project_path

        return file_pairs(project_path(d.train), image_size)
    return generated_pairs(d.n_train, d.seed, d.style, d.phrasing, image_size, tag_weights=d.tag_weights,
                           progress=progress, object_scale=d.object_scale)


def train_dpo(cfg: DpoConfig, out: Path, resume: str | None = None, deepspeed: str | None = None,
              precision: str = "no", progress: bool = True) -> dict:
    from spatialscore.models.generators import policy_for
    from spatialscore.train.policy_gradient import (LoraTraining, PromptSource, _seed, build_reward, eval_line,
                                                    evaluate_policy, head_image_size)
    from spatialscore.train.reward_model import batch_indices
    from spatialscore.train.runtime import seed_everything

    t = cfg.train
    seed_everything(t.seed)
    source = PromptSource(cfg)
    reward = build_reward(cfg)
    size = head_image_size(reward)
    # training uses the conditional prediction only; evaluation samples with the recipe's guidance
    run = LoraTraining(cfg, out, PIPELINES, "Diffusion-DPO", 1.0, 1, 1, t.lr, t.weight_decay, t.max_grad_norm, resume,
                       deepspeed, precision)
    world, rank, main = run.world, run.rank, run.main
    if t.batch_size % world:
        raise SpatialScoreError(f"train.batch_size={t.batch_size} must divide evenly over {world} processes")
    micro = t.batch_size // world
    if deepspeed:
        run.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    policy = run.policy
    evaluator = policy_for(run.pipe, cfg.sample.guidance_scale, cfg.model.image_size)
    with run.accelerator.main_process_first():
        data = load_pairs(cfg, policy.image_size, progress and main)
    model = run.begin({"micro_batch": micro, "pairs": len(data)})
    evaluator.denoiser = model
    evals: list[dict] = list(run.state.get("evals", []))
    base_eval = run.state.get("base_eval")

    def run_eval(step: int) -> dict:
        nonlocal base_eval
        model.eval()
        report, images = evaluate_policy(evaluator, reward, size, source.eval, cfg, run.accelerator)
        model.train()
        report["step"] = step
        base_eval = base_eval or dict(report)
        run.eval_images(images, f"step-{step:05d}")
        if main:
            tqdm.write(eval_line(f"step {step}", report))
        evals.append(report)
        return report

    if run.start == 0:
        run_eval(0)
    model.train()
    bar = tqdm(total=t.steps, initial=run.start, desc="train-dpo", unit="step", disable=not (progress and main))
    for step in range(run.start, t.steps):
        part = batch_indices(len(data), t.batch_size, t.seed, step)[rank * micro:(rank + 1) * micro]
        prompts = [data.prompts[i] for i in part.tolist()]
        with torch.no_grad():
            cond = policy.encode(prompts)
            latents = policy.encode_images(torch.cat([data.images("chosen", part), data.images("rejected", part)]))
        generator = torch.Generator().manual_seed(_seed(cfg, step, rank))
        noise = torch.randn(latents[:micro].shape, generator=generator)
        u = shifted(torch.sigmoid(torch.randn(micro, generator=generator)), t.time_shift)  # logit-normal times
        noisy, time, target = policy.noised(latents, torch.cat([noise, noise]), torch.cat([u, u]))
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        errors = (policy.predict(noisy, time, both).float() - target.float()).pow(2).flatten(1).mean(1)
        with torch.no_grad(), run.unwrapped.disable_adapter():
            ref = policy.predict(noisy, time, both, denoiser=run.unwrapped).float()
            ref = (ref - target.float()).pow(2).flatten(1).mean(1)
        loss, inside = dpo_loss(errors[:micro], errors[micro:], ref[:micro], ref[micro:], t.beta)
        run.accelerator.backward(loss)
        if t.max_grad_norm > 0:
            run.accelerator.clip_grad_norm_(run.params, t.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad()
        stats = run.accelerator.reduce(torch.stack([loss.detach(), (inside > 0).float().mean(),
                                                    inside.mean().detach()]), "mean").tolist()
        if not math.isfinite(stats[0]):
            raise SpatialScoreError(f"the DPO loss became {stats[0]} at step {step + 1}; stopping. "
                                    f"Try a lower train.lr or train.beta.")
        done = step + 1
        metrics = {"loss": stats[0], "implicit_accuracy": stats[1], "margin": stats[2]}
        bar.update(1)
        bar.set_postfix(loss=f"{stats[0]:.4f}", acc=f"{stats[1]:.2f}")
        if done % t.eval_every == 0 or done == t.steps:
            metrics |= {f"eval_{k}": v for k, v in run_eval(done).items() if k != "step"}
        run.log.log(done, metrics)
        if done % t.save_every == 0 or done == t.steps:
            run.save(done, {"base_eval": base_eval, "evals": evals})
    bar.close()
    return run.finish({"steps": t.steps, "base": base_eval, "final": evals[-1] if evals else None, "evals": evals})
