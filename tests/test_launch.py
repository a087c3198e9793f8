"""Launch: the composed commands (golden files), bad flags, two simulated nodes on this machine, and a rendezvous
that cannot complete. Regenerate the golden files after an intended change with
`UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_launch.py -k golden`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spatialscore import launch
from spatialscore.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "launch"
EXE = str(Path(sys.executable).parent / "spatialscore")
TRAINERS = {"train-reward": "recipes/shapes/reward.yaml", "train-grpo": "recipes/shapes/grpo.yaml",
            "train-ddpo": "recipes/shapes/ddpo.yaml", "train-dpo": "recipes/shapes/dpo.yaml"}
# node 1 of 2 over 4 GPUs each, with torchrun: what a Slurm job step runs (launch/slurm/train.sbatch)
CLUSTER = ["--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "6000"]
CASES = {f"{verb}-{preset}": [verb, recipe, "--launch", preset, *(["--nproc", "2"] if preset != "single" else [])]
         for verb, recipe in TRAINERS.items() for preset in launch.PRESETS}
CASES |= {"train-reward-zero3-2nodes-torchrun": ["train-reward", TRAINERS["train-reward"], "--launch", "zero3",
                                                  *CLUSTER, "--launcher", "torchrun"],
          "train-grpo-zero2-2nodes": ["train-grpo", TRAINERS["train-grpo"], "--launch", "zero2", *CLUSTER],
          "train-dpo-ddp-2nodes-torchrun": ["train-dpo", TRAINERS["train-dpo"], "--launch", "ddp", *CLUSTER,
                                            "--launcher", "torchrun", "--rdzv-timeout", "120"]}
TINY_REWARD = ["model.channels=16", "model.text_dim=32", "model.g_dim=32", "model.f_dim=32", "data.n_train=48",
               "data.n_val=16", "train.batch_size=8", "train.warmup=2", "train.eval_every=4", "train.steps=4",
               "train.save_every=4"]
TINY_GRPO = ["model.pipeline=", "model.tiny=shapes_flow", "prompts.eval_n=4", "sample.steps=4",
             "sample.group_size=4", "sample.prompts_per_iter=2", "train.top_k=1", "train.micro_batch=4",
             "sample.eval_steps=2", "train.eval_every=100", "train.iterations=2", "train.save_every=2"]


def _dry_run(case: list[str], capsys, monkeypatch) -> str:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the golden files are for a machine without CUDA
    monkeypatch.setattr(sys, "argv", ["spatialscore", *case, "--out", "runs/golden", "--dry-run"])
    assert main(sys.argv[1:]) == 0
    return capsys.readouterr().out.replace(sys.executable, "python")


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_matches_golden(name, capsys, monkeypatch):
    text = _dry_run(CASES[name], capsys, monkeypatch)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no golden file {path}: run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["spatialscore", "train-reward", TRAINERS["train-reward"], "--launch", "zero2",
                                      "--nproc", "2", "--out", str(out), "--dry-run"])
    monkeypatch.chdir(ROOT)
    assert main(sys.argv[1:]) == 0
    assert "--use_deepspeed" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--launch", "single", "--nproc", "2"], "--launch single runs one process"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank 2: must be in 0..1"),
    (["--nproc", "2", "--master-port", "70000"], "--master-port 70000: not a TCP port"),
    (["--nproc", "3", "--launch", "zero2"], "train.batch_size=32 must divide evenly over grad_accum=1 x 3 processes"),
])
def test_bad_launch_flags_exit_2_naming_the_flag(flags, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["train-reward", TRAINERS["train-reward"], *flags, "--dry-run"]
    monkeypatch.setattr(sys, "argv", ["spatialscore", *argv])
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_filled_deepspeed_config_is_what_each_trainer_runs():
    from spatialscore.config import load_config, schema_for

    for verb, recipe in TRAINERS.items():
        cfg = load_config(schema_for(ROOT / recipe), ROOT / recipe, [])
        for preset in launch.ZERO_PRESETS:
            ds = launch.deepspeed_config(preset, cfg, 2, "bf16")
            assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"] *
                                              ds["gradient_accumulation_steps"] * 2), (verb, preset)
            assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == cfg.train.max_grad_norm
            assert "auto" not in json.dumps(ds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], out: Path, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """The same command as node 0 and node 1 of two, one process each, meeting on 127.0.0.1."""
    port = str(_free_port())
    procs = [subprocess.Popen([*args, "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-port", port,
                               "--rdzv-timeout", "120", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for rank in (0, 1)]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def _check_both_ranks(out: Path, runs: list[subprocess.CompletedProcess]) -> dict:
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2
    report = json.loads((out / "ranks.json").read_text())
    ranks = report["ranks"]
    assert sorted((r["rank"], r["node"]) for r in ranks) == [(0, 0), (1, 1)]  # both nodes took part
    assert len({r["pid"] for r in ranks}) == 2
    assert report["weights_in_sync"] and len({r["weights_sha256"] for r in ranks}) == 1
    return rows[0]


@pytest.mark.parametrize("preset", ["ddp", "zero2"])
def test_two_nodes_train_the_reward_model(preset, tmp_path):
    out = tmp_path / "run"
    runs = _two_nodes([EXE, "train-reward", TRAINERS["train-reward"], *TINY_REWARD, "--launch", preset], out)
    first = _check_both_ranks(out, runs)
    assert (out / "final" / "model.safetensors").is_file()
    if preset == "zero2":  # the filled DeepSpeed file agrees with what the trainer ran
        ds = json.loads((out / "launch" / "deepspeed.json").read_text())
        assert ds["train_micro_batch_size_per_gpu"] == first["micro_batch"] == 4


def test_two_nodes_run_flow_grpo(tmp_path):
    out = tmp_path / "run"
    runs = _two_nodes([EXE, "train-grpo", TRAINERS["train-grpo"], *TINY_GRPO, "--launch", "zero2"], out)
    _check_both_ranks(out, runs)
    assert (out / "final" / "lora" / "adapter_model.safetensors").is_file()


def test_a_node_left_alone_gives_up_with_a_clear_message(tmp_path):
    begin = time.monotonic()
    result = subprocess.run([EXE, "train-reward", TRAINERS["train-reward"], *TINY_REWARD, "--launch", "ddp",
                             "--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--master-port", str(_free_port()),
                             "--rdzv-timeout", "3", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and time.monotonic() - begin < 100  # 3 s to give up, plus start-up on a busy machine
    assert "node 1 of 2 could not complete the rendezvous at 127.0.0.1:" in result.stderr
    assert "within --rdzv-timeout 3 s" in result.stderr


def _fake_bin(tmp_path: Path, tools: dict[str, str]) -> dict[str, str]:
    """Stand-ins for cluster tools this machine lacks (srun, scontrol, ssh), first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


