"""One-command launch of any trainer on one process, N processes, or M nodes.

`spatialscore train-<x> RECIPE --launch PRESET --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]`
composes an `accelerate launch` (or `torchrun`) command that re-runs the same verb in every process, and runs it;
`--dry-run` prints it instead. The presets are files: `launch/accelerate/<preset>.yaml` (accelerate) and, for the
ZeRO presets, `launch/deepspeed/<preset>.json` whose "auto" values are filled from the recipe and the world size here,
so the filled file is what the processes use (written to `<out>/launch/deepspeed.json`).

On a machine without CUDA the processes talk over gloo. Two traps are handled here: `accelerate launch --cpu
--num_processes N` silently starts ONE process (plain DDP therefore runs with `ACCELERATE_USE_CPU=true
--multi_gpu`), and accelerate drops a DeepSpeed plugin under ACCELERATE_USE_CPU (DeepSpeed presets run without it:
DeepSpeed brings its own CPU accelerator, and the processes join over gloo). The trainers check the world size they got against the one asked for.

A node that cannot meet the others does not wait forever: the rendezvous gives up after `--rdzv-timeout` seconds
and the command says which node, address and port did not meet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spatialscore.errors import SpatialScoreError

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"
PRESETS = ("single", "ddp", "zero2", "zero3", "zero3-offload")
ZERO_PRESETS = DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3-offload")
LAUNCHERS = ("accelerate", "torchrun")
DEFAULT_PORT = 29500
DEFAULT_RDZV_TIMEOUT = 600  # seconds; torch's own default for the static rendezvous
# set by the launching process for its workers
ENV_DEEPSPEED_CONFIG = "SPATIALSCORE_DEEPSPEED_CONFIG"
ENV_WORLD_SIZE = "SPATIALSCORE_EXPECTED_WORLD_SIZE"
ENV_STARTED = "SPATIALSCORE_STARTED_FILE"


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    preset: str = "single"
    nproc: int = 1  # processes per node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "accelerate"
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT
    precision: str = "no"

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def zero(self) -> str | None:
        return self.preset if self.preset in ZERO_PRESETS else None

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise SpatialScoreError(f"--launch {self.preset}: unknown preset; choose from {', '.join(PRESETS)}")
        if self.launcher not in LAUNCHERS:
            raise SpatialScoreError(f"--launcher {self.launcher}: choose from {', '.join(LAUNCHERS)}")
        for flag, value, low in [("--nproc", self.nproc, 1), ("--nnodes", self.nnodes, 1),
                                 ("--rdzv-timeout", self.rdzv_timeout, 1)]:
            if value < low:
                raise SpatialScoreError(f"{flag} must be >= {low}, got {value}")
        if not 0 <= self.node_rank < self.nnodes:
            raise SpatialScoreError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} for "
                                    f"--nnodes {self.nnodes}")
        if not 1 <= self.master_port <= 65535:
            raise SpatialScoreError(f"--master-port {self.master_port}: not a TCP port (1..65535)")
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise SpatialScoreError(f"--master-addr {self.master_addr!r}: give the host name or IP of node 0")
        if self.preset == "single" and self.world_size > 1:
            raise SpatialScoreError(f"--launch single runs one process, but --nproc {self.nproc} x --nnodes "
                                    f"{self.nnodes} asks for {self.world_size}: use --launch ddp or a zero preset")


def spec_from_args(args) -> LaunchSpec:
    preset = args.launch or ("ddp" if args.nproc * args.nnodes > 1 else "single")
    spec = LaunchSpec(preset=preset.replace("_", "-"), nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                      master_addr=args.master_addr, master_port=args.master_port, launcher=args.launcher,
                      rdzv_timeout=args.rdzv_timeout, precision=args.precision)
    spec.check()
    return spec


def needs_launch(spec: LaunchSpec) -> bool:
    """Whether the command must re-run itself in launched processes (anything but one plain process)."""
    return spec.preset != "single"


# --- DeepSpeed: the preset with its "auto" values filled ----------------------------------------------------------

def batch_layout(cfg, world: int) -> tuple[int, int, int]:
    """(micro-batch per process, gradient accumulation steps, samples per optimizer step over all processes) as each
    trainer runs them: the numbers DeepSpeed's train_micro_batch_size_per_gpu / gradient_accumulation_steps /
    train_batch_size must agree with."""
    t = cfg.train
    if cfg.kind == "reward":
        if t.batch_size % (t.grad_accum * world):
            raise SpatialScoreError(f"train.batch_size={t.batch_size} must divide evenly over grad_accum="
                                    f"{t.grad_accum} x {world} processes (--nproc x --nnodes)")
        return t.batch_size // (t.grad_accum * world), t.grad_accum, t.batch_size
    if cfg.kind == "dpo":
        if t.batch_size % world:
            raise SpatialScoreError(f"train.batch_size={t.batch_size} must divide evenly over {world} processes "
                                    f"(--nproc x --nnodes)")
        return t.batch_size // world, 1, t.batch_size
    if cfg.kind in ("grpo", "ddpo"):  # one accumulated backward per trained timestep (policy_gradient.train_policy)
        if cfg.sample.prompts_per_iter % world:
            raise SpatialScoreError(f"sample.prompts_per_iter={cfg.sample.prompts_per_iter} must divide evenly over "
                                    f"{world} processes (--nproc x --nnodes)")
        accum = len(t.timesteps) if t.timesteps else max(1, math.ceil(t.timestep_fraction * cfg.sample.steps))
        return t.micro_batch, accum, t.micro_batch * accum * world
    raise SpatialScoreError(f"kind: {cfg.kind}: this trainer has no multi-process launch")


def deepspeed_config(preset: str, cfg, world: int, precision: str) -> dict:
    """launch/deepspeed/<preset>.json with every "auto" filled from the recipe and the world size."""
    config = json.loads((LAUNCH_DIR / "deepspeed" / f"{preset}.json").read_text())
    micro, accum, total = batch_layout(cfg, world)
    filled = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": total, "gradient_clipping": float(cfg.train.max_grad_norm)}
    for key, value in filled.items():
        if config.get(key) == "auto":
            config[key] = value
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = precision == "bf16"
    left = [key for key, value in _walk(config) if value == "auto"]
    if left:
        raise SpatialScoreError(f"launch/deepspeed/{preset}.json: no value from the recipe for {', '.join(left)}")
    return config


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# --- the command ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LaunchPlan:
    env: dict[str, str]  # variables set for the launcher, beside the inherited environment
    argv: list[str]
    deepspeed: dict | None  # the filled DeepSpeed config, if any
    deepspeed_path: Path | None

    def render(self, python: str = sys.executable) -> str:
        """The command as a shell line (`python` shown as given), then the filled DeepSpeed config."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        argv = [("python" if a == python else a) for a in self.argv]
        lines = [" ".join(filter(None, [env, shlex.join(argv)]))]
        if self.deepspeed is not None:
            lines += [f"# {self.deepspeed_path}:", json.dumps(self.deepspeed, indent=2, sort_keys=True)]
        return "\n".join(lines) + "\n"


