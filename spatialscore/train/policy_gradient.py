"""Online policy-gradient RL for text-to-image pipelines, shared by Flow-GRPO (flow_grpo.py) and DDPO (ddpo.py).

One iteration: draw prompts; sample G images per prompt with the pipeline's stochastic sampler (train/sde.py: the
Flow-GRPO SDE for flow-matching models, DDIM with eta > 0 for UNets), keeping every step's latents and
log-probability; score the images with the reward heads; turn rewards into advantages (the algorithm's part: group
standardisation and top-k filtering for Flow-GRPO, per-prompt statistics for DDPO); then update the LoRA with the
clipped PPO objective on a subset of the denoising steps, plus beta * KL to the reference policy (the same pipeline
with the LoRA disabled). Everything random is drawn from generators seeded by (seed, iteration, process), so a
resumed run replays the uninterrupted one exactly.

Distributed: every process samples its share of the prompts (whole groups, so group statistics are local) and trains
on its samples; accelerate (DDP or DeepSpeed ZeRO) averages the LoRA gradients. Each process runs the same number of
forward/backward passes: a sample whose reward is not finite is kept in its micro-batch with weight 0.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from spatialscore.config import GrpoConfig, project_path, save_config  # DdpoConfig has the same fields
from spatialscore.errors import SpatialScoreError
from spatialscore.io import atomic_write_text
from spatialscore.train.losses import clipped_policy_loss, gaussian_step_kl

log = logging.getLogger(__name__)
PATH_KWARGS = ("checkpoint", "pretrained")  # reward-head arguments that name local directories


@dataclass
class Trajectories:
    latents: torch.Tensor  # [N, T + 1, ...]: the initial noise, then every step's sample
    log_probs: torch.Tensor  # [N, T]: log-probability of each step under the sampling policy
    schedule: object  # sde.FlowSchedule | sde.DDIMSchedule: the steps' times and noise
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]


@torch.no_grad()
def sample_trajectories(policy, cond: dict[str, torch.Tensor], steps: int, noise: float,
                        generator: torch.Generator, batch_size: int = 64, shared_start: int = 1,
                        sde_steps: list[int] | None = None) -> Trajectories:
    """Stochastic sampling (`noise`: the SDE's noise level, or DDIM's eta) with the log-probability of every step, in
    batches of `batch_size`; the noise is drawn from `generator` image by image in order, so it does not depend on
    the batching. `shared_start` > 1: each run of that many consecutive images (a group) starts from one initial
    latent, so what tells them apart is only the sampler's step noise, the part the policy's log-probability
    accounts for (an object's place is mostly fixed by the initial latent, which no step's log-probability sees).
    `sde_steps`: only these steps are stochastic, the others deterministic ODE steps with log-probability 0."""
    schedule = policy.schedule(steps, noise)
    n = next(iter(cond.values())).shape[0]
    if n % shared_start:
        raise SpatialScoreError(f"{n} images do not split into groups of {shared_start} sharing an initial latent")
    initial = policy.initial_noise(n // shared_start, generator).repeat_interleave(shared_start, 0)
    step_noise = torch.randn((steps, *initial.shape), generator=generator)
    latents, log_probs = [], []
    for start in range(0, n, batch_size):
        part = slice(start, min(n, start + batch_size))
        x = initial[part]
        path, lps = [x], []
        sub = policy.select(cond, part)
        for i in range(steps):
            output = policy.predict(x, schedule.model_time(i), sub)
            if sde_steps is None or i in sde_steps:
                x, lp, _, _ = schedule.step(i, x, output, noise=step_noise[i, part])
            else:
                x, lp = schedule.ode_step(i, x, output), torch.zeros(len(x))
            path.append(x)
            lps.append(lp)
        latents.append(torch.stack(path, 1))
        log_probs.append(torch.stack(lps, 1))
    latents_all = torch.cat(latents)
    return Trajectories(latents_all, torch.cat(log_probs), schedule, policy.decode(latents_all[:, -1]))


def step_log_prob(policy, traj_latents: torch.Tensor, j: int, schedule, cond: dict[str, torch.Tensor],
                  denoiser=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability, mean, std) of the stored step j -> j + 1 under the current weights (or `denoiser`)."""
    output = policy.predict(traj_latents[:, j], schedule.model_time(j), cond, denoiser)
    _, lp, mean, std = schedule.step(j, traj_latents[:, j], output, next_sample=traj_latents[:, j + 1])
    return lp, mean, std


