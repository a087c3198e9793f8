"""Preference pairs from the shapes world: chosen = a scene faithful to the prompt, rejected = a perturbed copy.

Pair i depends only on (seed, i), so the output is identical whatever the number of worker processes. Images are
written first and `pairs.jsonl` last, through a temporary file and a rename: a crash never leaves a JSONL that
points at missing images.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from spatialscore.data.augment import rough
from spatialscore.data.perturb import applicable, make_rejected
from spatialscore.data.prompts import PromptWriter
from spatialscore.data.render import render
from spatialscore.data.scene import sample_scene
from spatialscore.errors import SpatialScoreError
from spatialscore.io import atomic_write_text


# Every prompt can lose an object, but relations, bindings and text are what a spatial reward must learn: prefer the
# perturbations that target them when the prompt has them.
KIND_WEIGHTS = {"swap": 3.0, "flip": 3.0, "attribute": 2.0, "text": 3.0, "count": 1.0}


def choose_kinds(available: list[str], n: int, rng: random.Random) -> list[str]:
    """n kinds by KIND_WEIGHTS, distinct while there are enough of them."""
    kinds, pool = [], list(available)
    for _ in range(n):
        if not pool:
            pool = list(available)
        kind = rng.choices(pool, weights=[KIND_WEIGHTS[k] for k in pool])[0]
        pool.remove(kind)
        kinds.append(kind)
    return kinds


@dataclass(frozen=True)
class PairSpec:
    seed: int = 0
    style: str = "mixed"
    phrasing: str = "train"
    image_size: int = 128
    multi_prob: float = 0.5  # share of pairs with 2-3 perturbations instead of 1
    tag_weights: tuple[tuple[str, float], ...] = ()  # prompt tags' relative frequencies (missing: 1)
    rough: float = 0.0  # share of pairs drawn by the rough, generator-like renderer (data/augment.py)
    object_scale: float = 1.0  # objects' sizes times this (a generator trained at data.object_scale sees its own)


def make_pair(index: int, spec: PairSpec) -> tuple[dict, object, object]:
    """(record without image paths, chosen image, rejected image) for pair `index`."""
    rng = random.Random(f"pairs-{spec.seed}-{index}")
    writer = PromptWriter(rng, spec.phrasing)
    while True:
        meta = writer.sample(spec.style, dict(spec.tag_weights))
        try:
            chosen = sample_scene(meta, rng, tries=50, scale=spec.object_scale)
        except SpatialScoreError:  # a layout too crowded to place with clear margins: take the next prompt
            continue
        kinds_ok = applicable(meta)
        for _ in range(20):
            n = rng.choice((2, 3)) if rng.random() < spec.multi_prob else 1
            kinds = choose_kinds(kinds_ok, n, rng)
            rejected = make_rejected(chosen, meta, kinds, rng)
            if rejected is not None:
                record = {"id": f"{index:06d}", "prompt": meta["prompt"],
                          "perturbation": {"kinds": kinds, "n": len(kinds)},
                          "meta": {**meta, "scenes": {"chosen": chosen.to_dict(), "rejected": rejected.to_dict()}}}
                if spec.rough > 0 and rng.random() < spec.rough:  # both images of the pair, each its own warp
                    record["rough"] = True
                    return record, rough(chosen, spec.image_size, rng), rough(rejected, spec.image_size, rng)
                return record, render(chosen, spec.image_size), render(rejected, spec.image_size)


def _write_pair(job: tuple[int, PairSpec, str]) -> str:
    index, spec, out = job
    record, chosen, rejected = make_pair(index, spec)
    record["chosen"], record["rejected"] = f"images/{index:06d}-chosen.png", f"images/{index:06d}-rejected.png"
    chosen.save(os.path.join(out, record["chosen"]), compress_level=1)
    rejected.save(os.path.join(out, record["rejected"]), compress_level=1)
    return json.dumps(record, separators=(",", ":"))


def make_pairs(out: str | Path, n: int, spec: PairSpec, workers: int | None = None, progress: bool = True) -> Path:
    """Write `n` pairs under `out` (images/ + pairs.jsonl). Returns the JSONL path."""
    if n < 1:
        raise SpatialScoreError(f"--n must be at least 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(i, spec, str(out)) for i in range(n)]
    bar = dict(total=n, desc="pairs", unit="pair", disable=not progress)
    if workers == 1:
        lines = [_write_pair(job) for job in tqdm(jobs, **bar)]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            lines = list(tqdm(pool.imap(_write_pair, jobs, chunksize=16), **bar))
    path = out / "pairs.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
