"""Reward-model throughput and memory: images/s when scoring at batch 32, and the peak memory of one training
process under plain DDP (ZeRO-0) vs DeepSpeed ZeRO-3, both with 2 processes, measured side by side in this run.

    .venv/bin/python benchmarks/reward_throughput.py [--recipe recipes/shapes/reward.yaml] [--steps 10] \
        [key=value ...]   # recipe overrides for the memory runs, e.g. a wider model: model.channels=256

The demo model has 0.6M parameters, so its processes' memory is mostly the runtime and the data; ZeRO-3's savings
(parameters, gradients and Adam moments split over the processes) show once the model is wide.

Peak memory is the largest resident set of any child process (ru_maxrss of RUSAGE_CHILDREN), so each launch runs
in its own helper process and reports its own children.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spatialscore.config import RewardConfig, load_config
from spatialscore.models.base import build_model

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(recipe: str, batch: int = 32, batches: int = 8) -> float:
    cfg = load_config(RewardConfig, recipe)
    model = build_model(dataclasses.asdict(cfg.model)).eval()
    images = torch.rand(batch, 3, cfg.model.image_size, cfg.model.image_size)
    prompts = ["a red circle left of a blue square. The blue square is above a green star."] * batch
    with torch.no_grad():
        model(images, prompts)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            model(images, prompts)
    return batch * batches / (time.perf_counter() - start)


def peak_rss_mb(recipe: str, launch: str, steps: int, overrides: list[str]) -> float:
    """Run a short 2-process training in a child that reports its own children's peak RSS."""
    code = (
        "import json, resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-500:], "
        "'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).parent / "spatialscore"), "train-reward", recipe, f"train.steps={steps}",
               f"train.eval_every={steps}", f"train.save_every={steps}", "data.n_train=256", "data.n_val=32",
               *overrides, "--launch", launch, "--nproc", "2", "--out", out]
        result = json.loads(subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True).stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{launch} run failed: {result['err']}")
    return result["kb"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "shapes" / "reward.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides for the memory runs")
    args = parser.parse_args()
    print(f"scoring: {images_per_second(args.recipe):.1f} images/s at batch 32 ({torch.get_num_threads()} threads)")
    cfg = load_config(RewardConfig, args.recipe, args.overrides)
    params = sum(p.numel() for p in build_model(dataclasses.asdict(cfg.model)).parameters())
    ddp = peak_rss_mb(args.recipe, "ddp", args.steps, args.overrides)
    zero3 = peak_rss_mb(args.recipe, "zero3", args.steps, args.overrides)
    print(f"peak memory per process, 2 processes, {params / 1e6:.1f}M parameters: ZeRO-0 (DDP) {ddp:.0f} MB, "
          f"ZeRO-3 {zero3:.0f} MB, ratio ZeRO-3 / ZeRO-0 = {zero3 / ddp:.2f}")


if __name__ == "__main__":
    main()