def worker_argv(argv: list[str]) -> list[str]:
    """This command's own arguments for the launched processes: without the launcher's flags (which each worker would
    not use) and --json / --dry-run, plus --worker."""
    drop_value = {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--launcher", "--rdzv-timeout",
                  "--nproc"}
    drop_flag = {"--json", "--dry-run", "--worker"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop_flag:
            continue
        if name in drop_value:
            skip = "=" not in arg
            continue
        out.append(arg)
    return [*out, "--worker"]


def compose(spec: LaunchSpec, argv: list[str], cfg, out: Path, cuda: bool) -> LaunchPlan:
    """The launcher command for `spatialscore <argv>` under `spec`, run from the repository root."""
    env: dict[str, str] = {ENV_WORLD_SIZE: str(spec.world_size)}
    ds, ds_path = None, None
    batch_layout(cfg, spec.world_size)  # a batch that does not divide fails here, not in every process
    if spec.zero:
        ds = deepspeed_config(spec.zero, cfg, spec.world_size, spec.precision)
        ds_path = out / "launch" / "deepspeed.json"
        env[ENV_DEEPSPEED_CONFIG] = str(ds_path)
    elif not cuda:
        env["ACCELERATE_USE_CPU"] = "true"  # plain DDP on CPU: see the module's docstring
    worker = ["-m", "spatialscore.cli", *worker_argv(argv)]
    if spec.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(spec.nnodes),
               "--nproc-per-node", str(spec.nproc), "--node-rank", str(spec.node_rank),
               "--master-addr", spec.master_addr, "--master-port", str(spec.master_port),
               "--rdzv-backend", "static", "--rdzv-conf", f"timeout={spec.rdzv_timeout}", *worker]
        return LaunchPlan(env, cmd, ds, ds_path)
    config = LAUNCH_DIR / "accelerate" / f"{spec.preset}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_shown(config)),
           "--num_processes", str(spec.world_size), "--num_machines", str(spec.nnodes),
           "--machine_rank", str(spec.node_rank), "--main_process_ip", spec.master_addr,
           "--main_process_port", str(spec.master_port), "--rdzv_conf", f"timeout={spec.rdzv_timeout}",
           "--mixed_precision", "no"]  # the trainer sets precision itself (DeepSpeed's bf16 needs CUDA)
    if spec.zero:  # the config file says DEEPSPEED; this file is the preset with its "auto" values filled
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ds_path)]
    elif spec.world_size > 1:
        cmd += ["--multi_gpu"]
    return LaunchPlan(env, [*cmd, *worker], ds, ds_path)


