"""Schemas, validation and loaders for the data formats: pair JSONL, prompt-metadata JSONL (GenEval's, extended),
pair tables (parquet or `datasets.save_to_disk` directories) and Pick-a-Pic-style tables.

Every defect in user data becomes a `Problem` naming file, line and field, so a bad dataset fails here with a
readable message instead of deep inside training. Class and colour names are free strings on purpose: GenEval's
own metadata uses COCO classes and colours outside the shapes world, and must load unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import reprlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spatialscore.data.vocab import PERTURBATION_KINDS, RELATIONS
from spatialscore.errors import SpatialScoreError

log = logging.getLogger("spatialscore.data")

PAIR_COLUMNS = frozenset({"prompt", "chosen", "rejected"})
PICKAPIC_COLUMNS = frozenset({"caption", "jpg_0", "jpg_1", "label_0"})
ACCEPTED = (
    "pair or prompt-metadata .jsonl, or a .parquet file / datasets.save_to_disk directory with columns "
    "prompt, chosen, rejected (pairs) or caption, jpg_0, jpg_1, label_0 (Pick-a-Pic)"
)
_KIND_NAMES = {"pairs": "preference pairs", "prompts": "prompt metadata"}
_SHOWN_IN_LOG = 3


@dataclass
class Problem:
    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return ": ".join(part for part in (where, self.field, self.message) if part)


@dataclass
class PairRecord:
    id: str
    prompt: str
    chosen: Image.Image
    rejected: Image.Image
    perturbation: dict | None = None
    meta: dict | None = None


@dataclass
class _Checker:
    """Collects one record's problems, so each check carries on and all of them get reported."""

    file: str
    line: int | None
    problems: list[Problem] = field(default_factory=list)

    def add(self, where: str | None, message: str) -> None:
        self.problems.append(Problem(self.file, self.line, where, message))


def _describe(value: object) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}
    return f"{names.get(type(value), type(value).__name__)} {reprlib.repr(value)}"


