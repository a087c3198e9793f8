"""`spatialscore eval`: a generator (or images made elsewhere) on a benchmark, scored, judged and recorded."""

import json
import shutil

import pytest

from spatialscore.cli import main
from spatialscore.data.check import render_prompts
from spatialscore.eval.leaderboard import Leaderboard
from test_benchmarks import GENEVAL_LINES

REWARD = "spatialscore=data/reward/shapes-spatialscore"


def _eval(capsys, *argv):
    code = main(["--json", "eval", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_eval_generator_json_rerun_and_batch_independence(tmp_path, capsys):
    db = str(tmp_path / "lb.sqlite")
    argv = ["--generator", "shapes-flow", "--benchmark", "shapes-short", "--reward", REWARD, "--limit", "3",
            "--images-per-prompt", "2", "--steps", "6", "--db", db]
    code, first, _ = _eval(capsys, *argv, "--batch-size", "4")
    assert code == 0 and set(first) == {"run", "metrics"}
    metrics = first["metrics"]
    assert 0 <= metrics["oracle"] <= 1 and "oracle/single_object" in metrics and "spatialscore" in metrics
    code, again, _ = _eval(capsys, *argv, "--batch-size", "5")  # same evaluation, other batches: same images
    assert code == 0 and again["metrics"] == pytest.approx(metrics, rel=1e-4)  # batched float sums differ a little
    with Leaderboard(db) as board:
        (run,) = board.runs()  # replaced, not duplicated
        prompts = board.prompts(run["id"])
    assert len(prompts) == 3 and all(len(p["images"]) == 2 for p in prompts)
    image = prompts[0]["images"][0]
    assert set(image["scores"]) == {"oracle", "spatialscore"} and image["path"].endswith("00000-0.png")
    code, seeded, _ = _eval(capsys, *argv, "--seed", "1")
    with Leaderboard(db) as board:
        assert len(board.runs()) == 2  # another seed is another run


def test_geneval_metadata_images_judged_by_the_rule_scorer(tmp_path, capsys):
    """GenEval's own format: its metadata file and its image layout (DIR/00000/samples/0000.png)."""
    prompts = [json.loads(line) for line in GENEVAL_LINES.splitlines()]
    bench = tmp_path / "evaluation_metadata.jsonl"
    bench.write_text(GENEVAL_LINES)
    flat = tmp_path / "flat"
    render_prompts(prompts, flat, seed=3, progress=False)
    layout = tmp_path / "geneval-out"
    for i in range(len(prompts)):
        (layout / f"{i:05d}" / "samples").mkdir(parents=True)
        shutil.copy(flat / f"{i:05d}.png", layout / f"{i:05d}" / "samples" / "0000.png")
    db = str(tmp_path / "lb.sqlite")
    code, result, _ = _eval(capsys, "--images", str(layout), "--benchmark", str(bench), "--name", "faithful",
                            "--db", db)
    assert code == 0, _
    assert result["metrics"]["oracle"] == 1.0
    assert {k for k in result["metrics"] if k.startswith("oracle/") and "clause" not in k} == \
        {f"oracle/{p['tag']}" for p in prompts} | {"oracle/images"}
    # the same images under the wrong prompts (shifted by one) mostly fail
    for i in range(len(prompts)):
        shutil.copy(flat / f"{(i + 1) % len(prompts):05d}.png", layout / f"{i:05d}" / "samples" / "0000.png")
    code, wrong, _ = _eval(capsys, "--images", str(layout), "--benchmark", str(bench), "--name", "shuffled",
                           "--db", db)
    assert code == 0 and wrong["metrics"]["oracle"] <= 0.3
    with Leaderboard(db) as board:
        assert {r["model"] for r in board.runs()} == {"faithful", "shuffled"}


def test_eval_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    db = str(tmp_path / "lb.sqlite")
    bare = tmp_path / "spatial_val.txt"  # T2I-CompBench: prompts without metadata
    bare.write_text("a dog on the left of a cat\n")
    cases = [
        (["--generator", str(tmp_path / "nope"), "--benchmark", "shapes-short"], "not a pipeline directory"),
        (["--benchmark", "shapes-short"], "either --generator"),
        (["--generator", "shapes-flow", "--images", str(tmp_path), "--benchmark", "shapes-short"], "either"),
        (["--generator", "shapes-flow", "--benchmark", "shapes-shrot"], "shapes-short"),
        (["--generator", "shapes-flow", "--benchmark", "shapes-short", "--reward", "nosuchhead"], "nosuchhead"),
        (["--generator", "shapes-flow", "--benchmark", "shapes-short", "--images-per-prompt", "0"],
         "--images-per-prompt"),
        (["--images", str(tmp_path / "none"), "--benchmark", "shapes-short"], "no such directory"),
        (["--generator", "shapes-flow"], "--benchmark NAME_OR_FILE is required"),
        (["--generator", "shapes-flow", "--benchmark", "shapes-short", "--batch-size", "0"], "--batch-size"),
        (["--generator", "shapes-flow", "--benchmark", "shapes-short", "--steps", "0"], "--steps"),
        (["--generator", "shapes-flow", "--benchmark", str(bare)], "nothing would be measured"),
        (["--generator", "shapes-flow", "--benchmark", "geneval"], "nothing would be measured"),  # COCO classes
    ]
    for argv, message in cases:
        code, _, err = _eval(capsys, *argv, "--db", db)
        assert code == 2 and message in err, (argv, err)


def test_eval_lists_the_shipped_benchmarks(capsys):
    assert main(["--json", "eval", "--list"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["shapes-short"]["prompts"] == 220 and rows["shapes-long"]["prompts"] == 100 and "geneval" in rows


def test_oracle_overall_is_the_mean_over_tags():
    from spatialscore.eval.runner import summarise

    records = [{"tag": "a"}] * 3 + [{"tag": "b"}]
    verdicts = [[{"passed": ok, "clauses": {"position": [ok]}}] for ok in (True, True, True, False)]
    metrics, counts = summarise(records, {}, verdicts)
    assert metrics["oracle"] == 0.5 and metrics["oracle/images"] == 0.75 and counts["oracle"] == 4
    assert metrics["oracle/clause/position"] == 0.75