# --- prompts and rewards ------------------------------------------------------------------------------------------

def _shapes_prompts(n: int, key: str, style: str, phrasing: str, weights: dict[str, float]) -> list[dict]:
    from spatialscore.data.prompts import PromptWriter

    writer = PromptWriter(random.Random(key), phrasing)
    return [writer.sample(style, dict(weights)) for _ in range(n)]


def _file_prompts(path: str, field: str) -> list[dict]:
    """GenEval-style prompt-metadata JSONL (validated line by line), or a .txt file with one prompt per line
    (prompts without metadata: heads that judge clauses, and the oracle, cannot score them)."""
    from spatialscore.data.formats import load_prompts

    path = project_path(path)
    if Path(path).suffix == ".txt":
        if not Path(path).is_file():
            raise SpatialScoreError(f"{field}: {path}: no such file")
        records = [{"prompt": line.strip()} for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        records = load_prompts(path)
    if not records:
        raise SpatialScoreError(f"{field}: {path}: the prompt file holds no prompts")
    return records


class PromptSource:
    """Training prompts for each iteration and the fixed evaluation set; training never draws an evaluation prompt."""

    MAX_DRAWS = 200  # batches of training prompts drawn per iteration before the set is declared exhausted

    def __init__(self, cfg: GrpoConfig):
        p = self.cfg = cfg.prompts
        self.seed = cfg.train.seed
        if p.eval_file:
            self.eval = _file_prompts(p.eval_file, "prompts.eval_file")
        else:
            self.eval = _shapes_prompts(p.eval_n, f"grpo-eval-{p.eval_seed}", p.style, p.phrasing,
                                        p.eval_tag_weights if p.eval_tag_weights is not None else p.tag_weights)
        held_out = {r["prompt"] for r in self.eval}
        self.pool = None
        if p.file:
            self.pool = [r for r in _file_prompts(p.file, "prompts.file") if r["prompt"] not in held_out]
            if not self.pool:
                raise SpatialScoreError(f"prompts.file: {p.file}: every prompt is also an evaluation prompt")
        self.held_out = held_out
        self.for_iteration(0, cfg.sample.prompts_per_iter)  # an exhausted tag mix fails here, before the run starts

    def for_iteration(self, iteration: int, n: int) -> list[dict]:
        rng = random.Random(f"grpo-train-{self.seed}-{iteration}")
        if self.pool is not None:
            return [rng.choice(self.pool) for _ in range(n)]
        out: list[dict] = []
        for draw in range(self.MAX_DRAWS):  # a new key every draw: a batch of held-out prompts is not drawn again
            batch = _shapes_prompts(n, f"grpo-train-{self.seed}-{iteration}-{draw}", self.cfg.style,
                                    self.cfg.phrasing, self.cfg.tag_weights)
            out += [r for r in batch if r["prompt"] not in self.held_out]
            if len(out) >= n:
                return out[:n]
        raise SpatialScoreError(
            f"prompts: {self.MAX_DRAWS * n} training prompts drawn for iteration {iteration} gave only {len(out)} of "
            f"{n} that are not evaluation prompts: the evaluation set (prompts.eval_n={self.cfg.eval_n}) holds "
            f"(almost) every prompt that prompts.tag_weights can make (single_object has only a dozen); give weight "
            f"to tags with more prompts, or a smaller prompts.eval_n")


def build_reward(cfg: GrpoConfig):
    """One registered head as is, or a weighted composite with per-head running normalisation."""
    from spatialscore.heads import get_head, head_names
    from spatialscore.heads.composite import CompositeReward

    remote = {}
    if cfg.reward.remote:  # the server built its heads (reward.kwargs are its business); weights apply here
        from spatialscore.serve.client import RemoteReward

        if cfg.reward.kwargs:
            log.warning("reward.kwargs are not used with reward.remote: the server at %s built its heads",
                        cfg.reward.remote)
        remote = {name: RemoteReward(cfg.reward.remote, name, token_file=cfg.reward.token_file)
                  for name in cfg.reward.heads}
    for name in cfg.reward.heads:
        if name not in remote and name not in head_names():
            raise SpatialScoreError(f"reward.heads: unknown reward head {name!r}; registered: {', '.join(head_names())}")
    unknown = set(cfg.reward.kwargs) - set(cfg.reward.heads)
    if unknown:
        raise SpatialScoreError(f"reward.kwargs: {sorted(unknown)} are not among reward.heads {sorted(cfg.reward.heads)}")
    kwargs = {name: {k: project_path(v) if k in PATH_KWARGS and isinstance(v, str) else v for k, v in given.items()}
              for name, given in cfg.reward.kwargs.items()}
    if len(cfg.reward.heads) == 1:
        (name, weight), = cfg.reward.heads.items()
        head = remote.get(name) or get_head(name, **kwargs.get(name, {}))
        return head if weight == 1 else CompositeReward({name: weight}, normalize=False, heads={name: head})
    return CompositeReward(dict(cfg.reward.heads), head_kwargs=kwargs, heads=remote)


def score_images(reward, images: torch.Tensor, records: list[dict], size: int | None = None) -> torch.Tensor:
    """Rewards [N] (float; may hold NaN/inf, which the caller drops), the images resized to the head's input size
    when it has one."""
    if size and images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                                 antialias=True)
    return reward(images, [r["prompt"] for r in records], records).scores.float()