def _text(c: _Checker, value: object, where: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            c.add(where, "missing")
    elif not isinstance(value, str):
        c.add(where, f"must be a string, got {_describe(value)}")
    elif not value.strip():
        c.add(where, "must not be empty")
    else:
        return value
    return None


def _int(c: _Checker, value: object, where: str, minimum: int) -> None:
    if value is None:
        c.add(where, "missing")
    elif isinstance(value, bool) or not isinstance(value, int):
        c.add(where, f"must be an integer, got {_describe(value)}")
    elif value < minimum:
        c.add(where, f"must be >= {minimum}, got {value}")


def _list(c: _Checker, value: object, where: str, required: bool = False) -> list:
    """The items to check one by one; none (with the problem recorded) when the value is not a list."""
    if value is None:
        if required:
            c.add(where, "missing")
        return []
    if not isinstance(value, list) or (required and not value):
        c.add(where, f"must be a {'non-empty ' if required else ''}list, got {_describe(value)}")
        return []
    return value


def _check_entry(c: _Checker, entry: object, where: str) -> None:
    if not isinstance(entry, dict):
        c.add(where, f"must be an object, got {_describe(entry)}")
        return
    _text(c, entry.get("class"), f"{where}.class")
    _int(c, entry.get("count"), f"{where}.count", 0)
    _text(c, entry.get("color"), f"{where}.color", required=False)


def _check_position(c: _Checker, position: object, where: str, index: int) -> None:
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        c.add(where, f"must be [relation, index of an earlier include entry], got {_describe(position)}")
        return
    relation, target = position
    if relation not in RELATIONS:
        c.add(where, f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < index:
        earlier = f"0..{index - 1}" if index else "none, this is the first entry"
        c.add(where, f"index {target!r} must point to an earlier include entry ({earlier})")


def _check_prompt(c: _Checker, rec: object, prefix: str, prompt_required: bool) -> None:
    if not isinstance(rec, dict):
        c.add(prefix.rstrip(".") or None, f"must be a JSON object, got {_describe(rec)}")
        return
    _text(c, rec.get("prompt"), f"{prefix}prompt", required=prompt_required)
    _text(c, rec.get("tag"), f"{prefix}tag")
    for i, entry in enumerate(_list(c, rec.get("include"), f"{prefix}include", required=True)):
        _check_entry(c, entry, f"{prefix}include[{i}]")
        if isinstance(entry, dict) and entry.get("position") is not None:
            _check_position(c, entry["position"], f"{prefix}include[{i}].position", i)
    for i, entry in enumerate(_list(c, rec.get("exclude"), f"{prefix}exclude")):
        _check_entry(c, entry, f"{prefix}exclude[{i}]")
    for i, words in enumerate(_list(c, rec.get("text"), f"{prefix}text")):
        _text(c, words, f"{prefix}text[{i}]")


def _check_perturbation(c: _Checker, pert: object) -> None:
    if not isinstance(pert, dict):
        c.add("perturbation", f"must be an object, got {_describe(pert)}")
        return
    for i, kind in enumerate(_list(c, pert.get("kinds"), "perturbation.kinds", required=True)):
        if kind not in PERTURBATION_KINDS:
            c.add(f"perturbation.kinds[{i}]", f"unknown kind {kind!r}; valid: {', '.join(PERTURBATION_KINDS)}")
    _int(c, pert.get("n"), "perturbation.n", 1)


def _image(c: _Checker, value: object, where: str, root: Path, decode: bool) -> Image.Image | None:
    if isinstance(value, dict):  # an HF Image feature; as in `datasets`, embedded bytes win over the path
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        c.add(where, "missing")
        return None
    if isinstance(value, str):
        if not value.strip():
            c.add(where, "empty image path")
            return None
        source: Path | io.BytesIO = root / value
        if not source.is_file():
            c.add(where, f"no such image file: {source}")
            return None
    elif isinstance(value, bytes):
        source = io.BytesIO(value)
    else:
        c.add(where, f"must be an image path, image bytes or an Image {{bytes, path}} dict, got {_describe(value)}")
        return None
    if not decode:
        return None
    try:
        with Image.open(source) as im:
            im.load()  # a truncated file passes open() and verify(); only decoding the pixels catches it
            return im.convert("RGB")
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, EOFError, struct.error, bomb errors...
        c.add(where, f"unreadable image ({source if isinstance(source, Path) else 'embedded bytes'}): {e}")
        return None


def _pair(c: _Checker, rec: object, root: Path, decode: bool = True) -> PairRecord | None:
    if not isinstance(rec, dict):
        c.add(None, f"must be a JSON object, got {_describe(rec)}")
        return None
    _text(c, rec.get("id"), "id")
    _text(c, rec.get("prompt"), "prompt")
    if rec.get("perturbation") is not None:
        _check_perturbation(c, rec["perturbation"])
    if rec.get("meta") is not None:
        _check_prompt(c, rec["meta"], "meta.", prompt_required=False)
    chosen = _image(c, rec.get("chosen"), "chosen", root, decode)
    rejected = _image(c, rec.get("rejected"), "rejected", root, decode)
    if c.problems or chosen is None or rejected is None:
        return None
    return PairRecord(rec["id"], rec["prompt"], chosen, rejected, rec.get("perturbation"), rec.get("meta"))


def validate_prompt_record(rec: object, file: str, line: int | None) -> list[Problem]:
    c = _Checker(file, line)
    _check_prompt(c, rec, "", prompt_required=True)
    return c.problems


def validate_pair_record(
    rec: object, file: str, line: int | None, root: Path, check_images: bool = True
) -> list[Problem]:
    """check_images=False still checks image paths exist, but decodes nothing."""
    c = _Checker(file, line)
    _pair(c, rec, Path(root), check_images)
    return c.problems


def _prune(value: object) -> object:
    """Arrow structs give every row every key, absent ones as None: drop those so optional keys read as absent."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def _table_pair(c: _Checker, row: dict, root: Path, default_id: str) -> PairRecord | None:
    rec = dict(row, id=default_id if row.get("id") is None else str(row["id"]))
    for key in ("perturbation", "meta"):
        value = rec.get(key)
        if isinstance(value, str):  # tables may hold these as JSON text rather than structs
            try:
                value = json.loads(value) if value.strip() else None
            except ValueError as e:
                c.add(key, f"invalid JSON: {e}")
                value = None
        rec[key] = _prune(value)
    return _pair(c, rec, root)


def _pickapic(c: _Checker, row: dict, root: Path, default_id: str) -> PairRecord | None:
    """None with no problem recorded means a tie."""
    label = row.get("label_0")
    if label == 0.5:
        return None
    if label not in (0, 1):
        c.add("label_0", f"must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (tie), got {label!r}")
    prompt = _text(c, row.get("caption"), "caption")
    first = _image(c, row.get("jpg_0"), "jpg_0", root, decode=True)
    second = _image(c, row.get("jpg_1"), "jpg_1", root, decode=True)
    if c.problems or prompt is None or first is None or second is None:
        return None
    chosen, rejected = (first, second) if label == 1 else (second, first)
    rid = row.get("ranking_id")  # real Pick-a-Pic rows carry one; keep it so records trace back to the source
    return PairRecord(default_id if rid is None else str(rid), prompt, chosen, rejected)


_Item = tuple[list[Problem], "PairRecord | dict | None"]


def _json_lines(p: Path) -> Iterator[tuple[int, object]]:
    """(1-based line, parsed value or the Problem that stopped it); blank lines are skipped."""
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf").strip()  # editors on Windows add a BOM that json rejects
            if not raw:
                continue
            try:
                value: object = json.loads(raw)
            except (ValueError, RecursionError) as e:
                detail = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
                value = Problem(str(p), n, None, f"invalid JSON: {detail}")
            yield n, value


def _sniff(p: Path) -> str | None:
    for _, value in _json_lines(p):
        if isinstance(value, dict):
            return "pairs" if "chosen" in value else "prompts" if "include" in value else None
    return None


def _jsonl_items(p: Path, kind: str) -> Iterator[_Item]:
    for n, value in _json_lines(p):
        if isinstance(value, Problem):
            yield [value], None
            continue
        c = _Checker(str(p), n)
        if kind == "prompts":
            _check_prompt(c, value, "", prompt_required=True)
            yield c.problems, value
        else:
            yield c.problems, _pair(c, value, p.parent)


def _open_table(p: Path) -> tuple[Iterable[dict], set[str], Path]:
    """Rows (in batches, so a large table is not read whole), column names, and the root for relative paths."""
    try:
        if p.is_file() and p.suffix == ".parquet":
            table = pq.ParquetFile(p)
            rows = (row for batch in table.iter_batches(batch_size=64) for row in batch.to_pylist())
            return rows, set(table.schema_arrow.names), p.parent
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            raise SpatialScoreError(f"{p} holds several splits; pass one split's directory, e.g. {p / 'train'}")
        if p.is_dir() and any((p / name).is_file() for name in ("dataset_info.json", "state.json")):
            import datasets  # slow to import; only HF directories need it

            ds = datasets.load_from_disk(str(p))
            # Arrow format hands image columns over undecoded, as {bytes, path} structs
            batches = ds.with_format("arrow").iter(batch_size=64)
            return (row for batch in batches for row in batch.to_pylist()), set(ds.column_names), p
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SpatialScoreError(f"{p}: cannot open as a table: {e}") from e
    raise SpatialScoreError(f"{p}: not a recognised data file; accepted: {ACCEPTED}")


def _scan(p: Path, expect: str | None) -> tuple[str, Iterator[_Item]]:
    """(format name, one item per record); a problem-free item with value None is a Pick-a-Pic tie."""
    if p.is_file() and p.suffix == ".jsonl":
        kind = _sniff(p)
        if expect and kind and kind != expect:
            raise SpatialScoreError(f"{p} holds {_KIND_NAMES[kind]}, expected {_KIND_NAMES[expect]}")
        kind = kind or expect
        if kind is None:
            raise SpatialScoreError(
                f"{p}: cannot tell the format: no JSON object with 'chosen' (pairs) or 'include' (prompt metadata)"
            )
        return f"{kind}-jsonl", _jsonl_items(p, kind)
    if expect == "prompts":
        raise SpatialScoreError(f"{p}: prompt metadata must be a .jsonl file")
    rows, columns, root = _open_table(p)
    if PICKAPIC_COLUMNS <= columns:
        fmt, build = "pickapic", _pickapic
    elif PAIR_COLUMNS <= columns:
        fmt, build = "pairs-table", _table_pair
    else:
        raise SpatialScoreError(f"{p}: columns {', '.join(sorted(columns))} match no format; accepted: {ACCEPTED}")

    def items() -> Iterator[_Item]:
        for n, row in enumerate(rows, 1):
            c = _Checker(str(p), n)
            value = build(c, row, root, f"{p.stem}-{n}")
            yield c.problems, value

    return fmt, items()


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise SpatialScoreError(f"{p}: no such file")
    return p


@contextmanager
def _reading(p: Path) -> Iterator[None]:
    # Reading can still fail midway (a corrupt row group, a permission): report it, not a traceback
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise SpatialScoreError(f"{p}: cannot read: {e}") from e


def _load(path: str | os.PathLike[str], expect: str, on_error: str) -> list:
    if on_error not in ("raise", "skip"):
        raise SpatialScoreError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = _existing(path)
    good: list = []
    shown: list[Problem] = []
    total = bad = ties = 0
    with _reading(p):
        _, items = _scan(p, expect)
        for problems, value in items:
            total += 1
            if problems:
                if on_error == "raise":
                    raise SpatialScoreError(str(problems[0]))
                bad += 1
                shown += problems[: _SHOWN_IN_LOG - len(shown)]
            elif value is None:
                ties += 1
            else:
                good.append(value)
    if bad:
        log.warning(
            "%s: skipped %d of %d records with problems; first:\n  %s", p, bad, total, "\n  ".join(map(str, shown))
        )
    if ties:
        log.warning("%s: skipped %d ties (label_0 == 0.5): a tie says nothing about which image is better", p, ties)
    return good


def load_prompts(path: str | os.PathLike[str], on_error: str = "raise") -> list[dict]:
    """Prompt-metadata JSONL, records returned as parsed (GenEval's file round-trips unchanged)."""
    return _load(path, "prompts", on_error)


def load_pairs(path: str | os.PathLike[str], on_error: str = "raise") -> list[PairRecord]:
    """Pairs from JSONL, parquet, a datasets.save_to_disk directory or a Pick-a-Pic table; images decoded to RGB."""
    return _load(path, "pairs", on_error)


def validate_path(path: str | os.PathLike[str]) -> tuple[str, int, list[Problem]]:
    """(format name, number of records, every problem found); Pick-a-Pic ties count as records, not problems."""
    p = _existing(path)
    count, problems = 0, []
    with _reading(p):
        fmt, items = _scan(p, None)
        for found, _ in items:
            count += 1
            problems += found
    return fmt, count, problems
