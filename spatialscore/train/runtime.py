"""What every trainer shares: the accelerate/DeepSpeed set-up, atomic checkpoints with exact resume, and metric logs.

A checkpoint is a directory `checkpoints/step-N/` holding the model (`config.json` + `model.safetensors`, loadable by
`models.base.load_model`), `optimizer.safetensors`, `rng.safetensors` and `state.json`. It is written under a
temporary name and renamed into place, so a crash or SIGKILL leaves either the previous checkpoint or a complete new
one. Resuming restores weights, optimizer moments, RNG streams and the step; the data order is a pure function of
(seed, step), so a resumed run replays exactly the batches the uninterrupted run would have seen.

Under DeepSpeed ZeRO the optimizer state is partitioned over the processes, so instead of `optimizer.safetensors`
each process writes its own part, `optimizer-rank{R}.safetensors` (tensors) + `optimizer-rank{R}.json` (the rest),
into the temporary directory before the main process renames it; such a checkpoint resumes only with the same
ZeRO stage and number of processes. Nothing is pickled: DeepSpeed's own checkpoints are torch pickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from spatialscore.errors import SpatialScoreError
from spatialscore.io import atomic_write_text
from spatialscore.launch import DEEPSPEED_PRESETS, ENV_DEEPSPEED_CONFIG, LAUNCH_DIR, worker_started



def make_accelerator(grad_accum: int, precision: str = "no", deepspeed: str | None = None):
    """An Accelerator for this machine: gloo on CPU, the DeepSpeed preset `launch/deepspeed/<name>.json` if asked."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

    kwargs = {}
    if deepspeed:
        if deepspeed not in DEEPSPEED_PRESETS:
            raise SpatialScoreError(f"--launch {deepspeed}: unknown preset; choose from {', '.join(DEEPSPEED_PRESETS)}")
        if not torch.cuda.is_available():
            # the shm comm op takes ~20 s to compile on first use on CPU and gloo does not need it
            import importlib

            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # the preset with its "auto" values filled from the recipe by the launching process, else the preset itself
        config = json.loads(Path(os.environ.get(ENV_DEEPSPEED_CONFIG) or LAUNCH_DIR / "deepspeed" / f"{deepspeed}.json")
                            .read_text())
        if not torch.cuda.is_available() and isinstance(config.get("bf16"), dict):
            config["bf16"]["enabled"] = False  # DeepSpeed's bf16 optimizer needs CUDA; on CPU it trains in fp32
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config, gradient_accumulation_steps=grad_accum)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    if deepspeed and not torch.cuda.is_available():
        precision = "no"  # DeepSpeed's bf16 optimizer needs CUDA; on CPU it trains in fp32
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=precision,
                              kwargs_handlers=handlers, **kwargs)
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        # accelerate drops the plugin silently (e.g. under ACCELERATE_USE_CPU) and would train plain DDP instead
        raise SpatialScoreError(f"--launch {deepspeed}: accelerate did not start DeepSpeed (it runs "
                                f"{accelerator.distributed_type.value}); unset ACCELERATE_USE_CPU")
    worker_started(accelerator.num_processes)
    return accelerator


def shutdown(accelerator, *objects) -> None:
    """End a run so every process exits cleanly: DeepSpeed processes on CPU abort (SIGABRT) at exit about half the
    time unless the engine is released and collected before the process group is destroyed."""
    import gc

    accelerator.wait_for_everyone()
    accelerator.free_memory(*objects)
    del objects
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def ranks_report(accelerator, model) -> list[dict]:
    """Every process's (rank, node, pid, SHA-256 of its trainable weights), gathered on all processes: evidence that
    each rank took part and that the replicas ended identical. Under ZeRO the full weights are all-gathered from the
    partitions by construction (ZeRO-3's are gathered a parameter at a time for the hash), so agreement is guaranteed
    there and the check has teeth for DDP. Sent as integer tensors, never pickled."""
    import hashlib
    import socket

    params = [p for p in model.parameters() if p.requires_grad]
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    gathered = contextlib.nullcontext
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        gathered = lambda p: deepspeed.zero.GatheredParameters([p])  # noqa: E731  (one at a time: bounded memory)
    digest = hashlib.sha256()
    with torch.no_grad():
        for p in params:
            with gathered(p):
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:6], "big")
    node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
    mine = torch.tensor([accelerator.process_index, node, os.getpid(), host, *digest.digest()], dtype=torch.int64)
    rows = accelerator.gather(mine.to(accelerator.device)[None]).cpu().view(-1, mine.numel()).tolist()
    return [{"rank": r[0], "node": r[1], "pid": r[2], "host": f"{r[3]:012x}", "weights_sha256": bytes(r[4:]).hex()}
            for r in rows]