def head_image_size(reward) -> int | None:
    model = getattr(reward, "model", None)
    if model is not None and hasattr(model, "config"):
        return int(model.config.get("image_size", 0)) or None
    return getattr(reward, "image_size", None)  # a RemoteReward: its server's head's


# --- the pipeline, LoRA and checkpoints ----------------------------------------------------------------------------

def load_pipeline(cfg: GrpoConfig, kinds: tuple[str, ...], algorithm: str):
    """The pipeline named by model.pipeline (a local directory of one of `kinds`) or a tiny random one (model.tiny),
    frozen."""
    from spatialscore.models.generators import load_pipeline_dir, tiny_pipeline

    if cfg.model.tiny:
        pipe = tiny_pipeline(cfg.model.tiny)
        if type(pipe).__name__ not in kinds:
            raise SpatialScoreError(f"model.tiny: {cfg.model.tiny} is a {type(pipe).__name__}; {algorithm} trains "
                                    f"{', '.join(kinds)}")
    else:
        dtype = torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32
        pipe = load_pipeline_dir(project_path(cfg.model.pipeline), "model.pipeline", kinds, algorithm, dtype)
    if cfg.model.precision == "bf16":
        pipe.to(dtype=torch.bfloat16)
    for name in ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(denoiser, cfg: GrpoConfig):
    """Wrap the denoiser with a peft LoRA (fp32 adapter weights); the reference policy is the same module with the
    adapter disabled."""
    from peft import LoraConfig, get_peft_model

    m = cfg.model
    names = [n for n, _ in denoiser.named_modules()]
    targets = [t for t in m.lora_target_modules if any(n.endswith(t) for n in names)]
    if not targets:
        raise SpatialScoreError(f"model.lora_target_modules: none of {m.lora_target_modules} names a module "
                                f"of {type(denoiser).__name__}")
    layers = {}
    if m.lora_layers is not None:
        block = re.compile(rf"(?:^|.*?\.){re.escape(m.lora_layers_pattern)}\.(\d+)\.")  # peft's own layer match
        found = {int(hit.group(1)) for n in names if (hit := block.match(n)) and any(n.endswith(t) for t in targets)}
        if missing := sorted(set(m.lora_layers) - found):
            raise SpatialScoreError(f"model.lora_layers: {type(denoiser).__name__} has no block {missing} of "
                                    f"'{m.lora_layers_pattern}' (model.lora_layers_pattern) with a LoRA target; "
                                    f"it has {sorted(found) or 'none'}")
        layers = {"layers_to_transform": list(m.lora_layers), "layers_pattern": m.lora_layers_pattern}
    lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=targets,
                      init_lora_weights="gaussian", **layers)
    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(denoiser, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def load_lora_state(model, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    if getattr(result, "unexpected_keys", None):
        raise SpatialScoreError(f"the checkpoint's LoRA does not fit this model (unexpected "
                                f"{sorted(result.unexpected_keys)[:3]})")


def _write_lora(tensors: dict[str, torch.Tensor]):
    from safetensors.torch import save

    from spatialscore.io import atomic_write_bytes

    return lambda _model, directory: atomic_write_bytes(Path(directory) / "lora.safetensors", save(tensors))


def _read_lora(path: Path, model) -> None:
    from safetensors.torch import load_file

    file = Path(path) / "lora.safetensors"
    if not file.is_file():
        raise SpatialScoreError(f"--resume {path}: no lora.safetensors (not a train-grpo checkpoint?)")
    load_lora_state(model, load_file(str(file)))


def save_final(pipe, peft_model, cfg: GrpoConfig, directory: Path) -> None:
    """final/lora (peft adapter directory) and, for small models, final/pipeline: the base with the LoRA merged,
    an ordinary diffusers pipeline directory. Each is written under a temporary name and renamed."""
    import os
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".lora.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(directory / "lora", ignore_errors=True)
    os.replace(tmp, directory / "lora")
    if cfg.train.save_merged:
        from spatialscore.models.generators import rebuilt
        from spatialscore.train.generator import save_pipeline

        merged = copy.deepcopy(peft_model).merge_and_unload()
        name = "unet" if "unet" in pipe.components else "transformer"
        save_pipeline(rebuilt(pipe, **{name: merged}), directory / "pipeline", dtype=torch.float32)


# --- evaluation ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_ode(policy, cond: dict[str, torch.Tensor], steps: int, noise: torch.Tensor,
               batch_size: int = 64) -> torch.Tensor:
    """Deterministic sampling (Euler for flows, DDIM with eta 0 for UNets: what the pipeline call does) from the
    given initial noise: images [N, 3, H, W]."""
    schedule = policy.schedule(steps, 0.0)
    out = []
    for start in range(0, len(noise), batch_size):
        part = slice(start, start + batch_size)
        x, sub = noise[part], policy.select(cond, part)
        for i in range(steps):
            x = schedule.ode_step(i, x, policy.predict(x, schedule.model_time(i), sub))
        out.append(policy.decode(x))
    return torch.cat(out)


def _judgeable(record: dict) -> bool:
    from spatialscore.eval.benchmarks import in_shapes_world

    return in_shapes_world(record)


def evaluate_policy(policy, reward, size, records: list[dict], cfg: GrpoConfig, accelerator) -> tuple[dict, torch.Tensor]:
    """Held-out evaluation over all processes: ODE samples of every prompt (noise fixed per prompt index), their
    mean reward and, where the prompts carry metadata, the oracle's accuracy overall and per tag. Returns the
    report and this process's first images (for the grid)."""
    from spatialscore.eval.generation import oracle_accuracy

    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(records), world))
    per = math.ceil(len(records) / world)
    passed = torch.full((per,), -1.0)
    rewards = torch.full((per,), float("nan"))
    index = torch.full((per,), -1, dtype=torch.long)
    images = torch.zeros(0)
    if mine:
        local = [records[i] for i in mine]
        cond = policy.encode([r["prompt"] for r in local])
        noise = torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(10_007 * cfg.prompts.eval_seed + i))
                           for i in mine])
        images = sample_ode(policy, cond, cfg.sample.eval_steps, noise, cfg.sample.batch_size)
        rewards[:len(mine)] = score_images(reward, images, local, size)
        judged = [k for k, r in enumerate(local) if _judgeable(r)]
        if judged:
            report = oracle_accuracy(images[judged], [local[k] for k in judged])
            for k, ok in zip(judged, report["passed"]):
                passed[k] = float(ok)
        index[:len(mine)] = torch.tensor(mine)
    passed, rewards, index = (accelerator.gather(t) for t in (passed, rewards, index))
    valid = index >= 0
    result = {"reward_mean": float(rewards[valid & torch.isfinite(rewards)].mean())}
    oracle = valid & (passed >= 0)
    if oracle.any():
        result["oracle_accuracy"] = float(passed[oracle].mean())
        by_tag: dict[str, list[float]] = {}
        for i, ok in zip(index[oracle].tolist(), passed[oracle].tolist()):
            by_tag.setdefault(records[i].get("tag", "?"), []).append(ok)
        result["by_tag"] = {tag: sum(v) / len(v) for tag, v in sorted(by_tag.items())}
    return result, images