def _shown(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def run(plan: LaunchPlan, spec: LaunchSpec) -> int:
    """Run the launcher; if it fails before any local process got through the rendezvous, say so plainly."""
    if plan.deepspeed is not None:
        from spatialscore.io import atomic_write_text

        plan.deepspeed_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.deepspeed_path, json.dumps(plan.deepspeed, indent=2, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory(prefix="spatialscore-launch-") as tmp:
        started = Path(tmp) / "started"
        env = {**os.environ, **plan.env, ENV_STARTED: str(started)}
        begin = time.monotonic()
        code = subprocess.run(plan.argv, env=env).returncode
        waited = time.monotonic() - begin
        if code != 0 and not started.exists():
            if waited < 0.9 * spec.rdzv_timeout:  # the processes failed by themselves, before meeting
                raise SpatialScoreError(f"the launched processes exited with code {code} before training began "
                                        f"(after {waited:.0f} s); their errors are above")
            others = (f"the other {spec.nnodes - 1} node(s) did not all join" if spec.nnodes > 1
                      else "the processes on this machine did not all start")
            raise SpatialScoreError(
                f"launch failed before training began (exit code {code}, after {waited:.0f} s): node "
                f"{spec.node_rank} of {spec.nnodes} could not complete the rendezvous at "
                f"{spec.master_addr}:{spec.master_port} within --rdzv-timeout {spec.rdzv_timeout} s; {others}. "
                f"Check that every node runs the same command with its own --node-rank, that --master-addr is node "
                f"0's address and that port {spec.master_port} is free there and reachable from the others.")
        return code


def worker_started(world_size: int) -> None:
    """Called by each launched process once its process group is up: checks the world size is the one asked for
    (the silent single-process trap) and tells the launching process that the rendezvous completed."""
    expected = os.environ.get(ENV_WORLD_SIZE)
    if expected and int(expected) != world_size:
        raise SpatialScoreError(f"launched for {expected} processes but this process sees a world of {world_size}; "
                                f"the launcher did not start the processes asked for (see launch/README.md)")
    marker = os.environ.get(ENV_STARTED)
    if marker:
        Path(marker).touch()
