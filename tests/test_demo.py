"""The demo's wiring, every stage tiny (`--quick`): what it makes, and that a rerun reuses finished stages."""

import json
import shutil

from spatialscore.cli import main
from spatialscore.eval.leaderboard import Leaderboard


def test_quick_demo_end_to_end_and_rerun_reuses(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--json", "demo", "--quick", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    for made in ("pairs/train/pairs.jsonl", "pairs/heldout/pairs.jsonl", "pairs.png", "reward/final/model.safetensors",
                 "clip/final/model.safetensors", "base/metrics.json", "grpo/result.json",
                 "grpo/final/pipeline/model_index.json", "grpo/eval/metrics.json", "leaderboard.sqlite",
                 "report/index.html", "summary.json"):
        assert (out / made).exists(), made
    assert set(result["rewards"]) == {"spatialscore (demo fine-tune)", "spatialscore (shipped)", "clip-dual baseline"}
    assert result["pairs"]["chosen_pass"] == 1.0  # held-out pairs are clean renders the oracle can check
    with Leaderboard(out / "leaderboard.sqlite") as db:
        first = db.counts()
        assert {r["model"] for r in db.runs(kind="generator")} == {"base: shapes-flow", "tuned: Flow-GRPO"}
    html = (out / "report" / "index.html").read_text()
    assert "tuned: Flow-GRPO" in html and "clip-dual baseline" in html
    stamp = (out / "reward" / "final" / "model.safetensors").stat().st_mtime_ns

    assert main(["demo", "--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("reused") >= 6  # pairs x2, reward, clip, base eval, grpo, tuned eval
    assert (out / "reward" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    with Leaderboard(out / "leaderboard.sqlite") as db:
        assert db.counts() == first  # reward evaluations recorded again replace their runs

    # an interrupted Flow-GRPO run (checkpoints, no final) resumes; the tuned evaluation is made again
    shutil.rmtree(out / "grpo" / "final")
    shutil.rmtree(out / "grpo" / "eval")
    (out / "grpo" / "result.json").unlink()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and (out / "grpo" / "result.json").is_file() and (out / "grpo" / "eval").is_dir()


def test_demo_refuses_a_foreign_folder_and_other_sizes(tmp_path, capsys):
    mine = tmp_path / "experiments"
    (mine / "reward").mkdir(parents=True)
    (mine / "reward" / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(mine)]) == 2
    assert "not a demo directory" in capsys.readouterr().err and (mine / "reward" / "notes.txt").is_file()
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo-sizes.json").write_text(json.dumps({"train_pairs": 1}))
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