def _train_oracle(images: torch.Tensor, records: list[dict], accelerator) -> float | None:
    """The oracle's pass rate on this iteration's training samples, over all processes (shapes-world prompts only):
    whether the optimised reward and the truth move together while training, between the held-out evaluations."""
    from spatialscore.eval.generation import oracle_accuracy

    judged = [k for k, r in enumerate(records) if _judgeable(r)]
    passed = oracle_accuracy(images[judged], [records[k] for k in judged])["passed"] if judged else []
    totals = accelerator.reduce(torch.tensor([float(sum(passed)), float(len(passed))]), "sum")
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def hacking_check(report: dict, base: dict, tolerance: float) -> bool:
    """Reward hacking: the optimised reward rose above the base's while the oracle fell by more than `tolerance`."""
    if "oracle_accuracy" not in report or "oracle_accuracy" not in base:
        return False
    return (report["reward_mean"] > base["reward_mean"]
            and report["oracle_accuracy"] < base["oracle_accuracy"] - tolerance)


# --- the trainer --------------------------------------------------------------------------------------------------

def trained_timesteps(cfg: GrpoConfig, generator: torch.Generator) -> list[int]:
    if cfg.train.timesteps:
        return list(cfg.train.timesteps)
    count = max(1, math.ceil(cfg.train.timestep_fraction * cfg.sample.steps))
    return torch.randperm(cfg.sample.steps, generator=generator)[:count].tolist()


