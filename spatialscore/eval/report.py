"""`spatialscore leaderboard report`: one static HTML page of a leaderboard — the generator ranking per benchmark
and tag, the reward-model table (the SpatialScore paper's Table 1), image grids per prompt (every generator side by
side, each image with its scores) and matplotlib plots of per-tag accuracy and of training curves.

Every image and plot is embedded as a data URI and the style sheet is inline, so the page is one file that opens
anywhere, offline, and can be mailed or archived as it is."""

from __future__ import annotations

import base64
import io
import json
import math
import mimetypes
from datetime import datetime
from html import escape
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spatialscore.eval.leaderboard import Leaderboard
from spatialscore.io import atomic_write_text

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "long", "text")
PERTURBATIONS = ("attribute", "count", "flip", "swap", "text")
LOG_NAMES = ("metrics.jsonl", "training-metrics.jsonl")  # a training run's log; a shipped model's copy of it
# the first of these a log has is plotted (generator RL, then a reward model's or a supervised run's loss)
TRAINING_SIGNAL = {"reward_mean": "mean reward", "loss": "loss", "preference_loss": "preference loss"}
HELD_OUT = {"eval_oracle_accuracy": "oracle accuracy (held-out)", "val_accuracy": "pair accuracy (held-out)",
            "overall": "oracle accuracy (held-out)"}
