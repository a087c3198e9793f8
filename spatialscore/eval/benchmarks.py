"""Prompt benchmarks for evaluating generators: the shipped sets in `data/benchmarks/` and public files users bring.

Three formats, told apart by suffix: GenEval's prompt-metadata `.jsonl` (records kept exactly as loaded, so the
oracle's rule scorer grades them by their `include`/`exclude` clauses), T2I-CompBench's `.txt` (one prompt per line,
the category taken from the file name) and DPG-Bench's `.csv` (one row per proposition; folded to one record per
item). Only metadata records can be graded by the oracle; the others are for reward heads that read the prompt.
"""

from __future__ import annotations

import csv
import difflib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from spatialscore.config import RECIPES_DIR
from spatialscore.data.formats import load_prompts
from spatialscore.errors import SpatialScoreError

BENCHMARKS_DIR = RECIPES_DIR.parent / "data" / "benchmarks"
FORMATS = {".jsonl": "geneval", ".txt": "t2i-compbench", ".csv": "dpg-bench"}
# DPG-Bench's header (TencentQQGYLab/ELLA dpg_bench/dpg_bench.csv): item_id, text, keywords, proposition_id,
# dependency, category_broad, category_detailed, tuple, question_natural_language. Only these three are needed.
DPG_COLUMNS = ("item_id", "text", "category_broad")
_SPLIT_SUFFIX = re.compile(r"_(val|train|test)$")
_ABOUT = {
    "shapes-short": "shapes world, GenEval's six tags, held-out phrasing",
    "shapes-long": "shapes world, 3-5 objects tied by 2-4 relations, held-out phrasing",
    "geneval": "GenEval's evaluation_metadata.jsonl (COCO classes; MIT, see geneval.LICENSE)",
}


@dataclass
class Benchmark:
    name: str
    records: list[dict]
    source: str
    format: str  # "geneval" | "t2i-compbench" | "dpg-bench"


def is_judgeable(record: dict) -> bool:
    """Whether the record carries GenEval-style clauses (`include`), which the oracle's rule scorer can decide;
    bare prompts (T2I-CompBench, DPG-Bench) can only be scored by reward heads."""
    return bool(record.get("include"))


def in_shapes_world(record: dict) -> bool:
    """Whether the shapes-world oracle can judge the record: GenEval clauses that name shapes-world classes only
    (GenEval's own COCO prompts carry clauses too, but no shapes detector can find a bench)."""
    from spatialscore.data.vocab import SHAPES, SIGN_CLASS

    entries = [*record.get("include", []), *record.get("exclude", [])]
    return is_judgeable(record) and all(e.get("class") in (*SHAPES, SIGN_CLASS) for e in entries)


def _t2i_compbench(path: Path) -> list[dict]:
    tag = _SPLIT_SUFFIX.sub("", path.stem)  # spatial_val.txt -> spatial, 3d_spatial_val.txt -> 3d_spatial
    with path.open(encoding="utf-8-sig") as f:
        return [{"prompt": line.strip(), "tag": tag} for line in f if line.strip()]


def _dpg_bench(path: Path) -> list[dict]:
    """One record per item_id, in file order; its tag is the broad category most of its propositions test."""
    items: dict[str, dict] = {}
    categories: dict[str, Counter] = {}
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            missing = [c for c in DPG_COLUMNS if c not in header]
            if missing:
                raise SpatialScoreError(f"{path}: missing column {', '.join(missing)} (DPG-Bench csv needs "
                                        f"{', '.join(DPG_COLUMNS)}; found {', '.join(header) or 'no header'})")
            line = reader.line_num + 1
            for row in reader:
                if None in row:
                    raise SpatialScoreError(f"{path}:{line}: {len(header) + len(row[None])} fields, the header "
                                            f"has {len(header)}")
                for column in DPG_COLUMNS:
                    if not (row[column] or "").strip():
                        raise SpatialScoreError(f"{path}:{line}: {column}: missing")
                item, text = row["item_id"].strip(), row["text"].strip()
                if item in items and items[item]["prompt"] != text:
                    raise SpatialScoreError(f"{path}:{line}: text: differs from the earlier text of item {item!r}")
                items.setdefault(item, {"prompt": text, "id": item})
                categories.setdefault(item, Counter())[row["category_broad"].strip()] += 1
                line = reader.line_num + 1
        except csv.Error as e:
            raise SpatialScoreError(f"{path}:{reader.line_num}: malformed csv: {e}") from e
    for item, record in items.items():
        counts = categories[item]
        record["tag"] = min(counts, key=lambda c: (-counts[c], c))  # ties: the alphabetically first, for determinism
        record["categories"] = sorted(counts)
    return list(items.values())


def _read(path: Path) -> Benchmark:
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise SpatialScoreError(f"{path}: not a benchmark file; accepted suffixes: "
                                f"{', '.join(f'{s} ({f})' for s, f in FORMATS.items())}")
    try:
        if fmt == "geneval":
            records = load_prompts(path)
        elif fmt == "t2i-compbench":
            records = _t2i_compbench(path)
        else:
            records = _dpg_bench(path)
    except (OSError, UnicodeDecodeError) as e:
        raise SpatialScoreError(f"{path}: cannot read: {e}") from e
    if not records:
        raise SpatialScoreError(f"{path}: the benchmark holds no prompts")
    return Benchmark(path.stem, records, str(path), fmt)


def _registered() -> dict[str, Path]:
    """Shipped benchmarks by name: every file in data/benchmarks/ with a benchmark suffix."""
    found: dict[str, Path] = {}
    if BENCHMARKS_DIR.is_dir():
        for path in sorted(BENCHMARKS_DIR.iterdir()):
            if path.is_file() and path.suffix in FORMATS:
                if path.stem in found:
                    raise SpatialScoreError(f"benchmark {path.stem!r} is ambiguous: {found[path.stem]} and {path}")
                found[path.stem] = path
    return found


def load_benchmark(name_or_path: str) -> Benchmark:
    """A benchmark file (format by suffix) or the name of one in data/benchmarks/ (`spatialscore eval
    --benchmark shapes-short`)."""
    path = Path(name_or_path)
    if path.is_file():
        return _read(path)
    registered = _registered()
    if name_or_path in registered:
        return _read(registered[name_or_path])
    if path.suffix or len(path.parts) > 1:
        raise SpatialScoreError(f"{path}: no such benchmark file")
    close = difflib.get_close_matches(name_or_path, list(registered), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpatialScoreError(f"unknown benchmark {name_or_path!r}{hint}; known: {', '.join(registered) or 'none'} "
                            f"(or pass a path to a .jsonl, .txt or .csv file)")


def list_benchmarks() -> list[tuple[str, str, int, str]]:
    """(name, format, number of prompts, description) of every shipped benchmark."""
    rows = []
    for name, path in _registered().items():
        bench = _read(path)
        tags = Counter(r.get("tag", "?") for r in bench.records)
        about = _ABOUT.get(name) or "tags: " + ", ".join(f"{t} {n}" for t, n in sorted(tags.items()))
        rows.append((name, bench.format, len(bench.records), about))
    return rows
