"""`spatialscore eval`: sample a generator on a prompt benchmark, score every image with reward heads and, where
the prompts carry GenEval-style metadata, the shapes-world oracle's rule scorer; record it all in the leaderboard.

Every image's initial noise depends only on (seed, prompt index, sample index), so an evaluation is reproducible
image by image whatever the batch size, and base and tuned generators are compared on the same noises.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from spatialscore.errors import SpatialScoreError
from spatialscore.eval.leaderboard import Leaderboard, RunRecord
from spatialscore.io import atomic_write_bytes
from spatialscore.train.policy_gradient import head_image_size, score_images

log = logging.getLogger(__name__)

SHIPPED_GENERATORS = Path(__file__).resolve().parents[2] / "data" / "generators"
PATH_ARGUMENT = {"spatialscore": "checkpoint", "clip": "pretrained", "counting": "detector"}


# --- what to evaluate ----------------------------------------------------------------------------------------------

def resolve_generator(spec: str) -> Path:
    """A pipeline directory, a training run (its final/pipeline), or a shipped generator's name (shapes-flow)."""
    path = Path(spec)
    for candidate in (path, path / "final" / "pipeline", path / "pipeline", SHIPPED_GENERATORS / spec):
        if (candidate / "model_index.json").is_file():
            return candidate
    shipped = sorted(p.name for p in SHIPPED_GENERATORS.iterdir() if (p / "model_index.json").is_file())
    raise SpatialScoreError(f"--generator {spec}: not a pipeline directory (no model_index.json), nor a run with "
                            f"final/pipeline, nor a shipped generator ({', '.join(shipped)})")


def generator_name(spec: str, path: Path) -> str:
    if path.parent == SHIPPED_GENERATORS:
        return path.name
    return str(Path(spec)).removesuffix("/final/pipeline").removesuffix("/final")  # ./runs/x/ -> runs/x


def head_from_spec(spec: str, batch_size: int = 32):
    """(label, head) from `NAME` (a registered head), `NAME=PATH` (that head built from a local model: spatialscore's
    checkpoint, clip's pretrained directory, counting's detector) or `PATH` / `LABEL=PATH` (a trained SpatialScore
    model, labelled LABEL or `spatialscore`)."""
    from spatialscore.heads import get_head, head_names
    from spatialscore.heads.learned import SpatialScoreHead

    label, _, value = spec.partition("=")
    if not value and (Path(spec).exists() or "/" in spec or "\\" in spec):
        return "spatialscore", SpatialScoreHead(checkpoint=spec, batch_size=batch_size)
    if not value:
        return label, get_head(label)
    if label in PATH_ARGUMENT:
        kwargs = {PATH_ARGUMENT[label]: value, **({"batch_size": batch_size} if label == "spatialscore" else {})}
        return label, get_head(label, **kwargs)
    if label in head_names():
        raise SpatialScoreError(f"--reward {spec}: head {label!r} is not built from a path; give it as {label}")
    return label, SpatialScoreHead(checkpoint=value, batch_size=batch_size)


def parse_heads(specs: str, batch_size: int = 32) -> dict:
    heads = {}
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            continue
        label, head = head_from_spec(spec, batch_size)
        if label in heads or label == "oracle":
            raise SpatialScoreError(f"--reward: the label {label!r} is used twice (name one LABEL=PATH)"
                                    if label in heads else "--reward: the oracle is always run on benchmarks "
                                    "with metadata; don't list it")
        heads[label] = head
    return heads


# --- the run ------------------------------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    """What makes two evaluations of one model on one benchmark differ; with the names, it keys the run. For images
    made elsewhere (`--images`) the sampling fields are None."""

    heads: list[str]  # head specs, paths resolved: another checkpoint under one label is another evaluation
    images_per_prompt: int | None = 4
    seed: int | None = 0
    steps: int | None = 20
    guidance: float | None = 4.0
    limit: int | None = None  # only the first N prompts of the benchmark
    source: str = ""  # the resolved pipeline or image directory


def head_specs(specs: str) -> list[str]:
    """--reward's specs, with every PATH made absolute (the run key must not depend on the working directory)."""
    out = []
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        label, sep, value = spec.partition("=")
        if not sep and (Path(spec).exists() or "/" in spec or "\\" in spec):
            label, sep, value = "spatialscore", "=", spec
        out.append(f"{label}={Path(value).resolve()}" if sep else label)
    return sorted(out)


def image_noise(policy, seed: int, prompt: int, sample: int) -> torch.Tensor:
    return policy.initial_noise(1, torch.Generator().manual_seed(hash_seed(seed, prompt, sample)))


def hash_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return value