def log_ranks(accelerator, model, out: Path) -> bool:
    """ranks_report written to `<out>/ranks.json` by the main process; whether all replicas hold the same weights (a
    warning if not). Under ZeRO the replicas are all-gathered by construction, so the check has teeth for DDP."""
    ranks = ranks_report(accelerator, model)
    in_sync = len({r["weights_sha256"] for r in ranks}) == 1
    if accelerator.is_main_process:
        atomic_write_text(Path(out) / "ranks.json", json.dumps({"weights_in_sync": in_sync, "ranks": ranks},
                                                               indent=2) + "\n")
        if not in_sync:
            print(f"warning: the {len(ranks)} processes ended with different weights: {ranks}", file=sys.stderr)
    return in_sync


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"python": json.loads(json.dumps(random.getstate(), default=list)),
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, state in sd["state"].items() for k, v in state.items()}
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first (temporary directories of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        if d.name.split("-", 1)[1].isdigit() and (d / "state.json").is_file():
            found.append(Checkpoint(d, int(d.name.split("-", 1)[1])))
    return sorted(found, key=lambda c: c.step)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, extra: dict | None = None,
                    staged: Path | None = None, write_model=None) -> Path:
    """Write checkpoints/step-N atomically (directory rename); the model via `write_model(model, directory)`
    (default models.base.save_model). `staged` is the temporary directory other processes already wrote their parts
    into (see stage_zero_checkpoint)."""
    from spatialscore.models.base import save_model

    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    tmp = staged or final.with_name(f".tmp-step-{step}-{os.getpid()}")
    if staged is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    (write_model or save_model)(model, tmp)
    if optimizer is not None:
        opt_tensors, groups = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    else:
        groups = None
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"step": step, "param_groups": groups, "rng": rng_meta, "time": time.time(), **(extra or {})}
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path, model, optimizer, zero_stage: int | None = None, world_size: int = 1,
                    read_model=None) -> dict:
    """Restore model weights (via `read_model(path, model)`, default models.base.load_model), optimizer moments and
    RNG streams; returns state.json. Under DeepSpeed (`zero_stage`) the optimizer state comes later, from
    load_zero_partition once the engine exists."""
    from spatialscore.models.base import load_model

    path = Path(path)
    if not (path / "state.json").is_file():
        raise SpatialScoreError(f"--resume {path}: not a checkpoint (no state.json); "
                                f"give a run directory or one of its checkpoints/step-N")
    state = json.loads((path / "state.json").read_text())
    saved_stage = state.get("zero_stage")
    if saved_stage != zero_stage:
        raise SpatialScoreError(f"--resume {path}: the checkpoint holds optimizer state for ZeRO stage "
                                f"{saved_stage or 'none (no DeepSpeed)'} but this run uses ZeRO stage "
                                f"{zero_stage or 'none (no DeepSpeed)'}; resume with the --launch it was saved with")
    if zero_stage is not None and state.get("world_size") != world_size:
        raise SpatialScoreError(f"--resume {path}: the checkpoint was saved by {state.get('world_size')} processes "
                                f"but this run has {world_size}; ZeRO partitions the optimizer state per process, "
                                f"so resume with --nproc {state.get('world_size')}")
    if read_model is not None:
        read_model(path, model)
    else:
        model.load_state_dict(load_model(path).state_dict(), strict=False)
    if optimizer is not None and state.get("param_groups") is not None:
        _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["param_groups"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


# What DeepSpeed's load_state_dict does without: the loss scaler is an object, static under fp32 and bf16 (the
# live one is kept), and the parameter slice mappings are rebuilt by the optimizer itself.
_ZERO_DROPPED = ("loss_scaler", "param_slice_mappings")
_TENSOR, _INT_KEYS = "__tensor__", "__int_keys__"


def _join(key: str, part: str | int) -> str:
    return f"{key}.{part}" if key else str(part)


def _encode(value, key: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON, each tensor moved into `tensors` under its dotted path; dicts keyed by int (torch optimizer
    state) are tagged so the keys come back as ints."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, _join(key, k), tensors) for k, v in value.items()}
        if all(isinstance(k, int) for k in value):
            return {_INT_KEYS: {str(k): _encode(v, _join(key, k), tensors) for k, v in value.items()}}
    elif isinstance(value, (list, tuple)):
        return [_encode(v, _join(key, i), tensors) for i, v in enumerate(value)]
    elif value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpatialScoreError(f"cannot checkpoint the DeepSpeed optimizer state: {key} is a {type(value).__name__}, "
                            f"which has no JSON form (new in this DeepSpeed version?)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_INT_KEYS}:
            return {int(k): _decode(v, tensors) for k, v in value[_INT_KEYS].items()}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _is_zero3(zero_optimizer) -> bool:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3)


def stage_zero_checkpoint(accelerator, run_dir: Path, step: int, zero_optimizer) -> Path:
    """Every process writes its part of the ZeRO optimizer state (moments, step counts, fp32 master weights) into
    the temporary directory of checkpoints/step-N and returns it once all have; the main process then completes it
    with save_checkpoint(..., staged=). Call on every process."""
    staged = Path(run_dir) / "checkpoints" / f".tmp-step-{step}-zero"
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state = {k: v for k, v in zero_optimizer.state_dict().items() if k not in _ZERO_DROPPED}
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    name = staged / f"optimizer-rank{accelerator.process_index}"
    save_file(tensors, str(name.with_suffix(".safetensors")))
    atomic_write_text(name.with_suffix(".json"), json.dumps(structure, indent=1))
    accelerator.wait_for_everyone()
    return staged


def load_zero_partition(path: Path, zero_optimizer, rank: int, world_size: int) -> None:
    """Load this process's part of the ZeRO optimizer state written by stage_zero_checkpoint; the layout must be the
    one it was saved with (load_checkpoint checks stage and process count). Call on every process."""
    name = Path(path) / f"optimizer-rank{rank}"
    if not name.with_suffix(".safetensors").is_file() or not name.with_suffix(".json").is_file():
        raise SpatialScoreError(f"--resume {path}: {name.name}.safetensors/.json missing; the checkpoint has no "
                                f"DeepSpeed optimizer state for process {rank}")
    state = _decode(json.loads(name.with_suffix(".json").read_text()), load_file(str(name.with_suffix(".safetensors"))))
    state["loss_scaler"] = zero_optimizer.loss_scaler
    parts: list[dict | None] = [None] * world_size  # not elastic: each process reads only its own part
    parts[rank] = state
    if _is_zero3(zero_optimizer):  # re-partition parameters around the load, as DeepSpeed's load_checkpoint does
        zero_optimizer.checkpoint_event_prologue()
    zero_optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    if _is_zero3(zero_optimizer):
        zero_optimizer.checkpoint_event_epilogue()


def resolve_resume(resume: str | Path) -> Path:
    """A run directory means its newest complete checkpoint."""
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise SpatialScoreError(f"--resume {path}: no checkpoint found (expected {path}/checkpoints/step-N/)")
    return found[-1].path


class MetricLog:
    """metrics.jsonl in the run directory, plus wandb when the recipe says `report_to: wandb` (offline unless its
    `wandb.mode` says online). The wandb run's id is kept in `<out>/wandb-run.json`, so a resumed run logs on to the
    same wandb run; its name defaults to the run directory's."""

    def __init__(self, run_dir: Path, config: dict, report_to: str, enabled: bool = True, resumed: bool = False):
        self.path, self.enabled, self.wandb = Path(run_dir) / "metrics.jsonl", enabled, None
        self.wandb_step = -1
        if enabled and report_to == "wandb":
            import wandb

            settings = config.get("wandb") or {}
            ids = Path(run_dir) / "wandb-run.json"
            known = json.loads(ids.read_text()) if resumed and ids.is_file() else {}
            name = settings.get("name") or Path(run_dir).resolve().name
            mode = settings.get("mode") or os.environ.get("WANDB_MODE") or "offline"
            self.wandb = wandb.init(project=settings.get("project", "spatialscore"),
                                    entity=settings.get("entity") or None, name=name,
                                    tags=list(settings.get("tags") or []), mode=mode,
                                    dir=str(run_dir), config=config, id=known.get("id"),
                                    resume="allow" if known else None, reinit="finish_previous")
            self.wandb_step = self.wandb.step - 1 if known else -1  # the next step a resumed run may log
            atomic_write_text(ids, json.dumps({"id": self.wandb.id, "name": name,
                                               "project": settings.get("project", "spatialscore"),
                                               "mode": mode}, indent=2) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            if step <= self.wandb_step:  # a resumed run's first row repeats its checkpoint's step: wandb would drop it
                self.wandb.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                return
            self.wandb.log(metrics, step=step)
            self.wandb_step = step

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
