"""The memory planner against the peak the torch profiler measures over real CPU training steps of the shapes-world
recipes (world 1, fp32, each recipe's own micro-batch): estimate / measured per recipe, and each estimated term.

    .venv/bin/python benchmarks/plan_accuracy.py [--recipes reward grpo dpo ddpo reward_qwen] [--steps 2]
        [--by-category]

--by-category also prints the profiler's memory timeline at the peak by category (parameter, gradient, optimizer
state, activation, autograd detail...): slower, it records every stack.
"""

import argparse
import json

from spatialscore.plan import measure_peak

MIB = 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["reward", "grpo", "dpo", "ddpo", "reward_qwen"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--by-category", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.recipes:
        m = measure_peak(f"recipes/shapes/{name}.yaml", steps=args.steps, by_category=args.by_category)
        row = {"recipe": name, "samples": m["samples"], "measured_mib": round(m["measured_bytes"] / MIB, 1),
               "estimated_mib": round(m["estimated_bytes"] / MIB, 1),
               "estimated_over_measured": round(m["estimated_bytes"] / m["measured_bytes"], 3),
               **{f"{k}_mib": round(v / MIB, 1) for k, v in m["estimate"].items()}}
        if args.by_category:
            row["measured_by_category_mib"] = {k: round(v / MIB, 1) for k, v in m["measured_by_category"].items()}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