def _save_png(image: torch.Tensor, path: Path) -> None:
    import io

    from spatialscore.eval.generation import to_uint8

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _oracle(images: torch.Tensor, records: list[dict]) -> list[dict | None]:
    """Per image: {"passed", "clauses": {kind: [passed, ...]}} for records the oracle can judge (GenEval metadata
    naming shapes-world classes only), else None."""
    from spatialscore.data.oracle import judge
    from spatialscore.heads.shapes import to_pil

    from spatialscore.eval.benchmarks import in_shapes_world

    out: list[dict | None] = []
    for image, record in zip(images, records):
        if not in_shapes_world(record):
            out.append(None)
            continue
        verdict = judge(to_pil(image), record).verdict
        clauses: dict[str, list[bool]] = defaultdict(list)
        for clause in verdict.clauses:
            clauses[clause.kind].append(bool(clause.passed))
        out.append({"passed": bool(verdict.passed), "clauses": dict(clauses)})
    return out


def summarise(records: list[dict], scores: dict[str, list[list[float | None]]],
              verdicts: list[list[dict | None]]) -> tuple[dict[str, float], dict[str, int]]:
    """Metrics and their counts: each head's mean score; the oracle's pass rate per tag and overall (GenEval's rule
    score: the mean over tags); per clause kind the share of clauses passed (`oracle/clause/position` is the
    relation accuracy, over short and long prompts alike)."""
    metrics, counts = {}, {}
    for label, per_prompt in scores.items():
        values = [v for row in per_prompt for v in row if v is not None and math.isfinite(v)]
        if values:
            metrics[label], counts[label] = float(np.mean(values)), len(values)
    passed: list[bool] = []
    by_tag: dict[str, list[bool]] = defaultdict(list)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for record, row in zip(records, verdicts):
        for verdict in row:
            if verdict is None:
                continue
            passed.append(verdict["passed"])
            by_tag[record.get("tag") or "?"].append(verdict["passed"])
            for kind, results in verdict["clauses"].items():
                by_kind[kind] += results
    if passed:
        # GenEval's overall score: the mean of the per-tag pass rates (each tag weighs the same); `oracle/images`
        # pools every image instead
        metrics["oracle"] = float(np.mean([np.mean(v) for v in by_tag.values()]))
        counts["oracle"] = len(passed)
        metrics["oracle/images"], counts["oracle/images"] = float(np.mean(passed)), len(passed)
        for tag, values in sorted(by_tag.items()):
            metrics[f"oracle/{tag}"], counts[f"oracle/{tag}"] = float(np.mean(values)), len(values)
        for kind, values in sorted(by_kind.items()):
            metrics[f"oracle/clause/{kind}"], counts[f"oracle/clause/{kind}"] = float(np.mean(values)), len(values)
    return metrics, counts


