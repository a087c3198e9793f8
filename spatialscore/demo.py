"""The demo: the whole story on the shapes world, on a CPU, in under an hour.

1. pairs: shapes-world preference pairs for training (half drawn rough, like a generator draws) and a held-out set
   (new seed, every phrasing, clean), checked by the oracle (chosen passes, rejected fails), with a picture;
2. reward/: SpatialScore fine-tuned from the shipped model on those pairs; clip/: the CLIP-style dual-encoder
   baseline trained on the same pairs for the same steps; both (and the shipped model) evaluated on the held-out
   pairs, per perturbation kind;
3. base/: the shipped flow-matching base generator evaluated on the shapes-short benchmark (oracle + reward);
4. grpo/: Flow-GRPO on that base, rewarded by the new SpatialScore (the oracle only judges);
5. grpo/eval: the tuned generator on the same benchmark, the same initial noises;
6. leaderboard.sqlite and report/index.html.

Every stage leaves a marker of completion; a rerun skips finished stages and resumes an interrupted training run
from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from spatialscore.config import RECIPES_DIR
from spatialscore.data.check import check_pairs, format_report
from spatialscore.data.formats import load_pairs
from spatialscore.data.pairs import PairSpec, make_pairs
from spatialscore.io import atomic_write_text

SHIPPED_REWARD = RECIPES_DIR.parent / "data" / "reward" / "shapes-spatialscore"


@dataclass
class DemoSizes:
    """How big each stage is. The defaults fit ~45 minutes on 2 CPU cores; `quick()` is for tests."""

    train_pairs: int = 6000
    heldout_pairs: int = 1000
    reward_steps: int = 300
    baseline_steps: int = 300
    benchmark: str = "shapes-short"
    prompts: int | None = None  # the first N benchmark prompts; None: all
    images_per_prompt: int = 4
    grpo_iterations: int = 100
    # sampled (and trained) at the guidance the evaluation uses: trained at guidance 1 and evaluated at 4, relation
    # accuracy fell 0.085 -> 0.045 (100 iterations); trained at 4, 0.085 -> 0.075 (60)
    grpo_overrides: tuple[str, ...] = ("sample.guidance_scale=4",)

    @classmethod
    def quick(cls) -> "DemoSizes":
        return cls(train_pairs=48, heldout_pairs=32, reward_steps=4, baseline_steps=4, prompts=6, images_per_prompt=1,
                   grpo_iterations=1, grpo_overrides=("sample.group_size=4", "sample.prompts_per_iter=2",
                                                      "sample.steps=4", "sample.eval_steps=4", "prompts.eval_n=4",
                                                      "train.top_k=1", "train.micro_batch=8"))


def pairs_picture(pairs, path: Path, rows: int = 8, side: int = 160) -> None:
    """chosen | rejected, with the prompt and the perturbation kinds under each row."""
    caption = 50
    sheet = Image.new("RGB", (2 * side + 8, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, pair in enumerate(pairs[:rows]):
        y = r * (side + caption)
        sheet.paste(pair.chosen.resize((side, side)), (0, y))
        sheet.paste(pair.rejected.resize((side, side)), (side + 8, y))
        kinds = "+".join((pair.perturbation or {}).get("kinds", []))
        lines = textwrap.wrap(pair.prompt, width=54)[:3]
        for k, line in enumerate(lines):
            draw.text((2, y + side + 2 + 11 * k), line, fill="black")
        draw.text((2, y + side + 2 + 11 * len(lines)), f"chosen | rejected ({kinds})", fill=(150, 0, 0))
    sheet.save(path)


def _step(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _done(marker: Path, what: str) -> bool:
    if marker.exists():
        _step(f"{what}: done already ({marker}), reused")
        return True
    return False


def _resume_from(run: Path) -> str | None:
    """An interrupted training run's directory when it has a checkpoint; a run with none starts over."""
    from spatialscore.train.runtime import checkpoints

    if run.is_dir() and checkpoints(run):
        _step(f"resuming {run} from its newest checkpoint")
        return str(run)
    shutil.rmtree(run, ignore_errors=True)
    return None


