"""Train a SpatialScore reward model on preference pairs with the (Gaussian) Bradley–Terry loss.

One loop for every architecture and every launch: accelerate prepares model and optimizer (plain, DDP, or DeepSpeed
ZeRO-2/3), batches are drawn by a generator seeded with (seed, step) so the data order is a pure function of the
step, and checkpoints hold everything needed to resume exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from tqdm import tqdm

from spatialscore.config import RewardConfig, save_config
from spatialscore.data.tensors import PairTensors, file_pairs, generated_pairs
from spatialscore.errors import SpatialScoreError
from spatialscore.models.base import RewardModel, build_model, save_model
from spatialscore.train.losses import bt_loss, gaussian_bt_loss, pairwise_accuracy
from spatialscore.train.runtime import (MetricLog, checkpoints, load_checkpoint, load_zero_partition, log_ranks,
                                        make_accelerator, resolve_resume, save_checkpoint, seed_everything, shutdown,
                                        stage_zero_checkpoint)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of `step`: the same on every process and after any resume."""
    return torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def pair_loss(kind: str, mu_c, sigma_c, mu_r, sigma_r) -> torch.Tensor:
    return gaussian_bt_loss(mu_c, sigma_c, mu_r, sigma_r) if kind == "gaussian_bt" else bt_loss(mu_c, mu_r)


def score_pairs(score, data: PairTensors, batch_size: int = 64, progress: bool = False):
    """(scores of the chosen images, of the rejected ones) for every pair, without gradients.
    `score(images, prompts, meta)` gives one number per image — a reward model's mu (`model_mu`), a head's scores —
    and meta is each pair's metadata when the data has it (pair files), else None."""
    scores: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for start in tqdm(range(0, len(data), batch_size), desc="scoring", disable=not progress):
            index = torch.arange(start, min(start + batch_size, len(data)))
            prompts = [data.prompts[i] for i in index.tolist()]
            meta = [data.meta[i] for i in index.tolist()] if data.meta else None
            for side, found in scores.items():
                found.append(score(data.images(side, index), prompts, meta).float().cpu())
    return torch.cat(scores["chosen"]), torch.cat(scores["rejected"])


def model_mu(model: RewardModel, device="cpu"):
    """score_pairs' scorer for a reward model (put it in eval mode first): its mu."""
    return lambda images, prompts, meta: model(images.to(device), prompts)[0]


def accuracy_report(mu_c: torch.Tensor, mu_r: torch.Tensor, kinds: list[list[str]]) -> dict:
    """Pairwise accuracy overall, per perturbation kind (single-perturbation pairs) and per number of perturbations,
    like the SpatialScore paper's Table 1."""
    by_kind, by_n = {}, {"1": [], "2-3": []}
    for i, ks in enumerate(kinds):
        if len(ks) == 1:
            by_kind.setdefault(ks[0], []).append(i)
        if ks:
            by_n["1" if len(ks) == 1 else "2-3"].append(i)

    def acc(rows: list[int]) -> float:
        index = torch.tensor(rows, dtype=torch.long)
        return pairwise_accuracy(mu_c[index], mu_r[index])

    return {"overall": pairwise_accuracy(mu_c, mu_r), "n_pairs": len(mu_c),
            "by_kind": {k: acc(v) for k, v in sorted(by_kind.items())},
            "by_n": {k: acc(v) for k, v in by_n.items() if v}}


def load_data(cfg: RewardConfig, split: str, progress: bool) -> PairTensors:
    path = cfg.data.train if split == "train" else cfg.data.val
    size = cfg.data.image_size or cfg.model.image_size
    if path:
        return file_pairs(path, size)
    n, seed = (cfg.data.n_train, cfg.data.seed) if split == "train" else (cfg.data.n_val, cfg.data.val_seed)
    dense = split == "train" and cfg.train.aux_weight > 0 and cfg.model.arch == "relation"
    return generated_pairs(n, seed, cfg.data.style, cfg.data.phrasing, size,
                           target_grid=cfg.model.grid if dense else 0,
                           tag_weights=dict(cfg.data.tag_weights) if split == "train" else None, progress=progress,
                           rough=cfg.data.rough if split == "train" else 0.0)


