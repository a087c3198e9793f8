"""Write the shipped shapes-world benchmarks: shapes-short.jsonl (GenEval's six tags) and shapes-long.jsonl.

Fixed seeds and held-out phrasing (wordings no training prompt uses), so reruns reproduce both files byte for byte:

    .venv/bin/python data/benchmarks/make_shapes_benchmarks.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from spatialscore.data.prompts import SHORT_TAGS, STYLES, PromptWriter
from spatialscore.io import atomic_write_text

PER_TAG = 50
LONG = 100
MAX_DRAWS = 5000  # single_object and two_object have fewer distinct held-out prompts than PER_TAG: take them all


def distinct(style: str, tag: str, n: int, seed: str) -> list[dict]:
    """Up to `n` records of `tag` with distinct prompts, in draw order."""
    writer = PromptWriter(random.Random(seed), phrasing="heldout")
    weights = {t: float(t == tag) for t in STYLES[style]}
    seen: dict[str, dict] = {}
    for _ in range(MAX_DRAWS):
        record = writer.sample(style, weights)
        seen.setdefault(record["prompt"], record)
        if len(seen) == n:
            break
    return list(seen.values())


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    out = parser.parse_args().out
    short = [r for tag in SHORT_TAGS for r in distinct("short", tag, PER_TAG, f"shapes-short-{tag}")]
    atomic_write_text(out / "shapes-short.jsonl", jsonl(short))
    atomic_write_text(out / "shapes-long.jsonl", jsonl(distinct("long", "long", LONG, "shapes-long")))


if __name__ == "__main__":
    main()