def _seed(cfg: GrpoConfig, *parts: int) -> int:
    value = cfg.train.seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2 ** 63)
    return value


def _fill_non_finite(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards with each non-finite entry replaced by its group's finite mean, finite mask)."""
    finite = torch.isfinite(rewards)
    groups, ok = rewards.view(-1, group_size).clone(), finite.view(-1, group_size)
    for g in range(len(groups)):
        fill = groups[g][ok[g]].mean() if ok[g].any() else torch.tensor(0.0)
        groups[g][~ok[g]] = fill
    return groups.flatten(), finite


class LoraTraining:
    """The runtime every generator trainer shares: accelerate / DeepSpeed, a LoRA on the pipeline's denoiser and its
    optimizer, exact resume, atomic checkpoints (the LoRA, the optimizer or its ZeRO partitions, RNG streams and the
    trainer's JSON state), the metric log, and the final save (fresh pipeline + gathered LoRA, so ZeRO-3 shards never
    reach the files)."""

    def __init__(self, cfg, out: Path, pipelines: tuple[str, ...], algorithm: str, guidance_scale: float,
                 grad_accum: int, micro_batch: int, lr: float, weight_decay: float, max_grad_norm: float,
                 resume: str | None, deepspeed: str | None, precision: str):
        from spatialscore.models.generators import policy_for
        from spatialscore.train.runtime import load_checkpoint, make_accelerator, resolve_resume

        self.cfg, self.out, self.pipelines, self.algorithm = cfg, Path(out), pipelines, algorithm
        self.deepspeed = deepspeed
        self.accelerator = make_accelerator(grad_accum, precision, deepspeed)
        acc = self.accelerator
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.zero_stage = None
        if deepspeed:  # accelerate infers these from a DataLoader, and these loops have none
            plugin = acc.state.deepspeed_plugin
            plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_clipping=max_grad_norm)
            self.zero_stage = plugin.zero_stage
        self.pipe = load_pipeline(cfg, pipelines, algorithm)
        self.policy = policy_for(self.pipe, guidance_scale, cfg.model.image_size)
        self.peft_model = add_lora(self.policy.denoiser, cfg)
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.resume_from = resolve_resume(resume) if resume else None
        self.state: dict = {}
        if self.resume_from:
            self.state = load_checkpoint(self.resume_from, self.peft_model, self.optimizer, self.zero_stage,
                                         self.world, read_model=_read_lora)
        self.start = self.state.get("step", 0)

    def begin(self, first_metrics: dict):
        """Create the run directory, log the start, prepare model and optimizer; returns the prepared model."""
        from spatialscore.train.runtime import MetricLog, load_zero_partition

        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out)
        launch = {"world_size": self.world, "zero_stage": self.zero_stage, "algorithm": self.algorithm}
        self.log = MetricLog(self.out, {**dataclasses.asdict(self.cfg), "launch": launch}, self.cfg.report_to,
                             enabled=self.main, resumed=bool(self.resume_from))
        self.log.log(self.start, {"world_size": self.world, "resumed_from": self.start, **first_metrics})
        self.model, self.optimizer = self.accelerator.prepare(self.peft_model, self.optimizer)
        if self.resume_from and self.deepspeed:  # DeepSpeed builds its partitioned optimizer state in prepare
            load_zero_partition(self.resume_from, self.optimizer.optimizer, self.rank, self.world)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.policy.denoiser = self.model
        return self.model

    def save(self, step: int, extra: dict) -> None:
        """checkpoints/step-N; call on every process (ZeRO gathers and partitions)."""
        from peft import get_peft_model_state_dict

        from spatialscore.train.runtime import save_checkpoint, stage_zero_checkpoint

        full = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards
        staged = (stage_zero_checkpoint(self.accelerator, self.out, step, self.optimizer.optimizer)
                  if self.deepspeed else None)
        if self.main:
            tensors = {k: v.detach().cpu().contiguous()
                       for k, v in get_peft_model_state_dict(self.unwrapped, state_dict=full).items()}
            save_checkpoint(self.out, step, self.unwrapped, None if self.deepspeed else self.optimizer.optimizer,
                            {"world_size": self.world, "zero_stage": self.zero_stage, **extra}, staged,
                            write_model=_write_lora(tensors))
        self.accelerator.wait_for_everyone()

    def eval_images(self, images: torch.Tensor, name: str) -> None:
        from spatialscore.eval.generation import save_grid

        if self.main and len(images):
            save_grid(images[:16], self.out / "samples" / f"{name}.png", columns=8)

    def finish(self, result: dict) -> dict:
        """final/ (LoRA + merged pipeline) and result.json on the main process; a clean shutdown everywhere."""
        from spatialscore.models.generators import policy_for
        from spatialscore.train.runtime import shutdown

        from spatialscore.train.runtime import log_ranks

        in_sync = log_ranks(self.accelerator, self.model, self.out)
        full = self.accelerator.get_state_dict(self.model)  # every process calls it
        if self.main:
            fresh = load_pipeline(self.cfg, self.pipelines, self.algorithm)  # frozen weights may be partitioned too
            fresh_lora = add_lora(policy_for(fresh, 1.0).denoiser, self.cfg)
            fresh_lora.load_state_dict({k: v.to(fresh_lora.state_dict()[k].dtype) for k, v in full.items()})
            save_final(fresh, fresh_lora, self.cfg, self.out / "final")
            result = {"out": str(self.out), "world_size": self.world, "weights_in_sync": in_sync, **result}
            atomic_write_text(self.out / "result.json", json.dumps(result, indent=2))
        else:
            result = {"world_size": self.world}
        self.log.close()
        shutdown(self.accelerator, self.model, self.optimizer)
        return result


