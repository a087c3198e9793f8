"""The demo: the shapes world end to end on a CPU in about a minute.

Today: prompts -> faithful images -> oracle report, and preference pairs -> oracle report (chosen should pass,
rejected should fail), plus a picture of example pairs. Later stages (reward training, RL, leaderboards) extend it.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from spatialscore.data.check import check_pairs, check_prompts, format_report, render_prompts
from spatialscore.data.formats import load_pairs
from spatialscore.data.pairs import PairSpec, make_pairs
from spatialscore.data.prompts import make_prompts
from spatialscore.io import atomic_write_text


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


def run_demo(out: Path, n_prompts: int = 200, n_pairs: int = 500) -> dict:
    out.mkdir(parents=True, exist_ok=True)

    def step(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr)

    step(f"{n_prompts} prompts (short, long and text) -> {out}/prompts.jsonl")
    prompts = make_prompts(n_prompts, seed=0, style="mixed", phrasing="all")
    atomic_write_text(out / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
    render_prompts(prompts, out / "faithful")
    step("oracle on the faithful images (should be ~1.0 everywhere)")
    faithful = check_prompts(prompts, out / "faithful")
    step(f"{n_pairs} preference pairs -> {out}/pairs")
    pairs_path = make_pairs(out / "pairs", n_pairs, PairSpec(seed=0))
    pairs = load_pairs(pairs_path)
    step("oracle on the pairs (chosen should pass, rejected should fail)")
    pair_report = check_pairs(pairs)
    pairs_picture(pairs, out / "pairs.png")
    report = {"faithful_images": faithful, "pairs": pair_report}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    summary = "\n".join([
        "== oracle on faithful images ==", format_report(faithful), "",
        "== oracle on preference pairs ==", format_report(pair_report), "",
        f"report: {out}/report.json   example pairs: {out}/pairs.png"])
    return {**report, "out": str(out), "summary": summary}
