"""The leaderboard: one SQLite file holding every evaluation of generators and reward models.

Schema (version in `PRAGMA user_version`, upgraded by the ordered `MIGRATIONS`):
- `meta`: the file's owner mark (`app`), so a foreign database is refused instead of written into.
- `models` (kind generator | reward, name, path) and `benchmarks` (name, source, prompt count).
- `runs`: one evaluation; `key` names it (model, benchmark and every setting that changes the numbers), so running
  the same evaluation again replaces its run instead of adding a second one. It keeps the resolved config (JSON),
  the git revision, the time it took and its output directory.
- `metrics` (run, name, value, n): the aggregates the tables show (`oracle`, `oracle/position`, `<head>`,
  `accuracy/swap`, ...).
- `prompts`, `images` and `image_scores`: every prompt, every image path and every head's score of every image;
  the view `prompt_scores` averages them per prompt.

Writers use WAL, `BEGIN IMMEDIATE` and retries, so concurrent evaluations lose nothing; each run is written in one
transaction, so a crash leaves the old run or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from spatialscore.errors import SpatialScoreError

log = logging.getLogger(__name__)

DEFAULT_DB = Path("runs") / "leaderboard.sqlite"
APP = "spatialscore-leaderboard"
KINDS = ("generator", "reward")

MIGRATIONS = [
    # 1: the first schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE models (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('generator', 'reward')),
        name TEXT NOT NULL, path TEXT, UNIQUE (kind, name));
    CREATE TABLE benchmarks (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, source TEXT, n_prompts INTEGER);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('generator', 'reward')),
        model_id INTEGER NOT NULL REFERENCES models (id),
        benchmark_id INTEGER NOT NULL REFERENCES benchmarks (id), model_path TEXT,
        config TEXT NOT NULL, git_rev TEXT, created REAL NOT NULL, seconds REAL, out_dir TEXT);
    CREATE TABLE metrics (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE, name TEXT NOT NULL,
        value REAL NOT NULL, n INTEGER, PRIMARY KEY (run_id, name));
    CREATE TABLE prompts (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE, idx INTEGER NOT NULL,
        prompt TEXT NOT NULL, tag TEXT, meta TEXT, PRIMARY KEY (run_id, idx));
    CREATE TABLE images (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE, prompt_idx INTEGER NOT NULL,
        sample INTEGER NOT NULL, path TEXT NOT NULL, PRIMARY KEY (run_id, prompt_idx, sample));
    CREATE TABLE image_scores (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE, prompt_idx INTEGER NOT NULL,
        sample INTEGER NOT NULL, head TEXT NOT NULL, score REAL,
        PRIMARY KEY (run_id, prompt_idx, sample, head));
    CREATE VIEW prompt_scores AS
        SELECT run_id, prompt_idx, head, AVG(score) AS score, COUNT(score) AS n
        FROM image_scores GROUP BY run_id, prompt_idx, head;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class RunRecord:
    """One evaluation, as the runner hands it over. `settings` are what make two evaluations of the same model
    on the same benchmark differ (heads, seed, images per prompt, steps, guidance): they and the names form the
    run's key."""

    kind: str
    model: str
    benchmark: str
    settings: dict
    metrics: dict[str, float]
    config: dict = field(default_factory=dict)
    model_path: str | None = None
    benchmark_source: str | None = None
    n_prompts: int | None = None
    metric_counts: dict[str, int] = field(default_factory=dict)
    prompts: list[dict] = field(default_factory=list)  # {"prompt", "tag", ...metadata}, in benchmark order
    images: list[tuple[int, int, str]] = field(default_factory=list)  # (prompt index, sample, path)
    scores: list[tuple[int, int, str, float | None]] = field(default_factory=list)  # (prompt, sample, head, score)
    seconds: float | None = None
    out_dir: str | None = None

    @property
    def key(self) -> str:
        blob = json.dumps([self.kind, self.model, self.benchmark, self.settings], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_revision() -> str | None:
    """The project's commit (with `-dirty` when the work tree has changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty else "")


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


class Leaderboard:
    """A leaderboard file. `create=False` (readers: show, report) refuses a missing file instead of making one."""

    RETRIES = 50

    def __init__(self, path: str | Path = DEFAULT_DB, create: bool = True):
        self.path = Path(path)
        if self.path.is_dir():
            raise SpatialScoreError(f"--db {self.path}: is a directory, not a leaderboard file")
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if not exists and not create:
            raise SpatialScoreError(f"--db {self.path}: no leaderboard there yet (run `spatialscore eval` or "
                                    f"`spatialscore eval-reward --db {self.path}` first)")
        if exists and not _is_sqlite(self.path):
            raise SpatialScoreError(f"--db {self.path}: not a SQLite database (corrupt, or another kind of file); "
                                    f"it was left untouched")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = self.path.resolve().parent  # stored paths are relative to the file's folder where they can be
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            if exists:
                self._check_ours()  # before anything that writes (WAL mode rewrites the header)
            self._retry(lambda: self.db.execute("PRAGMA journal_mode = WAL"))
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise SpatialScoreError(f"--db {self.path}: unreadable SQLite database ({err}); it was left "
                                    f"untouched") from None
        except BaseException:
            self.db.close()
            raise

    # --- opening --------------------------------------------------------------------------------------------------

    def _check_ours(self) -> None:
        """Refuse another application's database, a damaged one, or one from a newer spatialscore."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        if tables:
            app = None
            if "meta" in tables:
                row = self.db.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
                app = row[0] if row else None
            if app != APP:
                raise SpatialScoreError(f"--db {self.path}: a SQLite database of something else (tables: "
                                        f"{', '.join(sorted(tables)[:6])}), not a spatialscore leaderboard; "
                                        f"give another --db path")
            if (problem := self.db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise SpatialScoreError(f"--db {self.path}: the database is damaged ({problem})")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpatialScoreError(f"--db {self.path}: schema version {version} was written by a newer spatialscore "
                                    f"(this one knows up to {SCHEMA_VERSION}); upgrade spatialscore to read it")

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._write():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                log.info("leaderboard %s: schema migrated to version %d", self.path, number + 1)
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('app', ?)", (APP,))
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _retry(self, action):
        for attempt in range(self.RETRIES):
            try:
                return action()
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or attempt == self.RETRIES - 1:
                    raise
                time.sleep(0.05 + random.random() * 0.1 * (attempt + 1))

    @contextmanager
    def _write(self):
        """An immediate write transaction (taken with retries), committed on success, rolled back otherwise."""
        self._retry(lambda: self.db.execute("BEGIN IMMEDIATE"))
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._retry(lambda: self.db.execute("COMMIT"))

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- writing --------------------------------------------------------------------------------------------------

    def _id(self, table: str, unique: dict, extra: dict) -> int:
        where = " AND ".join(f"{k} = ?" for k in unique)
        row = self.db.execute(f"SELECT id FROM {table} WHERE {where}", tuple(unique.values())).fetchone()
        values = {**unique, **{k: v for k, v in extra.items() if v is not None}}
        if row:
            if len(values) > len(unique):
                sets = ", ".join(f"{k} = ?" for k in values if k not in unique)
                self.db.execute(f"UPDATE {table} SET {sets} WHERE id = ?",
                                (*[v for k, v in values.items() if k not in unique], row[0]))
            return row[0]
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        return self.db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(values.values())).lastrowid

    def record(self, run: RunRecord) -> int:
        """Write one evaluation (replacing an earlier run with the same key) in one transaction; its run id."""
        if run.kind not in KINDS:
            raise ValueError(f"run kind {run.kind!r} is not one of {KINDS}")
        revision = git_revision()  # outside the transaction: a subprocess must not hold the write lock
        with self._write():
            self.db.execute("DELETE FROM runs WHERE key = ?", (run.key,))
            model = self._id("models", {"kind": run.kind, "name": run.model}, {"path": self._stored(run.model_path)})
            bench = self._id("benchmarks", {"name": run.benchmark},
                             {"source": run.benchmark_source, "n_prompts": run.n_prompts})
            run_id = self.db.execute(
                "INSERT INTO runs (key, kind, model_id, benchmark_id, model_path, config, git_rev, created, seconds, "
                "out_dir) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.key, run.kind, model, bench, self._stored(run.model_path),
                 json.dumps({"settings": run.settings, **run.config}, default=str), revision, time.time(),
                 run.seconds, self._stored(run.out_dir))).lastrowid
            self.db.executemany("INSERT INTO metrics (run_id, name, value, n) VALUES (?, ?, ?, ?)",
                                [(run_id, k, float(v), run.metric_counts.get(k)) for k, v in run.metrics.items()])
            self.db.executemany(
                "INSERT INTO prompts (run_id, idx, prompt, tag, meta) VALUES (?, ?, ?, ?, ?)",
                [(run_id, i, p["prompt"], p.get("tag"), json.dumps(p)) for i, p in enumerate(run.prompts)])
            self.db.executemany("INSERT INTO images (run_id, prompt_idx, sample, path) VALUES (?, ?, ?, ?)",
                                [(run_id, p, s, self._stored(path)) for p, s, path in run.images])
            self.db.executemany(
                "INSERT INTO image_scores (run_id, prompt_idx, sample, head, score) VALUES (?, ?, ?, ?, ?)",
                [(run_id, p, s, h, None if v is None else float(v)) for p, s, h, v in run.scores])
        return run_id

    def _stored(self, path: str | None) -> str | None:
        """A path as stored: relative to the database's folder when it lies below it (the folder can then move
        as a whole), else absolute; the readers give it back absolute."""
        if path is None:
            return None
        absolute = Path(path).resolve()
        return str(absolute.relative_to(self.root)) if absolute.is_relative_to(self.root) else str(absolute)

    def resolve(self, stored: str | None) -> str | None:
        return None if stored is None else str(self.root / stored)  # an absolute stored path stays as it is

    # --- reading --------------------------------------------------------------------------------------------------

    @contextmanager
    def snapshot(self):
        """Reads inside see one consistent state, whatever writers commit meanwhile (WAL read transaction)."""
        self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.execute("COMMIT")

    def runs(self, kind: str | None = None, benchmark: str | None = None) -> list[dict]:
        """Every run (newest first) with its model, benchmark, settings and metrics."""
        query = ("SELECT runs.*, models.name AS model, benchmarks.name AS benchmark "
                 "FROM runs JOIN models ON models.id = runs.model_id "
                 "JOIN benchmarks ON benchmarks.id = runs.benchmark_id WHERE 1")
        args: list = []
        if kind:
            query += " AND runs.kind = ?"
            args.append(kind)
        if benchmark:
            query += " AND benchmarks.name = ?"
            args.append(benchmark)
        out = []
        for row in self.db.execute(query + " ORDER BY runs.created DESC, runs.id DESC", args).fetchall():
            run = dict(row)
            run["config"] = json.loads(run["config"])
            run["model_path"], run["out_dir"] = self.resolve(run["model_path"]), self.resolve(run["out_dir"])
            run["metrics"] = {r["name"]: r["value"] for r in
                              self.db.execute("SELECT name, value FROM metrics WHERE run_id = ?", (run["id"],))}
            out.append(run)
        return out

    def benchmarks(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM benchmarks ORDER BY name")]

    def prompts(self, run_id: int) -> list[dict]:
        """A run's prompts in order, each with its images: [{"prompt", "tag", "meta", "images": [{"sample",
        "path", "scores": {head: score}}]}]."""
        prompts = [{"prompt": r["prompt"], "tag": r["tag"], "meta": json.loads(r["meta"] or "{}"), "images": []}
                   for r in self.db.execute("SELECT * FROM prompts WHERE run_id = ? ORDER BY idx", (run_id,))]
        scores: dict[tuple[int, int], dict[str, float | None]] = {}
        for r in self.db.execute("SELECT * FROM image_scores WHERE run_id = ?", (run_id,)):
            scores.setdefault((r["prompt_idx"], r["sample"]), {})[r["head"]] = r["score"]
        for r in self.db.execute("SELECT * FROM images WHERE run_id = ? ORDER BY prompt_idx, sample", (run_id,)):
            if r["prompt_idx"] < len(prompts):
                prompts[r["prompt_idx"]]["images"].append(
                    {"sample": r["sample"], "path": self.resolve(r["path"]),
                     "scores": scores.get((r["prompt_idx"], r["sample"]), {})})
        return prompts

    def counts(self) -> dict[str, int]:
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("models", "benchmarks", "runs", "metrics", "prompts", "images", "image_scores")}