MISSING = "–"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ccc; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: left; vertical-align: top; }
td { white-space: nowrap; } td.prompt { white-space: normal; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.images { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; width: 96px; }
figure img, .missing { width: 96px; height: 96px; image-rendering: pixelated; display: block;
                       border: 1px solid #ccc; box-sizing: border-box; }
.missing { border: 2px dashed #c00; color: #c00; display: flex; align-items: center; justify-content: center;
           text-align: center; font-size: 12px; overflow-wrap: anywhere; }
figcaption { font-size: 12px; line-height: 1.3; }
.prompt { max-width: 280px; } .tag { color: #666; font-size: 12px; }
.pass { color: #070; font-weight: bold; } .fail { color: #b00; font-weight: bold; }
img.plot { max-width: 100%; display: block; margin: 8px 0 16px; }
"""

# Counts the images the browser could decode, so a headless check can read "loaded/total" off the page.
SCRIPT = """window.addEventListener("load", () => {
  const all = Array.from(document.images);
  const loaded = all.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.images = loaded + "/" + all.length;
});"""


def write_report(db: Leaderboard, out: Path, title: str = "spatialscore leaderboard", max_prompts: int = 12) -> Path:
    """Write `out/index.html` (atomically) and return its path."""
    generators, rewards = db.runs(kind="generator"), db.runs(kind="reward")
    by_benchmark = _grouped(generators)
    rankings = [_ranking(name, runs) for name, runs in by_benchmark.items()]
    tables = [_reward_table(name, runs) for name, runs in _grouped(rewards).items()]
    grids = [_image_grid(db, name, _ranked(runs), max_prompts) for name, runs in by_benchmark.items()]
    curves = _training_plots(generators + rewards)
    body = [_header(db, title, generators, rewards),
            "<h2>Generators</h2>", *(rankings or ["<p>No generator evaluations yet.</p>"]),
            "<h2>Reward models</h2>", *(tables or ["<p>No reward-model evaluations yet.</p>"]),
            "<h2>Images per prompt</h2>", *(grids or ["<p>No generator images yet.</p>"]),
            "<h2>Training curves</h2>", *(curves or ["<p>No training logs found beside the models.</p>"])]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style><script>{SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = Path(out) / "index.html"
    atomic_write_text(path, page)
    path.chmod(0o644)  # a page to share or serve, not a private temporary file
    return path


def _header(db: Leaderboard, title: str, generators: list[dict], rewards: list[dict]) -> str:
    generated = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return (f"<h1>{escape(title)}</h1><p class=\"meta\">Generated {generated} from <code>{escape(str(db.path))}</code>"
            f": {len(generators)} generator run(s), {len(rewards)} reward-model run(s), "
            f"{len(db.benchmarks())} benchmark(s) and pair set(s).</p>")


def _grouped(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["benchmark"], []).append(run)
    return dict(sorted(groups.items()))


def _ordered(found: set[str], canonical: tuple[str, ...]) -> list[str]:
    return [name for name in canonical if name in found] + sorted(found - set(canonical))


def _heads(runs: list[dict]) -> list[str]:
    return sorted({name for run in runs for name in run["metrics"] if "/" not in name and name != "oracle"})


def _tags(runs: list[dict]) -> list[str]:
    return _ordered({name.split("/", 1)[1] for run in runs for name in run["metrics"]
                     if name.startswith("oracle/") and not name.startswith("oracle/clause/")}, TAGS)


def _ranked(runs: list[dict]) -> list[dict]:
    """By oracle pass rate (or the first head's mean where no run has an oracle), best first; stable, so ties stay
    newest first."""
    key = "oracle" if any("oracle" in run["metrics"] for run in runs) else next(iter(_heads(runs)), None)
    return sorted(runs, key=lambda run: -run["metrics"].get(key, -math.inf))


def _label(run: dict, runs: list[dict]) -> str:
    """The model's name, with the run id where the same model appears twice (other settings)."""
    twice = sum(other["model"] == run["model"] for other in runs) > 1
    return f"{run['model']} (run {run['id']})" if twice else run["model"]


def _metric(name: str):
    return lambda run: run["metrics"].get(name)


def _setting(name: str):
    return lambda run: str(run["config"].get("settings", {}).get(name, MISSING))


def _revision(run: dict) -> str:
    rev = run["git_rev"] or MISSING
    return rev[:8] + ("-dirty" if rev.endswith("-dirty") else "")


def _table(columns: list[tuple[str, object]], runs: list[dict]) -> str:
    """Floats print to 3 decimals, the best (highest) of a column in bold where the column has two or more."""
    cells = [[get(run) for _, get in columns] for run in runs]
    best = []
    for c in range(len(columns)):
        values = [row[c] for row in cells if isinstance(row[c], float)]
        best.append(max(values) if len(values) > 1 else None)
    rows = []
    for row in cells:
        tds = []
        for value, top in zip(row, best):
            if isinstance(value, float):
                text = f"{value:.3f}"
                tds.append(f'<td class="num">{f"<b>{text}</b>" if value == top else text}</td>')
            else:
                tds.append(f"<td>{escape(MISSING if value is None else str(value))}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    head = "".join(f"<th>{escape(name)}</th>" for name, _ in columns)
    return f'<div class="scroll"><table><tr>{head}</tr>\n' + "\n".join(rows) + "</table></div>"


def _ranking(benchmark: str, runs: list[dict]) -> str:
    ranked = _ranked(runs)
    columns = [("model", lambda run: _label(run, runs)), ("oracle", _metric("oracle")),
               ("relation acc.", _metric("oracle/clause/position")),
               *[(tag, _metric(f"oracle/{tag}")) for tag in _tags(runs)],
               *[(f"{head} (mean)", _metric(head)) for head in _heads(runs)],
               ("images / prompt", _setting("images_per_prompt")), ("seed", _setting("seed")),
               ("guidance", _setting("guidance")), ("git", _revision),
               ("date", lambda run: datetime.fromtimestamp(run["created"]).strftime("%Y-%m-%d %H:%M"))]
    plot = _tag_plot(benchmark, ranked)
    return (f"<h3>Benchmark {escape(benchmark)}</h3>" + _table(columns, ranked)
            + (f'<img class="plot" alt="oracle accuracy per tag on {escape(benchmark)}" src="{plot}">' if plot else ""))


def _reward_table(pair_set: str, runs: list[dict]) -> str:
    names = {name.split("/", 1)[1] for run in runs for name in run["metrics"] if name.startswith("accuracy/")}
    kinds = _ordered({name for name in names if not name.startswith("n=")}, PERTURBATIONS)
    counts = sorted(name for name in names if name.startswith("n="))
    ranked = sorted(runs, key=lambda run: -run["metrics"].get("accuracy", -math.inf))
    columns = [("reward model", lambda run: _label(run, runs)), ("accuracy", _metric("accuracy")),
               *[(kind, _metric(f"accuracy/{kind}")) for kind in kinds],
               *[(count, _metric(f"accuracy/{count}")) for count in counts],
               ("git", _revision), ("date", lambda run: datetime.fromtimestamp(run["created"]).strftime("%Y-%m-%d"))]
    return f"<h3>Pair set {escape(pair_set)}</h3>" + _table(columns, ranked)


# --- image grids ----------------------------------------------------------------------------------------------------

def _picked(prompts: list[dict], limit: int) -> list[int]:
    """Up to `limit` prompt indices, taken in turn from each tag (first come, first served), in benchmark order."""
    queues: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        queues.setdefault(prompt.get("tag") or "?", []).append(index)
    picked: list[int] = []
    while len(picked) < limit and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return sorted(picked)


def _data_uri(path: str, roots: list[Path]) -> str | None:
    """The image file as a data URI; relative paths are tried from the cwd, then from `roots`. None if unreadable."""
    for candidate in [Path(path), *(root / path for root in roots)]:
        try:
            data = candidate.read_bytes()
        except OSError:
            continue
        mime = mimetypes.guess_type(candidate.name)[0] or "image/png"
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return None


def _caption(scores: dict) -> str:
    lines = []
    if "oracle" in scores and scores["oracle"] is not None:
        lines.append('<span class="pass">oracle ✓</span>' if scores["oracle"] >= 0.5
                     else '<span class="fail">oracle ✗</span>')
    for head, score in sorted(scores.items()):
        if head != "oracle":
            lines.append(f"{escape(head)} {MISSING if score is None else f'{score:.2f}'}")
    return "<br>".join(lines)


def _figure(image: dict, roots: list[Path]) -> str:
    uri = _data_uri(image["path"], roots)
    picture = (f'<img src="{uri}" width="96" height="96" alt="sample {image["sample"]}">' if uri else
               f'<div class="missing">missing<br>{escape(Path(image["path"]).name)}</div>')
    return f"<figure>{picture}<figcaption>{_caption(image['scores'])}</figcaption></figure>"


def _image_grid(db: Leaderboard, benchmark: str, runs: list[dict], max_prompts: int) -> str:
    """One row per picked prompt; one column per generator (ranking order) with its images and their scores."""
    prompts = {run["id"]: db.prompts(run["id"]) for run in runs}
    reference = max(prompts.values(), key=len)
    roots = [db.path.parent]
    rows = []
    for index in _picked(reference, max_prompts):
        text = reference[index]["prompt"]
        cells = []
        for run in runs:
            own = prompts[run["id"]]
            images = own[index]["images"] if index < len(own) and own[index]["prompt"] == text else []
            cells.append('<td><div class="images">' + "".join(_figure(image, roots) for image in images)
                         + (f"<em>{MISSING}</em>" if not images else "") + "</div></td>")
        tag = escape(reference[index].get("tag") or MISSING)
        rows.append(f'<tr><td class="prompt">{escape(text)}<br><span class="tag">{tag}</span></td>'
                    + "".join(cells) + "</tr>")
    head = "<th>prompt</th>" + "".join(f"<th>{escape(_label(run, runs))}</th>" for run in runs)
    return (f"<h3>Benchmark {escape(benchmark)}</h3><div class=\"scroll\"><table><tr>{head}</tr>\n"
            + "\n".join(rows) + "</table></div>")


# --- plots -----------------------------------------------------------------------------------------------------------

def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _tag_plot(benchmark: str, runs: list[dict]) -> str | None:
    """Grouped bars: the oracle pass rate overall and per tag, one bar per generator."""
    groups = [name for name in ["oracle", *(f"oracle/{tag}" for tag in _tags(runs))]
              if any(name in run["metrics"] for run in runs)]
    if not groups:
        return None
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(runs) / 2) + 2), 3.8), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [run["metrics"].get(name, 0.0) for name in groups], width, label=_label(run, runs))
    ax.set_xticks(range(len(groups)), ["overall" if g == "oracle" else g.split("/", 1)[1] for g in groups],
                  rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("prompt tag")
    ax.set_ylabel("oracle pass rate")
    ax.set_title(f"Oracle accuracy per tag — {benchmark}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    return _png(fig)


def _find_log(path: str | None) -> Path | None:
    """A training log in the model's directory or up to two levels above it (RUN/final/pipeline)."""
    if not path:
        return None
    start = Path(path)
    start = start.parent if start.is_file() else start
    if not start.is_dir():
        return None
    for directory in [start, *list(start.resolve().parents)[:2]]:
        for name in LOG_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def _read_log(path: Path) -> list[dict]:
    """Rows with a numeric step; malformed lines are skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def _series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))
              and not isinstance(row[name], bool) and math.isfinite(row[name])]
    return [s for s, _ in points], [v for _, v in points]


def _curve_plot(model: str, log: Path) -> str | None:
    """The training signal and the held-out accuracy against the step, side by side; None if the log has neither."""
    rows = _read_log(log)
    signal = next((name for name in TRAINING_SIGNAL if _series(rows, name)[0]), None)
    held_out = [name for name in HELD_OUT if _series(rows, name)[0]]
    panels = ([(f"training: {TRAINING_SIGNAL[signal]}", TRAINING_SIGNAL[signal], [signal])] if signal else []) + \
             ([("held-out accuracy", "accuracy", held_out)] if held_out else [])
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 3.4), dpi=100, layout="constrained")
    fig.suptitle(f"{model} — {log.parent.name}/{log.name}", fontsize=10)
    for k, (title, ylabel, names) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for name in names:
            steps, values = _series(rows, name)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                    label=HELD_OUT.get(name) or TRAINING_SIGNAL[name])
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return _png(fig)


def _training_plots(runs: list[dict]) -> list[str]:
    """One figure per training log found beside a model (each log once), skipping models without one."""
    logs: dict[Path, str] = {}
    for run in runs:
        for path in (run["model_path"], run["config"].get("generator")):
            log = _find_log(path if isinstance(path, str) else None)
            if log is not None:
                logs.setdefault(log.resolve(), run["model"])
    out = []
    for log, model in logs.items():
        plot = _curve_plot(model, log)
        if plot:
            out.append(f'<img class="plot" alt="training curves of {escape(model)}" src="{plot}">')
    return out
