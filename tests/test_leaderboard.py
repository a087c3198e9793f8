"""The SQLite leaderboard: round trips, reruns that replace, concurrent writers, refusing bad files, migrations."""

import json
import multiprocessing as mp
import sqlite3

import pytest

from spatialscore.cli import main
from spatialscore.errors import SpatialScoreError
from spatialscore.eval import leaderboard as lb
from spatialscore.eval.leaderboard import Leaderboard, RunRecord


def _run(model="base", benchmark="shapes-short", seed=0, oracle=0.5, n_prompts=3, samples=2):
    prompts = [{"prompt": f"a red circle left of a blue square {i}", "tag": "position"} for i in range(n_prompts)]
    return RunRecord(
        kind="generator", model=model, benchmark=benchmark, settings={"seed": seed, "images_per_prompt": samples},
        metrics={"oracle": oracle, "oracle/position": oracle, "spatialscore": -1.5},
        metric_counts={"oracle": n_prompts * samples}, prompts=prompts,
        images=[(i, s, f"img/{model}/{i}-{s}.png") for i in range(n_prompts) for s in range(samples)],
        scores=[(i, s, h, float(i + s)) for i in range(n_prompts) for s in range(samples)
                for h in ("oracle", "spatialscore")],
        model_path=f"runs/{model}", benchmark_source="data/benchmarks/shapes-short.jsonl", n_prompts=n_prompts)


def test_round_trip_and_prompt_view(tmp_path):
    with Leaderboard(tmp_path / "lb.sqlite") as db:
        run_id = db.record(_run())
        (run,) = db.runs()
        assert run["id"] == run_id and run["model"] == "base" and run["benchmark"] == "shapes-short"
        assert run["metrics"]["oracle/position"] == 0.5 and run["config"]["settings"]["seed"] == 0
        prompts = db.prompts(run_id)
        assert [len(p["images"]) for p in prompts] == [2, 2, 2]
        assert prompts[1]["images"][1]["scores"] == {"oracle": 2.0, "spatialscore": 2.0}
        view = db.db.execute("SELECT score, n FROM prompt_scores WHERE run_id = ? AND prompt_idx = 2 AND "
                             "head = 'oracle'", (run_id,)).fetchone()
        assert tuple(view) == (2.5, 2)


def test_rerun_replaces_and_other_settings_add(tmp_path):
    with Leaderboard(tmp_path / "lb.sqlite") as db:
        db.record(_run(oracle=0.2))
        first = db.counts()
        db.record(_run(oracle=0.4))  # the same evaluation again
        assert db.counts() == first
        assert [r["metrics"]["oracle"] for r in db.runs()] == [0.4]
        db.record(_run(seed=1))  # another seed is another evaluation
        db.record(_run(model="tuned"))
        assert len(db.runs()) == 3 and db.counts()["models"] == 2


def _writer(path, name, n):
    with Leaderboard(path) as db:
        for i in range(n):
            db.record(_run(model=f"{name}-{i}", n_prompts=4, samples=2))


def test_two_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "lb.sqlite"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, name, 25)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    with Leaderboard(path) as db:
        counts = db.counts()
    assert counts["runs"] == 50 and counts["models"] == 50 and counts["metrics"] == 150
    assert counts["prompts"] == 200 and counts["images"] == 400 and counts["image_scores"] == 800


def test_garbage_file_is_refused_untouched(tmp_path):
    path = tmp_path / "lb.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    before = path.read_bytes()
    with pytest.raises(SpatialScoreError, match="not a SQLite database"):
        Leaderboard(path)
    assert path.read_bytes() == before


def test_damaged_database_is_refused(tmp_path):
    path = tmp_path / "lb.sqlite"
    with Leaderboard(path) as db:
        db.record(_run())
        db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # header kept, the schema page smashed
    path.write_bytes(bytes(data))
    with pytest.raises(SpatialScoreError, match=str(path)):
        Leaderboard(path)


def test_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    other.commit()
    other.close()
    before = path.read_bytes()
    with pytest.raises(SpatialScoreError, match="not a spatialscore leaderboard"):
        Leaderboard(path)
    assert path.read_bytes() == before and not (tmp_path / "other.sqlite-wal").exists()  # not even put in WAL mode


