"""Flow-GRPO costs, measured side by side in one run:

(a) sampling with per-step log-probabilities (spatialscore.train.flow_grpo.sample_trajectories, SDE) vs the plain
    pipeline call (`pipe(prompts, num_inference_steps=...)`, ODE) of the same model, steps and batch: target <= 1.15x;
(b) the training part of one GRPO iteration with G=24 and top-k 6+6 vs without filtering (all 24): target <= 0.6x.

    .venv/bin/python benchmarks/grpo_cost.py [--pipeline data/generators/shapes-flow] [--repeats 3]

Without --pipeline the shapes base is used if shipped, else a randomly initialised pipeline of the base recipe's
architecture (recipes/shapes/base_flow.yaml: the same compute as the trained base). Every timing is the median of
--repeats runs after a warm-up; the report is JSON on stdout.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from spatialscore.config import GrpoConfig, load_config
from spatialscore.models.generators import flow_policy, load_flow_pipeline
from spatialscore.train.flow_grpo import train_grpo
from spatialscore.train.policy_gradient import sample_trajectories

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "generators" / "shapes-flow"
PROMPTS = ["a red circle to the left of a blue star", "a green square above a yellow triangle"]


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampling(pipeline: str, batch: int, steps: int, repeats: int) -> dict:
    pipe = load_flow_pipeline(pipeline, "--pipeline")
    pipe.set_progress_bar_config(disable=True)
    policy = flow_policy(pipe)
    prompts = (PROMPTS * batch)[:batch]

    def ours():
        cond = policy.encode(prompts)
        sample_trajectories(policy, cond, steps, 0.7, torch.Generator().manual_seed(0), batch_size=batch)

    def plain():
        pipe(prompts, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0))

    t_ours, t_plain = _median(ours, repeats), _median(plain, repeats)
    return {"batch": batch, "steps": steps, "seconds_with_log_probs": t_ours, "seconds_pipeline_call": t_plain,
            "ratio": t_ours / t_plain, "target": "<= 1.15"}


def filtering(pipeline: str, repeats: int) -> dict:
    common = [f"model.pipeline={pipeline}", "reward.heads={oracle: 1.0}", "prompts.eval_n=1", "sample.group_size=24",
              "sample.prompts_per_iter=2", "sample.steps=6", "sample.eval_steps=1", "train.micro_batch=12",
              "train.timestep_fraction=0.5", "train.eval_every=1000", "train.save_every=1000"]
    seconds = {}
    for name, top_k in (("top_k_6", 6), ("no_filter", 0)):
        runs = []
        for r in range(repeats + 1):
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(GrpoConfig, None, [*common, f"train.top_k={top_k}", "train.iterations=1",
                                                     f"train.seed={r}"])
                train_grpo(cfg, Path(out), progress=False)
                row = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[1])
                runs.append(row["seconds_train"])
        seconds[name] = statistics.median(runs[1:])  # the first is the warm-up
    return {"group_size": 24, "seconds_train_top_k_6": seconds["top_k_6"],
            "seconds_train_no_filter": seconds["no_filter"], "ratio": seconds["top_k_6"] / seconds["no_filter"],
            "target": "<= 0.6"}


def base_architecture(directory: Path) -> str:
    """A random pipeline with the base recipe's architecture, saved as a directory both measurements load."""
    from spatialscore.config import GeneratorConfig
    from spatialscore.train.generator import build_pipeline

    cfg = load_config(GeneratorConfig, ROOT / "recipes" / "shapes" / "base_flow.yaml")
    build_pipeline(cfg).save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(BASE) if BASE.is_dir() else None)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = args.pipeline or base_architecture(Path(tmp) / "base-architecture")
        report = {"pipeline": args.pipeline or "recipes/shapes/base_flow.yaml architecture, random weights",
                  "torch_threads": torch.get_num_threads(),
                  "a_sampling": sampling(pipeline, args.batch, args.steps, args.repeats),
                  "b_top_k_training": filtering(pipeline, args.repeats)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