def _make_pairs(out: Path, n: int, spec: PairSpec) -> Path:
    path = out / "pairs.jsonl"
    if not _done(path, f"pairs {out.name}"):
        _step(f"{n} preference pairs -> {out}")
        make_pairs(out, n, spec)
    return path


def _train_reward(out: Path, overrides: list[str]) -> None:
    from spatialscore.config import RewardConfig, load_config
    from spatialscore.train.reward_model import train_reward

    if _done(out / "final" / "model.safetensors", out.name):
        return
    cfg = load_config(RewardConfig, str(RECIPES_DIR / "shapes" / "reward.yaml"), overrides)
    result = train_reward(cfg, out, resume=_resume_from(out))
    _step(f"{out.name}: {result['steps']} steps, held-out accuracy {result['validation'].get('overall', 0):.3f}")


def _eval_reward(db_path: Path, name: str, checkpoint: str, pairs: Path, benchmark: str) -> dict:
    from spatialscore.eval.runner import pair_accuracy, record_reward_eval

    report = pair_accuracy(checkpoint, pairs)
    record_reward_eval(db_path, report, name, checkpoint, pairs, benchmark)
    _step(f"{name}: pairwise accuracy {report['overall']:.3f} on {report['n_pairs']} held-out pairs")
    return report


def _eval_generator(db_path: Path, generator: str, name: str, reward: Path, sizes: DemoSizes, out: Path) -> dict:
    from spatialscore.eval.benchmarks import load_benchmark
    from spatialscore.eval.leaderboard import Leaderboard
    from spatialscore.eval.runner import EvalSettings, evaluate_generator, head_specs, parse_heads

    with Leaderboard(db_path) as db:
        if (out / "metrics.json").is_file() and any(r["model"] == name for r in db.runs(kind="generator")):
            _step(f"{name}: evaluated already ({out / 'metrics.json'}), reused")
            return json.loads((out / "metrics.json").read_text())
        spec = f"spatialscore={reward}"
        settings = EvalSettings(heads=head_specs(spec), images_per_prompt=sizes.images_per_prompt, seed=0,
                                limit=sizes.prompts)
        result = evaluate_generator(generator, load_benchmark(sizes.benchmark), parse_heads(spec), settings, out, db,
                                    name=name)
    m = result["metrics"]
    _step(f"{name}: oracle {m.get('oracle', float('nan')):.3f}, relation accuracy "
          f"{m.get('oracle/clause/position', float('nan')):.3f}, position prompts "
          f"{m.get('oracle/position', float('nan')):.3f}")
    return result


def _train_grpo(out: Path, reward: Path, sizes: DemoSizes) -> None:
    from spatialscore.config import GrpoConfig, load_config
    from spatialscore.train.flow_grpo import train_grpo

    if _done(out / "result.json", "grpo"):
        return
    overrides = [f"reward.kwargs.spatialscore.checkpoint={reward}", f"train.iterations={sizes.grpo_iterations}",
                 f"train.eval_every={max(1, sizes.grpo_iterations // 4)}", "prompts.eval_n=100",
                 f"train.save_every={max(1, sizes.grpo_iterations // 4)}",
                 *sizes.grpo_overrides]
    cfg = load_config(GrpoConfig, str(RECIPES_DIR / "shapes" / "grpo.yaml"), overrides)
    train_grpo(cfg, out, resume=_resume_from(out))