def _both_targets(data: PairTensors, index: torch.Tensor, device) -> dict[str, torch.Tensor] | None:
    """Cell targets of the chosen then the rejected images, matching the order of the image batch, and which of
    those images are faithful to their prompt."""
    chosen, rejected = data.cell_targets("chosen", index), data.cell_targets("rejected", index)
    if chosen is None:
        return None
    both = {k: torch.cat([chosen[k], rejected[k]]).to(device) for k in chosen}
    both["faithful"] = torch.cat([torch.ones(len(index)), torch.zeros(len(index))]).bool().to(device)
    return both


def warm_start(model: RewardModel, init: str) -> None:
    """model.init: copy every saved weight of a trained model of the same architecture and shape (fine-tuning)."""
    from spatialscore.config import project_path
    from spatialscore.models.base import load_model

    try:
        source = load_model(project_path(init))
    except SpatialScoreError as err:
        raise SpatialScoreError(f"model.init: {err}") from None
    if source.arch != model.arch:
        raise SpatialScoreError(f"model.init: {init} is a {source.arch!r} model; this recipe builds {model.arch!r}")
    saved = source.saved_state()
    try:
        missing, unexpected = model.load_state_dict(saved, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise SpatialScoreError(f"model.init: {init} does not fit this recipe's model ({first}); the model "
                                f"settings must match the ones it was trained with") from None
    if unexpected or set(model.saved_state()) & set(missing):
        raise SpatialScoreError(f"model.init: {init} does not fit this recipe's model (missing "
                                f"{sorted(set(model.saved_state()) & set(missing))[:3]}, unexpected "
                                f"{sorted(unexpected)[:3]}); the model settings must match the ones it was "
                                f"trained with")


def train_reward(cfg: RewardConfig, out: Path, resume: str | None = None, deepspeed: str | None = None,
                 precision: str = "no", progress: bool = True) -> dict:
    t = cfg.train
    accelerator = make_accelerator(t.grad_accum, precision, deepspeed)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if t.batch_size % (t.grad_accum * world):
        raise SpatialScoreError(f"train.batch_size={t.batch_size} must divide evenly over grad_accum={t.grad_accum} "
                                f"x {world} processes")
    micro = t.batch_size // (t.grad_accum * world)
    zero_stage = None
    if deepspeed:  # accelerate infers these from a DataLoader, and this loop has none
        plugin = accelerator.state.deepspeed_plugin
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro, gradient_clipping=t.max_grad_norm)
        zero_stage = plugin.zero_stage
    seed_everything(t.seed)
    model: RewardModel = build_model(dataclasses.asdict(cfg.model))
    if cfg.model.init and not resume:
        warm_start(model, cfg.model.init)
    with accelerator.main_process_first():
        train_data, val_data = load_data(cfg, "train", progress and main), load_data(cfg, "val", progress and main)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    start, resume_from = 0, resolve_resume(resume) if resume else None
    if resume_from:
        start = load_checkpoint(resume_from, model, optimizer, zero_stage, world)["step"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    launch = {"world_size": world, "zero_stage": zero_stage, "precision": precision}
    log = MetricLog(out, {**dataclasses.asdict(cfg), "launch": launch}, cfg.report_to, enabled=main,
                    resumed=bool(resume_from))
    log.log(start, {"world_size": world, "micro_batch": micro, "resumed_from": start})
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from and deepspeed:  # DeepSpeed builds its partitioned optimizer state in prepare
        load_zero_partition(resume_from, optimizer.optimizer, rank, world)
    bar = tqdm(total=t.steps, initial=start, desc="train-reward", unit="step", disable=not (progress and main))
    report: dict = {}

    def save(step: int, directory: Path | None = None) -> None:
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every process must call it
        # accelerate wraps the torch optimizer; DeepSpeed's is partitioned, so every process writes its part
        staged = None
        if deepspeed and directory is None:
            staged = stage_zero_checkpoint(accelerator, out, step, optimizer.optimizer)
        if main:
            unwrapped = accelerator.unwrap_model(model)
            kept = {k: state[k] for k in unwrapped.saved_state()}
            holder = _Saved(unwrapped, kept)
            if directory is None:
                save_checkpoint(out, step, holder, None if deepspeed else optimizer.optimizer,
                                {"world_size": world, "zero_stage": zero_stage}, staged)
            else:
                save_model(holder, directory)
        accelerator.wait_for_everyone()

    for step in range(start, t.steps):
        lr = lr_at(step, t.lr, t.warmup, t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = batch_indices(len(train_data), t.batch_size, t.seed, step)
        losses = []
        for k in range(t.grad_accum):
            part = index[(k * world + rank) * micro:(k * world + rank + 1) * micro]
            prompts = [train_data.prompts[i] for i in part.tolist()]
            images = torch.cat([train_data.images("chosen", part), train_data.images("rejected", part)])
            targets = _both_targets(train_data, part, accelerator.device) if t.aux_weight > 0 else None
            with accelerator.accumulate(model), accelerator.autocast():
                mu, sigma, *aux = model(images.to(accelerator.device), prompts + prompts, targets=targets)
                preference = pair_loss(t.loss, mu[:micro], sigma[:micro], mu[micro:], sigma[micro:])
                loss = preference + t.aux_weight * aux[0] if aux else preference
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(torch.stack([loss.detach(), preference.detach()]))
        mean_loss, mean_preference = accelerator.reduce(torch.stack(losses).mean(0), reduction="mean").tolist()
        if not math.isfinite(mean_loss):
            last = checkpoints(out)
            where = f"the last good checkpoint is {last[-1].path}" if last else "no checkpoint was written yet"
            raise SpatialScoreError(f"the loss became {mean_loss} at step {step + 1}; stopping ({where}). "
                                    f"Try a lower train.lr or train.max_grad_norm.")
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", preference=f"{mean_preference:.4f}")
        done = step + 1
        metrics = {"loss": mean_loss, "preference_loss": mean_preference, "lr": lr}
        if done % t.eval_every == 0 or done == t.steps:
            unwrapped = accelerator.unwrap_model(model).eval()
            mu_c, mu_r = score_pairs(model_mu(unwrapped, accelerator.device), val_data)
            unwrapped.train()
            report = accuracy_report(mu_c, mu_r, val_data.kinds)
            metrics |= {"val_accuracy": report["overall"], **{f"val_{k}": v for k, v in report["by_kind"].items()}}
            if main:
                tqdm.write(f"step {done}: loss {mean_loss:.4f} (preference {mean_preference:.4f})  held-out accuracy {report['overall']:.4f}  "
                           + "  ".join(f"{k} {v:.3f}" for k, v in report["by_kind"].items()))
        log.log(done, metrics)
        if done % t.save_every == 0 or done == t.steps:
            save(done)
    bar.close()
    save(t.steps, out / "final")
    in_sync = log_ranks(accelerator, model, out)
    log.close()
    shutdown(accelerator, model, optimizer)
    return {"out": str(out), "steps": t.steps, "world_size": world, "weights_in_sync": in_sync,
            "final_loss": mean_loss if t.steps > start else None,
            "validation": report}


class _Saved:
    """A model's config and arch with an explicit set of tensors (what save_model needs), for gathered states."""

    def __init__(self, model: RewardModel, tensors: dict[str, torch.Tensor]):
        self.config, self.arch, self._tensors = model.config, model.arch, tensors

    def saved_state(self) -> dict[str, torch.Tensor]:
        return self._tensors