def eval_line(what: str, report: dict) -> str:
    tags = " ".join(f"{k} {v:.3f}" for k, v in report.get("by_tag", {}).items())
    oracle = f", oracle accuracy {report['oracle_accuracy']:.3f} ({tags})" if "oracle_accuracy" in report else ""
    return f"{what}: held-out reward {report['reward_mean']:.4f}{oracle}"


class Algorithm:
    """What differs between the policy-gradient algorithms: which pipelines they train and how rewards become
    advantages. State (e.g. DDPO's per-prompt statistics) is JSON-able and travels in checkpoints."""

    name = "?"
    pipelines: tuple[str, ...] = ()

    def advantages(self, rewards: torch.Tensor, finite: torch.Tensor, prompts: list[str],
                   cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantage per sample, which samples to train on) for rewards [N] in groups of sample.group_size
        consecutive samples; non-finite rewards are already replaced by their group's mean (`finite` marks them)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_policy(cfg: GrpoConfig, out: Path, algorithm: Algorithm, resume: str | None = None,
                 deepspeed: str | None = None, precision: str = "no", progress: bool = True) -> dict:
    from spatialscore.train.runtime import seed_everything

    t, s = cfg.train, cfg.sample
    n_timesteps = len(t.timesteps) if t.timesteps else max(1, math.ceil(t.timestep_fraction * s.steps))
    seed_everything(t.seed)
    source = PromptSource(cfg)
    reward = build_reward(cfg)
    size = head_image_size(reward)
    run = LoraTraining(cfg, out, algorithm.pipelines, algorithm.name, s.guidance_scale, n_timesteps, t.micro_batch,
                       t.lr, t.weight_decay, t.max_grad_norm, resume, deepspeed, precision)
    accelerator, world, rank, main = run.accelerator, run.world, run.rank, run.main
    if s.prompts_per_iter % world:
        raise SpatialScoreError(f"sample.prompts_per_iter={s.prompts_per_iter} must divide evenly over {world} "
                                f"processes (each process samples whole groups)")
    policy, params, state = run.policy, run.params, run.state
    noise = getattr(s, policy.noise_field)
    if run.resume_from:
        algorithm.load_state_dict(state.get("algorithm_state", {}))
        if state.get("reward_state") and hasattr(reward, "load_state_dict"):
            reward.load_state_dict({k: torch.tensor(v) for k, v in state["reward_state"].items()})
    model = run.begin({})
    optimizer, unwrapped, start = run.optimizer, run.unwrapped, run.start
    local_prompts = s.prompts_per_iter // world
    base_eval = state.get("base_eval")
    evals: list[dict] = list(state.get("evals", []))
    counters = dict(state.get("counters", {"non_finite_rewards": 0, "skipped_steps": 0}))

    def run_eval(iteration: int) -> dict:
        nonlocal base_eval
        report, images = evaluate_policy(policy, reward, size, source.eval, cfg, accelerator)
        report["iteration"] = iteration
        if base_eval is None:
            base_eval = dict(report)
        report["hacking"] = hacking_check(report, base_eval, t.hacking_tolerance)
        run.eval_images(images, f"iter-{iteration:05d}")
        if main:
            tqdm.write(eval_line(f"iteration {iteration}", report))
            if report["hacking"]:
                log.warning("reward hacking suspected at iteration %d: the reward rose (%.4f -> %.4f) while the oracle "
                            "fell (%.3f -> %.3f)", iteration, base_eval["reward_mean"], report["reward_mean"],
                            base_eval["oracle_accuracy"], report["oracle_accuracy"])
        evals.append(report)
        return report

    def save(iteration: int) -> None:
        extra = {"base_eval": base_eval, "evals": evals, "counters": counters,
                 "algorithm_state": algorithm.state_dict()}
        if hasattr(reward, "state_dict"):
            extra["reward_state"] = {k: v.tolist() for k, v in reward.state_dict().items()}
        run.save(iteration, extra)

    if start == 0:
        run_eval(0)
    bar = tqdm(total=t.iterations, initial=start, desc=f"train-{algorithm.name.lower()}", unit="iter", disable=not (progress and main))
    bad_in_a_row = 0
    for iteration in range(start, t.iterations):
        clock = time.perf_counter()
        records = source.for_iteration(iteration, s.prompts_per_iter)[rank * local_prompts:(rank + 1) * local_prompts]
        expanded = [r for r in records for _ in range(s.group_size)]
        cond = policy.encode([r["prompt"] for r in records])
        cond = policy.select(cond, torch.arange(len(records)).repeat_interleave(s.group_size))
        model.eval()
        traj = sample_trajectories(policy, cond, s.steps, noise,
                                   torch.Generator().manual_seed(_seed(cfg, iteration, rank)), s.batch_size,
                                   shared_start=s.group_size if s.same_initial_noise else 1,
                                   sde_steps=s.sde_steps)
        sampled = time.perf_counter()
        rewards = score_images(reward, traj.images, expanded, size)
        scored = time.perf_counter()
        oracle_train = _train_oracle(traj.images, expanded, accelerator) if t.log_train_oracle else None
        filled, finite = _fill_non_finite(rewards, s.group_size)
        if not finite.all():
            counters["non_finite_rewards"] += int((~finite).sum())
            log.warning("iteration %d: %d non-finite rewards dropped (%d so far)", iteration, int((~finite).sum()),
                        counters["non_finite_rewards"])
        advantages, keep = algorithm.advantages(filled, finite, [r["prompt"] for r in expanded], cfg)
        advantages = advantages.clamp(-t.adv_clip, t.adv_clip)
        weights = finite.float()
        selected = keep.nonzero().flatten()
        generator = torch.Generator().manual_seed(_seed(cfg, iteration, 7919))
        timesteps = trained_timesteps(cfg, generator)
        stats: dict[str, list[float]] = {"policy_loss": [], "kl": [], "clipfrac": [], "ratio_dev": []}
        model.train()
        for epoch in range(t.inner_epochs):
            order = selected[torch.randperm(len(selected), generator=generator)]
            for mb_start in range(0, len(order), t.micro_batch):
                mb = order[mb_start:mb_start + t.micro_batch]
                mb_cond = policy.select(cond, mb)
                for j in timesteps:
                    with accelerator.accumulate(model):
                        lp, mean, std = step_log_prob(policy, traj.latents[mb], j, traj.schedule, mb_cond)
                        old = traj.log_probs[mb, j]
                        w = weights[mb]
                        per_sample = clipped_policy_loss(lp, old, advantages[mb], t.clip_range, reduction="none")
                        loss = (per_sample * w).sum() / w.sum().clamp(min=1)
                        kl = torch.zeros(())
                        if t.kl_beta > 0:
                            with torch.no_grad(), unwrapped.disable_adapter():
                                _, ref_mean, _ = step_log_prob(policy, traj.latents[mb], j, traj.schedule, mb_cond,
                                                               denoiser=unwrapped)
                            kl = (gaussian_step_kl(mean, ref_mean, std, reduction="none") * w).sum() / w.sum().clamp(min=1)
                            loss = loss + t.kl_beta * kl
                        bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss))), "sum") > 0
                        if bad:  # keep every process's collectives in step: a zero loss with zero gradients
                            loss = sum(p.sum() for p in params) * 0.0
                        accelerator.backward(loss)
                        skipped = bool(bad)
                        if accelerator.sync_gradients and t.max_grad_norm > 0:
                            norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                            skipped |= norm is not None and not math.isfinite(float(norm))
                        if skipped:
                            optimizer.zero_grad()
                        else:
                            optimizer.step()
                            optimizer.zero_grad()
                    if accelerator.sync_gradients:
                        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
                        counters["skipped_steps"] += int(skipped)
                        if bad_in_a_row >= t.max_bad_steps:
                            raise SpatialScoreError(
                                f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                                f"(iteration {iteration + 1}); stopping. Try a lower train.lr or train.clip_range.")
                    ratio = torch.exp(lp.detach() - old)
                    stats["policy_loss"].append(float(loss.detach()))
                    stats["kl"].append(float(kl.detach()))
                    stats["clipfrac"].append(float(((ratio - 1).abs() > t.clip_range).float().mean()))
                    if epoch == 0 and mb_start == 0:
                        stats["ratio_dev"].append(float((ratio - 1).abs().max()))
        trained = time.perf_counter()
        finite_rewards = rewards[finite]
        mean_reward = accelerator.reduce(torch.tensor([float(finite_rewards.mean()) if len(finite_rewards) else 0.0]),
                                         "mean")
        done = iteration + 1
        metrics = {"reward_mean": float(mean_reward), "reward_std": float(finite_rewards.std()) if len(finite_rewards) > 1 else 0.0,
                   **{k: sum(v) / len(v) for k, v in stats.items() if v}, "first_step_ratio_dev": max(stats["ratio_dev"]),
                   "trained_samples": len(selected), "timesteps": timesteps, **counters,
                   "seconds_sample": sampled - clock, "seconds_reward": scored - sampled,
                   "seconds_train": trained - scored}
        if oracle_train is not None:
            metrics["oracle_train"] = oracle_train
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.2e}")
        if done % t.eval_every == 0 or done == t.iterations:
            report = run_eval(done)
            metrics |= {f"eval_{k}": v for k, v in report.items() if k != "iteration"}
        run.log.log(done, metrics)
        if done % t.save_every == 0 or done == t.iterations:
            save(done)
    bar.close()
    return run.finish({"iterations": t.iterations, "base": base_eval, "final": evals[-1] if evals else None,
                       "evals": evals, "hacking_detected": any(e.get("hacking") for e in evals), **counters})