def _claim(out: Path, sizes: DemoSizes) -> None:
    """Make `out` the demo's directory, or refuse: a folder of something else (the demo deletes and rewrites its
    stage folders), or a demo made with other sizes (its finished stages would be reused as if they were these)."""
    from spatialscore.errors import SpatialScoreError

    marker = out / "demo-sizes.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(sizes)))
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != wanted:
            changed = ", ".join(k for k in wanted if found.get(k) != wanted[k])
            raise SpatialScoreError(f"--out {out}: holds a demo made with other settings ({changed}); give another "
                                    f"--out, or delete {out} to start over")
        return
    if out.is_dir() and any(out.iterdir()):
        raise SpatialScoreError(f"--out {out}: not empty and not a demo directory (no demo-sizes.json); give a new "
                                f"or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(wanted, indent=2))


def run_demo(out: Path, sizes: DemoSizes | None = None) -> dict:
    from spatialscore.eval.leaderboard import Leaderboard
    from spatialscore.eval.report import write_report

    sizes = sizes or DemoSizes()
    start = time.perf_counter()
    _claim(out, sizes)
    db = out / "leaderboard.sqlite"

    train_pairs = _make_pairs(out / "pairs" / "train", sizes.train_pairs, PairSpec(seed=0, phrasing="all", rough=0.5))
    heldout = _make_pairs(out / "pairs" / "heldout", sizes.heldout_pairs,
                          PairSpec(seed=4242, phrasing="all"))  # clean renders: the oracle checks them
    pairs = load_pairs(heldout)
    pair_report = check_pairs(pairs, progress=False)
    pairs_picture(pairs, out / "pairs.png")
    _step("oracle on the held-out pairs (chosen should pass, rejected should fail):\n" + format_report(pair_report))

    data = [f"data.train={train_pairs}", f"data.val={heldout}"]
    _train_reward(out / "reward", [f"model.init={SHIPPED_REWARD}", *data, f"train.steps={sizes.reward_steps}",
                                   "train.lr=3e-4", "train.warmup=20", f"train.eval_every={sizes.reward_steps}",
                                   f"train.save_every={max(1, sizes.reward_steps // 3)}"])
    _train_reward(out / "clip", ["model.arch=clip_dual", "model.grid=4", *data,
                                 f"train.steps={sizes.baseline_steps}", f"train.eval_every={sizes.baseline_steps}",
                                 f"train.save_every={max(1, sizes.baseline_steps // 3)}"])
    rewards = {}
    for name, checkpoint in (("spatialscore (demo fine-tune)", out / "reward"),
                             ("spatialscore (shipped)", SHIPPED_REWARD),
                             ("clip-dual baseline", out / "clip")):
        rewards[name] = _eval_reward(db, name, str(checkpoint), heldout, "shapes held-out pairs")["overall"]

    base = _eval_generator(db, "shapes-flow", "base: shapes-flow", out / "reward", sizes, out / "base")
    _train_grpo(out / "grpo", out / "reward", sizes)
    tuned = _eval_generator(db, str(out / "grpo"), "tuned: Flow-GRPO", out / "reward", sizes, out / "grpo" / "eval")

    with Leaderboard(db, create=False) as board:
        report = write_report(board, out / "report", title="spatialscore demo: the shapes world end to end")
    minutes = (time.perf_counter() - start) / 60
    summary = {"rewards": rewards, "base": base["metrics"], "tuned": tuned["metrics"], "pairs": pair_report,
               "report": str(report), "minutes": minutes}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))

    def line(metrics: dict, key: str) -> str:
        return f"{metrics.get(key, float('nan')):.3f}"

    text = "\n".join([
        "== reward models: pairwise accuracy on held-out pairs ==",
        *(f"  {name:<32} {acc:.3f}" for name, acc in rewards.items()),
        f"== generators on {sizes.benchmark} (oracle) ==        overall  relations  position prompts",
        f"  base                               {line(base['metrics'], 'oracle')}    "
        f"{line(base['metrics'], 'oracle/clause/position')}      {line(base['metrics'], 'oracle/position')}",
        f"  tuned (Flow-GRPO)                  {line(tuned['metrics'], 'oracle')}    "
        f"{line(tuned['metrics'], 'oracle/clause/position')}      {line(tuned['metrics'], 'oracle/position')}",
        f"took {minutes:.1f} min; leaderboard {db}",
        f"report: {report}"])
    return {**summary, "out": str(out), "summary": text}