def _generated(pipeline: Path, records: list[dict], settings: EvalSettings, out: Path, batch_size: int):
    """Batches (jobs, images, paths) sampled from a pipeline, every image saved as out/images/PPPPP-S.png."""
    from spatialscore.models.generators import FLOW_PIPELINES, UNET_PIPELINES, load_pipeline_dir, policy_for
    from spatialscore.train.policy_gradient import sample_ode

    pipe = load_pipeline_dir(pipeline, "--generator", FLOW_PIPELINES + UNET_PIPELINES, "eval")
    pipe.set_progress_bar_config(disable=True)
    policy = policy_for(pipe, settings.guidance)
    jobs = [(i, s) for i in range(len(records)) for s in range(settings.images_per_prompt)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for begin in range(0, len(jobs), batch_size):
        part = jobs[begin: begin + batch_size]
        cond = policy.encode([records[i]["prompt"] for i, _ in part])
        noise = torch.cat([image_noise(policy, settings.seed, i, s) for i, s in part])
        images = sample_ode(policy, cond, settings.steps, noise, batch_size).float().clamp(0, 1)
        paths = [out / "images" / f"{i:05d}-{s}.png" for i, s in part]
        for image, path in zip(images, paths):
            _save_png(image, path)
        yield part, images, paths


def _read_images(images_dir: Path, records: list[dict], batch_size: int):
    """Batches (jobs, images, paths) of images made elsewhere: DIR/00007.png or GenEval's DIR/00007/samples/*.png,
    every image resized to the first one's size."""
    from spatialscore.data.check import images_for

    jobs = []
    for i in range(len(records)):
        found = images_for(images_dir, i)
        if not found:
            raise SpatialScoreError(f"--images {images_dir}: no image for prompt {i} (expected {i:05d}.png or "
                                    f"{i:05d}/samples/*.png)")
        jobs += [((i, s), path) for s, path in enumerate(found)]
    size = None
    for begin in range(0, len(jobs), batch_size):
        part = jobs[begin: begin + batch_size]
        arrays = []
        for _, path in part:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as err:
                raise SpatialScoreError(f"{path}: unreadable image ({err})") from None
            size = size or image.size
            arrays.append(np.asarray(image.resize(size, Image.BICUBIC) if image.size != size else image))
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        yield [job for job, _ in part], images, [path for _, path in part]


def evaluate_generator(generator: str | None, benchmark, heads: dict, settings: EvalSettings, out: Path,
                       db: Leaderboard | None, name: str | None = None, batch_size: int = 32,
                       progress: bool = True, images_dir: str | None = None) -> dict:
    """Sample (or read from `images_dir`), score and judge every (prompt, sample); record the run. Returns
    {"run", "metrics", "counts", ...}."""
    start = time.perf_counter()
    records = benchmark.records[: settings.limit] if settings.limit else benchmark.records
    if images_dir is not None:
        model_path = str(Path(images_dir).resolve())
        name = name or str(Path(images_dir))
        settings = replace(settings, images_per_prompt=None, seed=None, steps=None, guidance=None, source=model_path)
        batches = _read_images(Path(images_dir), records, batch_size)
        total = None
    else:
        pipeline = resolve_generator(generator)
        model_path = str(pipeline.resolve())
        name = name or generator_name(generator, pipeline)
        settings = replace(settings, source=model_path)
        batches = _generated(pipeline, records, settings, out, batch_size)
        total = len(records) * settings.images_per_prompt
    scores: dict[str, dict[tuple[int, int], float | None]] = {label: {} for label in heads}
    verdicts: dict[tuple[int, int], dict | None] = {}
    images_at: list[tuple[int, int, str]] = []
    bar = tqdm(total=total, desc=f"eval {name} on {benchmark.name}", unit="img", disable=not progress)
    for part, images, paths in batches:
        batch = [records[i] for i, _ in part]
        images_at += [(i, s, str(path)) for (i, s), path in zip(part, paths)]
        for label, head in heads.items():
            usable = [k for k, r in enumerate(batch) if r.get("include") or not head.needs_meta]
            if usable:
                values = score_images(head, images[usable], [batch[k] for k in usable],
                                      head_image_size(head)).tolist()
                scores[label].update((part[k], value) for k, value in zip(usable, values))
        verdicts.update(zip(part, _oracle(images, batch)))
        bar.update(len(part))
    bar.close()
    samples = max((s for _, s, _ in images_at), default=-1) + 1
    grid = [[[None] * samples for _ in records] for _ in range(len(heads) + 1)]
    for table, found in zip(grid, [*scores.values(), verdicts]):
        for (i, s), value in found.items():
            table[i][s] = value
    metrics, counts = summarise(records, dict(zip(heads, grid)), grid[-1])
    seconds = time.perf_counter() - start
    result = {"generator": name, "benchmark": benchmark.name, "settings": asdict(settings), "metrics": metrics,
              "counts": counts, "n_prompts": len(records), "n_images": len(images_at), "seconds": seconds,
              "out": str(out)}
    if db is not None:
        image_scores = [(i, s, label, v) for label, found in scores.items() for (i, s), v in found.items()]
        image_scores += [(i, s, "oracle", None if v is None else float(v["passed"])) for (i, s), v in verdicts.items()]
        result["run"] = db.record(RunRecord(
            kind="generator", model=name, model_path=model_path, benchmark=benchmark.name,
            benchmark_source=benchmark.source, n_prompts=len(records), settings=asdict(settings), metrics=metrics,
            metric_counts=counts, config={"generator": generator, "images": images_dir, "batch_size": batch_size},
            prompts=records, images=images_at, scores=image_scores, seconds=seconds, out_dir=str(out)))
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=2).encode())  # last: the run is recorded
    return result


def pair_accuracy(reward: str, pairs: str | Path, batch_size: int = 64, on_error: str = "raise") -> dict:
    """A reward head's pairwise accuracy on a pair file, overall, per perturbation kind and per count (images at
    the head's own input size, else the shapes world's 128)."""
    from spatialscore.data.tensors import file_pairs
    from spatialscore.train.reward_model import accuracy_report, score_pairs

    head = head_from_spec(reward, batch_size)[1]
    data = file_pairs(str(pairs), head_image_size(head) or 128, on_error=on_error)
    mu_c, mu_r = score_pairs(lambda images, prompts, meta: head(images, prompts, meta).scores, data,
                             batch_size=batch_size, progress=True)
    return accuracy_report(mu_c, mu_r, data.kinds)


def record_reward_eval(db_path: str | Path, report: dict, name: str, model_path: str, pairs: str | Path,
                       benchmark: str | None = None, config: dict | None = None) -> int:
    """An accuracy report of `eval-reward` (train/reward_model.py::accuracy_report) as a leaderboard run; the pair
    set's name defaults to its directory's (runs/heldout/pairs.jsonl -> heldout)."""
    pairs = Path(pairs)
    benchmark = benchmark or (pairs.parent.name if pairs.name == "pairs.jsonl" else pairs.stem)
    metrics = {"accuracy": report["overall"], **{f"accuracy/{k}": v for k, v in report["by_kind"].items()},
               **{f"accuracy/n={k}": v for k, v in report["by_n"].items()}}
    with Leaderboard(db_path) as db:
        return db.record(RunRecord(kind="reward", model=name, model_path=model_path, benchmark=benchmark,
                                   benchmark_source=str(pairs), n_prompts=report["n_pairs"],
                                   settings={"pairs": str(pairs)}, metrics=metrics,
                                   metric_counts={"accuracy": report["n_pairs"]}, config=config or {}))