# srun: run the command once per node, in parallel, with that node's SLURM_NODEID (options before it are skipped)
FAKE_SRUN = """while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" > "$SRUN_LOG.$i" 2>&1 & done
status=0; for job in $(jobs -p); do wait "$job" || status=$?; done; exit $status
"""


def test_slurm_template_runs_two_nodes_through_torchrun(tmp_path):
    """launch/slurm/train.sbatch under a stand-in srun (two "nodes" on this machine): each task gets its node rank, the
    first node of the allocation is the rendezvous, and the tiny reward model trains on both ranks."""
    env = _fake_bin(tmp_path, {"srun": FAKE_SRUN, "scontrol": "printf '127.0.0.1\\nnode-b\\n'\n"})
    env |= {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": str(_free_port()),
            "SLURM_JOB_NODELIST": "node-[a-b]", "SRUN_LOG": str(tmp_path / "node"), "RDZV_TIMEOUT": "120",
            "OUT": str(tmp_path / "run"), "SPATIALSCORE": EXE, "MASTER_PORT": str(_free_port())}
    result = subprocess.run(["bash", "launch/slurm/train.sbatch", "train-reward", TRAINERS["train-reward"],
                             *TINY_REWARD, "--launch", "ddp"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    logs = "\n".join(log.read_text()[-2000:] for log in sorted(tmp_path.glob("node.*")))
    assert result.returncode == 0, result.stderr + logs
    _check_both_ranks(tmp_path / "run", [result])


def test_hostfile_script_gives_each_host_its_rank(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2  # the second\n")
    fake_ssh = 'while [[ $1 == -* ]]; do shift; done; echo "host $1"; shift; exec bash -c "$1"\n'  # options, host, command
    env = _fake_bin(tmp_path, {"ssh": fake_ssh})
    result = subprocess.run(["bash", "launch/hostfile.sh", str(hostfile), "train-grpo", TRAINERS["train-grpo"],
                             "--launch", "zero2", "--dry-run"], cwd=ROOT, env=env | {"SPATIALSCORE": EXE},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for rank, host in enumerate(["node-a", "node-b"]):
        assert f"host {host}" in result.stdout
        assert (f"--num_processes 4 --num_machines 2 --machine_rank {rank} --main_process_ip node-a "
                f"--main_process_port 29500") in result.stdout
    hostfile.write_text("node-a 8\n")
    bad = subprocess.run(["bash", "launch/hostfile.sh", str(hostfile), "train-grpo", TRAINERS["train-grpo"]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and f"{hostfile} line 1: expected 'HOST slots=N'" in bad.stderr
