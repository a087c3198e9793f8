"""The static HTML report: tables, prompt grids and plots from a small leaderboard with real shapes-world images,
checked as text and rendered in headless Chromium (the screenshot is kept in the test's tmp dir)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image

from spatialscore.data.check import render_prompts
from spatialscore.data.prompts import make_prompts
from spatialscore.eval.leaderboard import Leaderboard, RunRecord
from spatialscore.eval.report import write_report

BENCHMARK, PAIR_SET, SAMPLES, MAX_PROMPTS = "shapes-short", "shapes-pairs", 2, 4
TITLE = "spatialscore <demo> & co"


def _generator_run(name: str, prompts: list[dict], image_dirs: list, oracle: float, model_path: str,
                   relative: bool) -> RunRecord:
    images, scores = [], []
    for i in range(len(prompts)):
        for s, directory in enumerate(image_dirs):
            path = directory / f"{i:05d}.png"
            images.append((i, s, str(path.relative_to(directory.parents[1])) if relative else str(path)))
            scores += [(i, s, "spatialscore", 0.5 + 0.1 * s), (i, s, "oracle", float((i + s) % 2))]
    tags = sorted({p["tag"] for p in prompts})
    metrics = {"oracle": oracle, "oracle/clause/position": oracle + 0.05, "spatialscore": oracle / 2,
               **{f"oracle/{tag}": oracle * (k + 1) / len(tags) for k, tag in enumerate(tags)}}
    return RunRecord(kind="generator", model=name, model_path=model_path, benchmark=BENCHMARK,
                     settings={"heads": ["spatialscore"], "images_per_prompt": SAMPLES, "seed": 0, "guidance": 4.0},
                     metrics=metrics, prompts=prompts, images=images, scores=scores)


def _reward_run(name: str, accuracy: float, model_path: str | None) -> RunRecord:
    kinds = {f"accuracy/{kind}": accuracy - 0.01 * k for k, kind in enumerate(("attribute", "count", "flip", "swap"))}
    return RunRecord(kind="reward", model=name, model_path=model_path, benchmark=PAIR_SET, settings={},
                     metrics={"accuracy": accuracy, **kinds, "accuracy/n=1": accuracy + 0.01,
                              "accuracy/n=2-3": accuracy - 0.02})


@pytest.fixture
def report(tmp_path, monkeypatch):
    """A leaderboard with base and tuned generators (2 images per prompt, one file missing, the tuned run's paths
    relative to the cwd), two reward models, and training logs beside the tuned generator and SpatialScore."""
    monkeypatch.chdir(tmp_path)
    prompts = make_prompts(8, seed=0)
    dirs = {run: [tmp_path / "images" / f"{run}-{s}" for s in range(SAMPLES)] for run in ("base", "tuned")}
    for k, directory in enumerate(dirs["base"] + dirs["tuned"]):
        render_prompts(prompts, directory, seed=k, size=64, progress=False)
    (dirs["base"][1] / "00000.png").unlink()
    grpo = tmp_path / "grpo"
    (grpo / "final" / "pipeline").mkdir(parents=True)
    (grpo / "metrics.jsonl").write_text(
        "\n".join(f'{{"step": {s}, "reward_mean": {0.3 + 0.05 * s}, "kl": 0.001}}' for s in range(1, 9))
        + '\n{"step": 4, "eval_oracle_accuracy": 0.4}\nnot json at all\n{"step": 8, "eval_oracle_accuracy": 0.6}\n')
    reward = tmp_path / "reward"
    (reward / "final").mkdir(parents=True)
    (reward / "metrics.jsonl").write_text('{"step": 0, "world_size": 1}\n' + "\n".join(
        f'{{"step": {s}, "loss": {1 / s}, "preference_loss": {0.7 / s}, "val_accuracy": {0.5 + 0.05 * s}}}'
        for s in range(1, 10)) + '\n{"step": 10, "loss": NaN, "val_accuracy": "broken"\n')
    db = Leaderboard(tmp_path / "db" / "leaderboard.sqlite")
    db.record(_generator_run("base", prompts, dirs["base"], 0.25, str(tmp_path / "no-such-model"), relative=False))
    db.record(_generator_run("tuned", prompts, dirs["tuned"], 0.75, str(grpo / "final" / "pipeline"), relative=True))
    db.record(_reward_run("spatialscore", 0.958, str(reward / "final")))
    db.record(_reward_run("clip", 0.61, None))
    path = write_report(db, tmp_path / "report", title=TITLE, max_prompts=MAX_PROMPTS)
    db.close()
    return path, prompts


def _pngs(html: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        assert image.format == "PNG"
        image.load()
        images.append(image)
    return images


def test_report_tables_grids_and_plots(report, tmp_path):
    path, prompts = report
    assert path == tmp_path / "report" / "index.html"
    html = path.read_text()
    assert "&lt;demo&gt; &amp; co" in html and "<demo>" not in html
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)  # self-contained
    # the generator ranking: best oracle first, figures to 3 decimals, the best in bold
    ranking = html[html.index(f"<h3>Benchmark {BENCHMARK}</h3>"): html.index("<h2>Reward models</h2>")]
    assert ranking.index("<td>tuned</td>") < ranking.index("<td>base</td>")
    assert "<b>0.750</b>" in ranking and "<b>0.800</b>" in ranking and ">0.250<" in ranking
    assert "relation acc." in ranking and "spatialscore (mean)" in ranking and "position" in ranking
    # the reward-model table, as in the paper's Table 1
    rewards = html[html.index(f"<h3>Pair set {PAIR_SET}</h3>"): html.index("<h2>Images per prompt</h2>")]
    for column in ("accuracy", "attribute", "swap", "n=1", "n=2-3"):
        assert f"<th>{column}</th>" in rewards
    assert rewards.index("<td>spatialscore</td>") < rewards.index("<td>clip</td>")
    assert "<b>0.958</b>" in rewards and ">0.610<" in rewards
    # the image grids: MAX_PROMPTS rows, spread over the tags, both generators, the missing file shown as such
    grid = html[html.index("<h2>Images per prompt</h2>"): html.index("<h2>Training curves</h2>")]
    rows = re.findall(r'<td class="prompt">(.*?)<br><span class="tag">(.*?)</span>', grid)
    assert len(rows) == MAX_PROMPTS
    assert len({tag for _, tag in rows}) == min(MAX_PROMPTS, len({p["tag"] for p in prompts}))
    assert {text for text, _ in rows} <= {p["prompt"].replace('"', "&quot;") for p in prompts}
    assert grid.count('class="missing"') == 1 and "oracle ✓" in grid and "oracle ✗" in grid and "0.60" in grid
    # every embedded PNG decodes: the sample images, the per-tag bars and the two training logs' curves
    images = _pngs(html)
    assert len(images) == MAX_PROMPTS * 2 * SAMPLES - 1 + 1 + 2
    assert sum(image.size == (64, 64) for image in images) == MAX_PROMPTS * 2 * SAMPLES - 1
    assert html.count('alt="training curves of') == 2 and 'alt="oracle accuracy per tag' in html


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1280,2400",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(report, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (launch/setup.sh installs it)")
    path, _ = report
    screenshot = tmp_path / "report.png"
    done = _chromium(tmp_path, f"--screenshot={screenshot}", path.as_uri())
    assert screenshot.is_file(), done.stderr[-2000:]
    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 50  # text, tables, images and plots, not a blank page
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", path.as_uri()).stdout
    counted = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert counted, dom[:2000]
    loaded, total = map(int, counted.groups())
    assert loaded == total > 0