def test_missing_file_is_not_created_for_readers(tmp_path, capsys):
    path = tmp_path / "none.sqlite"
    with pytest.raises(SpatialScoreError, match="no leaderboard there yet"):
        Leaderboard(path, create=False)
    assert main(["leaderboard", "show", "--db", str(path)]) == 2
    assert "no leaderboard there yet" in capsys.readouterr().err
    assert not path.exists()


def test_newer_schema_is_refused_and_migrations_upgrade(tmp_path, monkeypatch):
    path = tmp_path / "lb.sqlite"
    with Leaderboard(path) as db:
        db.record(_run())
    monkeypatch.setattr(lb, "MIGRATIONS", [*lb.MIGRATIONS, "ALTER TABLE runs ADD COLUMN note TEXT"])
    monkeypatch.setattr(lb, "SCHEMA_VERSION", len(lb.MIGRATIONS))
    with Leaderboard(path) as db:  # upgraded in place, the old run kept
        assert db.db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert len(db.runs()) == 1 and "note" in db.runs()[0]
    monkeypatch.setattr(lb, "SCHEMA_VERSION", 1)
    monkeypatch.setattr(lb, "MIGRATIONS", lb.MIGRATIONS[:1])
    with pytest.raises(SpatialScoreError, match="newer spatialscore"):
        Leaderboard(path)


def test_leaderboard_show_ranks(tmp_path, capsys):
    path = tmp_path / "lb.sqlite"
    with Leaderboard(path) as db:
        db.record(_run(model="base", oracle=0.1))
        db.record(_run(model="tuned", oracle=0.3))
    assert main(["leaderboard", "show", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.index("tuned") < out.index("base") and "0.300" in out
    assert main(["--json", "leaderboard", "show", "--db", str(path), "--benchmark", "shapes-short"]) == 0
    assert {r["model"] for r in json.loads(capsys.readouterr().out)} == {"base", "tuned"}
    assert main(["leaderboard", "show", "--db", str(path), "--metric", "nope"]) == 2
    assert "--metric nope" in capsys.readouterr().err
    with Leaderboard(path) as db:  # a reward run beside them, and a run that measured nothing
        db.record(RunRecord(kind="reward", model="rm", benchmark="pairs", settings={}, metrics={"accuracy": 0.9}))
        db.record(RunRecord(kind="generator", model="empty", benchmark="bare", settings={}, metrics={}))
    assert main(["leaderboard", "show", "--db", str(path), "--metric", "oracle/position"]) == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "rm" not in out  # only the tables that have the metric
    assert main(["leaderboard", "show", "--db", str(path)]) == 0
    assert "empty" in capsys.readouterr().out


def test_paths_are_stored_relative_to_the_database_folder(tmp_path, monkeypatch):
    home = tmp_path / "runs"
    run = _run()
    run.images = [(0, 0, str(home / "eval" / "a.png")), (1, 0, "/elsewhere/b.png")]
    run.model_path = str(home / "grpo")
    with Leaderboard(home / "lb.sqlite") as db:
        run_id = db.record(run)
        stored = [r[0] for r in db.db.execute("SELECT path FROM images ORDER BY prompt_idx")]
    assert stored == ["eval/a.png", "/elsewhere/b.png"]
    moved = tmp_path / "moved"
    home.rename(moved)
    monkeypatch.chdir(tmp_path)
    with Leaderboard(moved / "lb.sqlite") as db:  # the folder moved as a whole: paths follow it
        assert db.prompts(run_id)[0]["images"][0]["path"] == str(moved / "eval" / "a.png")
        assert db.runs()[0]["model_path"] == str(moved / "grpo")


def test_eval_reward_records_its_accuracies(tmp_path, capsys):
    pairs = tmp_path / "heldout"
    assert main(["data", "make-pairs", "--out", str(pairs), "--n", "8", "--seed", "5", "workers=1"]) == 0
    capsys.readouterr()
    db = tmp_path / "lb.sqlite"
    argv = ["--json", "eval-reward", "--reward", "oracle", "--pairs", str(pairs / "pairs.jsonl"), "--db", str(db)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(argv) == 0  # the same evaluation again replaces it
    capsys.readouterr()
    with Leaderboard(db) as board:
        (run,) = board.runs(kind="reward")
    assert run["benchmark"] == "heldout" and run["model"] == "oracle"
    assert run["metrics"]["accuracy"] == report["overall"]
    assert {k for k in run["metrics"] if k.startswith("accuracy/n=")} == {f"accuracy/n={k}" for k in report["by_n"]}
