"""Oracle reports: accuracy of images against their prompts, and of preference pairs (chosen passes, rejected
fails), broken down by tag, clause kind and perturbation kind."""

from __future__ import annotations

import json
import multiprocessing as mp
from multiprocessing.pool import ThreadPool
import random
from collections import defaultdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from spatialscore.data.oracle import judge
from spatialscore.data.render import render
from spatialscore.data.scene import sample_scene
from spatialscore.errors import SpatialScoreError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def images_for(images_dir: Path, index: int) -> list[Path]:
    """Images of prompt `index`: `DIR/00007.png`, or GenEval's layout `DIR/00007/samples/*.png`."""
    flat = [images_dir / f"{index:05d}{s}" for s in IMAGE_SUFFIXES]
    found = [p for p in flat if p.is_file()]
    samples = images_dir / f"{index:05d}" / "samples"
    if samples.is_dir():
        found += sorted(p for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return found


def render_prompts(prompts: list[dict], out: Path, seed: int = 0, size: int = 128, progress: bool = True) -> None:
    """Faithful images `out/00000.png ...` for a prompt file (the oracle's sanity check, a generator's upper bound)."""
    out.mkdir(parents=True, exist_ok=True)
    for i, meta in enumerate(tqdm(prompts, desc="render", unit="img", disable=not progress)):
        scene = sample_scene(meta, random.Random(f"render-{seed}-{i}"))
        render(scene, size).save(out / f"{i:05d}.png", compress_level=1)


def _judge_file(job: tuple[str, dict]) -> dict:
    path, meta = job
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as err:
        return {"error": f"{path}: unreadable image ({err})"}
    return judge(image, meta).verdict.to_dict()


def _run(jobs: list[tuple[str, dict]], workers: int, desc: str, progress: bool) -> list[dict]:
    bar = dict(total=len(jobs), desc=desc, unit="img", disable=not progress)
    if workers <= 1:
        return [_judge_file(j) for j in tqdm(jobs, **bar)]
    with mp.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(_judge_file, jobs, chunksize=8), **bar))


def _rate(hits: list[bool]) -> dict:
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else float("nan")}


def _raise_unreadable(results: list[dict]) -> None:
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise SpatialScoreError(f"{len(errors)} unreadable image(s), first: {errors[0]}")


def check_prompts(prompts: list[dict], images_dir: Path, workers: int = 2, progress: bool = True) -> dict:
    """Judge every image of every prompt; report overall and per-tag accuracy, and per-clause-kind accuracy."""
    jobs = []
    for i, meta in enumerate(prompts):
        paths = images_for(images_dir, i)
        if not paths:
            raise SpatialScoreError(f"{images_dir}: no image for prompt {i} (expected {i:05d}.png or "
                                    f"{i:05d}/samples/*.png)")
        jobs += [(str(p), meta) for p in paths]
    results = _run(jobs, workers, "oracle", progress)
    _raise_unreadable(results)
    by_tag, by_clause = defaultdict(list), defaultdict(list)
    for (_, meta), res in zip(jobs, results):
        by_tag[meta.get("tag", "?")].append(res["passed"])
        for clause in res["clauses"]:
            by_clause[clause["kind"]].append(clause["passed"])
    return {"images": len(jobs), "accuracy": _rate([r["passed"] for r in results])["accuracy"],
            "by_tag": {t: _rate(v) for t, v in sorted(by_tag.items())},
            "by_clause": {k: _rate(v) for k, v in sorted(by_clause.items())}}


def check_pairs(pairs, workers: int = 2, progress: bool = True) -> dict:
    """For PairRecords with `meta`: chosen should pass every clause, rejected should fail at least one."""
    jobs = []
    for pair in pairs:
        if not pair.meta:
            raise SpatialScoreError(f"pair {pair.id}: no prompt metadata ('meta'), the oracle cannot judge it")
        jobs.append((pair, "chosen"))
        jobs.append((pair, "rejected"))
    def one(job):
        pair, side = job
        return judge(getattr(pair, side), pair.meta).verdict.to_dict()

    # threads, not processes: the images are already in memory and OCR runs in tesseract subprocesses anyway
    with ThreadPool(max(1, workers)) as pool:
        results = list(tqdm(pool.imap(one, jobs), total=len(jobs), desc="oracle", unit="img", disable=not progress))
    chosen_ok, detected, by_kind, by_tag = [], [], defaultdict(list), defaultdict(list)
    for (pair, side), res in zip(jobs, results):
        if side == "chosen":
            chosen_ok.append(res["passed"])
            continue
        detected.append(not res["passed"])
        by_tag[pair.meta.get("tag", "?")].append(not res["passed"])
        kinds = (pair.perturbation or {}).get("kinds", ["?"])
        by_kind[kinds[0] if len(kinds) == 1 else "2-3 perturbations"].append(not res["passed"])
    return {"pairs": len(chosen_ok), "chosen_pass": _rate(chosen_ok)["accuracy"],
            "rejected_detected": _rate(detected)["accuracy"],
            "detected_by_kind": {k: _rate(v) for k, v in sorted(by_kind.items())},
            "detected_by_tag": {k: _rate(v) for k, v in sorted(by_tag.items())}}


def format_report(report: dict) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for name, row in value.items():
                lines.append(f"  {name:<22} {row['accuracy']:.4f}  (n={row['n']})")
        elif isinstance(value, float):
            lines.append(f"{key}: {value:.4f}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def dump(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
