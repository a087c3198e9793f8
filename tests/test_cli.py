"""The CLI end to end: help texts, data commands, and bad input ending in a clear message and exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spatialscore.cli import build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_lists_every_verb():
    exe = Path(sys.executable).parent / "spatialscore"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for verb in ("data", "recipes", "heads", "demo"):
        assert verb in result.stdout
    assert "example:" in result.stdout


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_verb_help_ends_with_a_runnable_example():
    for parser in _all_parsers(build_parser()):
        assert parser.format_help().rstrip().split("\n")[-2:][0].strip().startswith(("example:", "spatialscore")), \
            parser.prog
        assert "spatialscore " in parser.epilog, parser.prog


def test_make_prompts_pairs_validate_and_check(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    assert run(capsys, "data", "make-prompts", "--out", str(prompts), "--n", "6", "--seed", "1")[0] == 0
    assert len(prompts.read_text().splitlines()) == 6
    code, out, _ = run(capsys, "--json", "data", "make-pairs", "--out", str(tmp_path / "pairs"), "--n", "6",
                       "workers=1")
    assert code == 0 and json.loads(out)["n"] == 6
    assert (tmp_path / "pairs" / "config.yaml").read_text().count("workers: 1") == 1
    code, out, _ = run(capsys, "data", "validate", str(tmp_path / "pairs" / "pairs.jsonl"))
    assert code == 0 and "0 problem(s)" in out
    assert run(capsys, "data", "render", "--prompts", str(prompts), "--out", str(tmp_path / "img"))[0] == 0
    code, out, _ = run(capsys, "--json", "data", "check", "--prompts", str(prompts), "--images",
                       str(tmp_path / "img"), "--workers", "1")
    assert code == 0 and json.loads(out)["accuracy"] == 1.0
    code, out, _ = run(capsys, "--json", "data", "check", "--pairs", str(tmp_path / "pairs" / "pairs.jsonl"))
    report = json.loads(out)
    assert code == 0 and report["chosen_pass"] == 1.0 and report["rejected_detected"] == 1.0


def test_recipes_ls_cp_validate(tmp_path, capsys):
    code, out, _ = run(capsys, "recipes", "ls")
    assert code == 0 and "shapes/pairs" in out
    assert run(capsys, "recipes", "cp", "shapes/pairs", str(tmp_path))[0] == 0
    code, out, _ = run(capsys, "recipes", "validate", str(tmp_path / "pairs.yaml"), "n=3")
    assert code == 0 and "'n': 3" in out
    code, _, err = run(capsys, "recipes", "cp", "shapes/pairs", str(tmp_path))
    assert code == 2 and "already exists" in err


@pytest.fixture
def pairs_dir(tmp_path, capsys):
    run(capsys, "data", "make-pairs", "--out", str(tmp_path / "pairs"), "--n", "3", "workers=1")
    return tmp_path / "pairs"


def _rewrite_line(path: Path, index: int, fn):
    lines = path.read_text().splitlines()
    lines[index] = fn(lines[index])
    path.write_text("\n".join(lines) + "\n")


def test_corrupt_png_is_reported(pairs_dir, capsys):
    png = pairs_dir / "images" / "000001-chosen.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    code, _, err = run(capsys, "data", "validate", str(pairs_dir / "pairs.jsonl"))
    assert code == 2 and "pairs.jsonl:2" in err and "chosen" in err


def test_missing_image_is_reported(pairs_dir, capsys):
    (pairs_dir / "images" / "000002-rejected.png").unlink()
    code, _, err = run(capsys, "data", "validate", str(pairs_dir / "pairs.jsonl"))
    assert code == 2 and "pairs.jsonl:3" in err and "rejected" in err


def test_truncated_jsonl_line_is_reported(pairs_dir, capsys):
    _rewrite_line(pairs_dir / "pairs.jsonl", 0, lambda line: line[: len(line) // 2])
    code, _, err = run(capsys, "data", "validate", str(pairs_dir / "pairs.jsonl"))
    assert code == 2 and "pairs.jsonl:1" in err and "JSON" in err
    code, _, err = run(capsys, "data", "check", "--pairs", str(pairs_dir / "pairs.jsonl"))
    assert code == 2 and err.startswith("error: ") and "pairs.jsonl:1" in err and "Traceback" not in err


def test_unknown_relation_is_reported(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x", "tag": "position", "include": [
        {"class": "circle", "count": 1}, {"class": "star", "count": 1, "position": ["behind", 0]}]}) + "\n")
    code, _, err = run(capsys, "data", "validate", str(prompts))
    assert code == 2 and "p.jsonl:1" in err and "behind" in err and "left of" in err


def test_unknown_config_key_and_bad_override_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "data", "make-pairs", "--out", str(tmp_path / "x"), "seeed=1")
    assert code == 2 and "unknown key 'seeed'" in err and "did you mean 'seed'" in err
    code, _, err = run(capsys, "recipes", "validate", "shapes/pairs", "n:3")
    assert code == 2 and "bad override 'n:3'" in err
    assert not (tmp_path / "x").exists()


def test_errors_exit_2_without_traceback_from_a_real_process(tmp_path):
    exe = shutil.which("spatialscore", path=str(Path(sys.executable).parent))
    result = subprocess.run([exe, "data", "validate", str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2 and "nope.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_overrides_may_follow_the_options(tmp_path, capsys):
    # the override after --out reaches the config (and its typo is named), not argparse's "unrecognized arguments"
    code, _, err = run(capsys, "train-generator", "recipes/shapes/base_flow.yaml", "--out", str(tmp_path / "g"),
                       "train.stepz=1")
    assert code == 2 and "unknown key 'train.stepz'" in err and "did you mean 'steps'" in err
    assert not (tmp_path / "g").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["train-generator", "recipes/shapes/base_flow.yaml", "--out", str(tmp_path / "g"), "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
