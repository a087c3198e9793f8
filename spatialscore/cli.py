"""`spatialscore <verb>`: the one command-line entry point.

Human-readable text goes to stderr, results to stdout; `--json` prints machine-readable results. Errors meant for
people (SpatialScoreError) print as `error: ...` and exit with code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from spatialscore import __version__
from spatialscore.errors import SpatialScoreError


def _example(text: str) -> str:
    return "example:\n  " + text.strip().replace("\n", "\n  ")


def _parser(sub, name: str, help: str, example: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=_example(example),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def _info(msg: str) -> None:
    print(msg, file=sys.stderr)


def _print_json(args, value) -> None:
    """--json results go to the real stdout; while a verb runs under --json, anything else it prints (progress lines
    of the trainers) goes to stderr, so stdout stays one JSON document."""
    print(json.dumps(value, indent=2, sort_keys=True), file=getattr(args, "stdout", None) or sys.stdout)


def _emit(args, result: dict, human: str) -> None:
    if args.json:
        _print_json(args, result)
        _info(human)
    else:
        print(human)


def _print_rows(args, rows: list[tuple], columns: dict[str, int]) -> None:
    """A listing: JSON objects with --json, else aligned columns (width 0: the rest of the line)."""
    if args.json:
        _print_json(args, [dict(zip(columns, row)) for row in rows])
        return
    for row in rows:
        print(" ".join(f"{value:<{width}}" if width else str(value) for value, width in zip(row, columns.values())))


def _recipe_and_overrides(args) -> tuple[str | None, list[str]]:
    """The optional recipe positional swallows the first override when no recipe is given: give it back."""
    if args.recipe and "=" in args.recipe and not Path(args.recipe).is_file():
        return None, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


# --- data ---------------------------------------------------------------------------------------------------------

def cmd_make_prompts(args) -> int:
    from spatialscore.config import PromptsConfig, load_config
    from spatialscore.data.prompts import make_prompts
    from spatialscore.io import atomic_write_text

    flags = [f"{k}={v}" for k, v in (("n", args.n), ("seed", args.seed), ("style", args.style)) if v is not None]
    recipe, overrides = _recipe_and_overrides(args)
    cfg = load_config(PromptsConfig, recipe, [*overrides, *flags])
    records = make_prompts(cfg.n, cfg.seed, cfg.style, cfg.phrasing)
    out = Path(args.out)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    _emit(args, {"out": str(out), "n": len(records)}, f"wrote {len(records)} prompts to {out}")
    return 0


def cmd_make_pairs(args) -> int:
    from spatialscore.config import PairsConfig, load_config, save_config
    from spatialscore.data.pairs import PairSpec, make_pairs

    flags = [f"{k}={v}" for k, v in (("n", args.n), ("seed", args.seed)) if v is not None]
    recipe, overrides = _recipe_and_overrides(args)
    cfg = load_config(PairsConfig, recipe, [*overrides, *flags])
    out = Path(args.out) if args.out else _default_out("pairs")
    spec = PairSpec(cfg.seed, cfg.style, cfg.phrasing, cfg.image_size, cfg.multi_prob, rough=cfg.rough)
    start = time.perf_counter()
    path = make_pairs(out, cfg.n, spec, workers=cfg.workers or None)
    save_config(cfg, out)
    seconds = time.perf_counter() - start
    _emit(args, {"out": str(path), "n": cfg.n, "seconds": seconds},
          f"wrote {cfg.n} pairs to {path} in {seconds:.1f} s")
    return 0


def cmd_render(args) -> int:
    from spatialscore.data.check import render_prompts
    from spatialscore.data.formats import load_prompts

    prompts = load_prompts(args.prompts)
    render_prompts(prompts, Path(args.out), seed=args.seed, size=args.size)
    _emit(args, {"out": args.out, "n": len(prompts)}, f"rendered {len(prompts)} faithful images to {args.out}")
    return 0


def cmd_check(args) -> int:
    from spatialscore.data.check import check_pairs, check_prompts, format_report
    from spatialscore.data.formats import load_pairs, load_prompts

    if bool(args.pairs) == bool(args.prompts):
        raise SpatialScoreError("data check: give either --prompts FILE --images DIR, or --pairs FILE")
    if args.pairs:
        report = check_pairs(load_pairs(args.pairs, on_error=args.on_error), workers=args.workers)
    else:
        if not args.images:
            raise SpatialScoreError("data check: --prompts needs --images DIR")
        images = Path(args.images)
        if not images.is_dir():
            raise SpatialScoreError(f"--images {images}: no such directory")
        report = check_prompts(load_prompts(args.prompts, on_error=args.on_error), images, workers=args.workers)
    _emit(args, report, format_report(report))
    return 0


def cmd_validate(args) -> int:
    from spatialscore.data.formats import validate_path

    fmt, n, problems = validate_path(args.path)
    for problem in problems[: args.max_problems]:
        _info(str(problem))
    if len(problems) > args.max_problems:
        _info(f"... and {len(problems) - args.max_problems} more")
    summary = f"{args.path}: {fmt}, {n} records, {len(problems)} problem(s)"
    _emit(args, {"path": args.path, "format": fmt, "records": n, "problems": [str(p) for p in problems]}, summary)
    return 2 if problems else 0


# --- recipes ------------------------------------------------------------------------------------------------------

def cmd_recipes_ls(args) -> int:
    from spatialscore.config import list_recipes

    _print_rows(args, list_recipes(), {"name": 28, "kind": 10, "description": 0})
    return 0


def cmd_recipes_cp(args) -> int:
    from spatialscore.config import copy_recipe

    dest = copy_recipe(args.name, args.dest, force=args.force)
    _info(f"copied to {dest}")
    return 0


def cmd_recipes_validate(args) -> int:
    from spatialscore.config import find_recipe, load_config, schema_for, to_yaml

    path = find_recipe(args.recipe)
    cfg = load_config(schema_for(path), path, args.overrides)
    _info(f"{path}: valid")
    print(to_yaml(cfg), end="")
    return 0


# --- reward models ------------------------------------------------------------------------------------------------

def _launch(args, cfg) -> tuple[Path, str | None, int | None]:
    """(run directory, DeepSpeed preset for this process, exit code if this process only launched others).

    The launching process resolves the run directory once (every process and node must write the same one), composes
    the launcher command for --launch/--nproc/--nnodes, prints it under --dry-run, or runs it and returns its code."""
    import torch

    from spatialscore import launch

    spec = launch.spec_from_args(args)
    if spec.nnodes > 1 and not args.out and not args.worker:
        raise SpatialScoreError(f"--nnodes {spec.nnodes}: give --out (the same run directory on every node); a "
                                f"default name with a timestamp would differ from node to node")
    out = Path(args.out) if args.out else _default_out(Path(args.recipe).stem)
    if args.worker or not launch.needs_launch(spec):
        if args.dry_run:
            shown = [a for a in args.argv if a != "--dry-run"]
            print(f"# --launch single: runs in this process, no launcher\nspatialscore {shlex.join(shown)}")
            return out, None, 0
        return out, spec.zero, None
    argv = list(args.argv)
    if not args.out:
        argv += ["--out", str(out)]
    plan = launch.compose(spec, argv, cfg, out, cuda=torch.cuda.is_available())
    if args.dry_run:
        print(plan.render(), end="")
        return out, None, 0
    return out, None, launch.run(plan, spec)


def cmd_train_reward(args) -> int:
    from spatialscore.config import RewardConfig, load_config
    from spatialscore.train.reward_model import train_reward

    cfg = load_config(RewardConfig, args.recipe, args.overrides)  # validate before launching anything
    out, zero, code = _launch(args, cfg)
    if code is not None:
        return code
    result = train_reward(cfg, out, resume=args.resume, deepspeed=zero, precision=args.precision)
    if args.worker and not _is_main_process():
        return 0
    _emit(args, result, f"trained {result['steps']} steps on {result['world_size']} process(es); "
                        f"held-out accuracy {result['validation'].get('overall', float('nan')):.4f}; "
                        f"model in {out}/final")
    return 0


# --- generators ---------------------------------------------------------------------------------------------------

def cmd_train_generator(args) -> int:
    from spatialscore.config import GeneratorConfig, load_config
    from spatialscore.train.generator import train_generator

    cfg = load_config(GeneratorConfig, args.recipe, args.overrides)
    out = Path(args.out) if args.out else _default_out(Path(args.recipe).stem)
    result = train_generator(cfg, out, resume=args.resume)
    by_tag = ", ".join(f"{tag} {acc:.2f}" for tag, acc in result["by_tag"].items())
    _emit(args, result, f"trained {result['step']} steps in {result['minutes']:.1f} min; held-out oracle accuracy "
                        f"{result['overall']:.3f} ({by_tag}); pipeline in {out}/final")
    return 0


def _train_rl(args, schema, train) -> int:
    """train-grpo and train-ddpo: validate everything (prompts, reward heads, the pipeline directory) before any
    process starts or writes, relaunch under accelerate when asked, then train."""
    from spatialscore.config import load_config, project_path
    from spatialscore.train.policy_gradient import PromptSource, build_reward

    cfg = load_config(schema, args.recipe, args.overrides)
    if not args.worker:
        PromptSource(cfg)
        build_reward(cfg)
        if cfg.model.pipeline:
            from spatialscore.models.generators import FLOW_PIPELINES, UNET_PIPELINES, check_pipeline_kind

            kinds = {"grpo": FLOW_PIPELINES, "ddpo": UNET_PIPELINES}.get(cfg.kind, FLOW_PIPELINES + UNET_PIPELINES)
            check_pipeline_kind(project_path(cfg.model.pipeline), "model.pipeline", kinds, f"train-{cfg.kind}")
    out, zero, code = _launch(args, cfg)
    if code is not None:
        return code
    result = train(cfg, out, resume=args.resume, deepspeed=zero, precision=args.precision)
    if args.worker and not _is_main_process():
        return 0
    base, final = result.get("base") or {}, result.get("final") or {}
    done = f"{result['iterations']} iterations" if "iterations" in result else f"{result['steps']} steps"
    human = (f"{done} on {result['world_size']} process(es); held-out reward "
             f"{base.get('reward_mean', float('nan')):.4f} -> {final.get('reward_mean', float('nan')):.4f}")
    if "oracle_accuracy" in final:
        human += f", oracle accuracy {base['oracle_accuracy']:.3f} -> {final['oracle_accuracy']:.3f}"
    if result.get("hacking_detected"):
        human += "; REWARD HACKING SUSPECTED (the reward rose while the oracle fell; see metrics.jsonl)"
    _emit(args, result, human + f"; LoRA and merged pipeline in {out}/final")
    return 0


def cmd_train_grpo(args) -> int:
    from spatialscore.config import GrpoConfig
    from spatialscore.train.flow_grpo import train_grpo

    return _train_rl(args, GrpoConfig, train_grpo)


def cmd_train_dpo(args) -> int:
    from spatialscore.config import DpoConfig
    from spatialscore.train.diffusion_dpo import train_dpo

    return _train_rl(args, DpoConfig, train_dpo)


def cmd_train_ddpo(args) -> int:
    from spatialscore.config import DdpoConfig
    from spatialscore.train.ddpo import train_ddpo

    return _train_rl(args, DdpoConfig, train_ddpo)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _reward_head(reward: str, batch_size: int = 32):
    """--reward as a reward head: a run or checkpoint directory (any path) is a trained SpatialScore model; a bare
    word is a registered head name (an unknown one lists the known names with a suggestion); NAME=PATH builds a
    head from a local model (spatialscore/eval/runner.py::head_from_spec)."""
    from spatialscore.eval.runner import head_from_spec

    return head_from_spec(reward, batch_size)[1]


def cmd_eval_reward(args) -> int:
    from spatialscore.eval.runner import pair_accuracy

    report = pair_accuracy(args.reward, args.pairs, args.batch_size, args.on_error)
    human = [f"pairwise accuracy {report['overall']:.4f} on {report['n_pairs']} pairs"]
    human += [f"  {k:<10} {v:.4f}" for k, v in report["by_kind"].items()]
    human += [f"  {k} perturbation(s): {v:.4f}" for k, v in report["by_n"].items()]
    if args.db:
        from spatialscore.eval.runner import record_reward_eval

        report["run"] = record_reward_eval(args.db, report, args.name or args.reward.rstrip("/"), args.reward,
                                           args.pairs, args.benchmark, {"batch_size": args.batch_size})
        human.append(f"recorded as run {report['run']} in {args.db}")
    _emit(args, report, "\n".join(human))
    return 0


# --- evaluation and leaderboards ----------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from spatialscore.eval.benchmarks import in_shapes_world, load_benchmark
    from spatialscore.eval.leaderboard import Leaderboard, RunRecord
    from spatialscore.eval.runner import EvalSettings, evaluate_generator, head_specs, parse_heads, resolve_generator

    if args.list:
        from spatialscore.eval.benchmarks import list_benchmarks

        _print_rows(args, list_benchmarks(), {"name": 14, "format": 14, "prompts": 8, "description": 0})
        return 0
    if not args.benchmark:
        raise SpatialScoreError("eval: --benchmark NAME_OR_FILE is required (--list shows the shipped ones)")
    for flag in ("images_per_prompt", "batch_size", "steps", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SpatialScoreError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if bool(args.generator) == bool(args.images):
        raise SpatialScoreError("eval: give either --generator (sample it) or --images DIR (images made elsewhere)")
    benchmark = load_benchmark(args.benchmark)
    if args.generator:
        source = str(resolve_generator(args.generator).resolve())  # a bad path fails before any head loads
    elif not Path(args.images).is_dir():
        raise SpatialScoreError(f"--images {args.images}: no such directory")
    else:
        source = str(Path(args.images).resolve())
    records = benchmark.records[: args.limit] if args.limit else benchmark.records
    if not args.reward and not any(in_shapes_world(r) for r in records):
        raise SpatialScoreError(f"eval: nothing would be measured: {benchmark.name} has no prompts the shapes-world "
                                f"oracle can judge, so give --reward HEAD[,HEAD...]")
    heads = parse_heads(args.reward or "", args.batch_size)
    settings = EvalSettings(heads=head_specs(args.reward or ""), images_per_prompt=args.images_per_prompt,
                            seed=args.seed, steps=args.steps, guidance=args.guidance, limit=args.limit, source=source)
    if args.out:
        out = Path(args.out)
    else:
        given = args.generator or args.images
        key = RunRecord("generator", args.name or given, benchmark.name, vars(settings), {}).key[:8]
        label = (args.name or Path(given.rstrip("/")).name).replace("/", "_")
        out = Path(args.db).parent / "eval" / f"{label}-{benchmark.name}-{key}"
    db = None if args.no_db else Leaderboard(args.db)
    try:
        result = evaluate_generator(args.generator, benchmark, heads, settings, out, db, name=args.name,
                                    batch_size=args.batch_size, images_dir=args.images)
    finally:
        if db is not None:
            db.close()
    metrics = result["metrics"]
    human = [f"{result['generator']} on {benchmark.name}: {result['n_images']} images of {result['n_prompts']} "
             f"prompts in {result['seconds']:.0f} s" + (f"; images in {out}/images" if args.generator else "")]
    human += [f"  {k:<28} {v:.4f}" for k, v in metrics.items()]
    if db is not None:
        human.append(f"recorded as run {result['run']} in {args.db}")
    _emit(args, {"run": result.get("run"), "metrics": metrics}, "\n".join(human))
    return 0


def cmd_leaderboard_show(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from spatialscore.eval.leaderboard import Leaderboard

    with Leaderboard(args.db, create=False) as db, db.snapshot():
        runs = db.runs(benchmark=args.benchmark)
    if args.benchmark and not runs:
        raise SpatialScoreError(f"--benchmark {args.benchmark}: no runs on it in {args.db}")
    if args.json:
        _print_json(args, [{k: r[k] for k in ("id", "kind", "model", "benchmark", "metrics", "git_rev", "created")}
                           for r in runs])
        return 0
    groups = []
    for kind, what in (("generator", "generators"), ("reward", "reward models")):
        for benchmark in sorted({r["benchmark"] for r in runs if r["kind"] == kind}):
            rows = [r for r in runs if r["kind"] == kind and r["benchmark"] == benchmark]
            names = sorted({m for r in rows for m in r["metrics"]}, key=_metric_order)
            if args.metric:
                if args.metric not in names:
                    continue
                names = [args.metric]
            groups.append((what, benchmark, rows, names))
    if args.metric and not groups:
        known = sorted({m for r in runs for m in r["metrics"]}, key=_metric_order)
        raise SpatialScoreError(f"--metric {args.metric}: no run has it; known: {', '.join(known) or 'none'}")
    console = Console(width=None if sys.stdout.isatty() else 240)  # piped: no truncated columns
    for what, benchmark, rows, names in groups:
        main = args.metric or next((m for m in ("oracle", "accuracy") if m in names), names[0] if names else "")
        rows.sort(key=lambda r: -r["metrics"].get(main, float("-inf")))
        table = Table(title=f"{what} on {benchmark}" + (f" (by {main})" if main else ""))
        table.add_column("#", justify="right")
        table.add_column("model", no_wrap=True)
        for name in names:
            table.add_column(name.removeprefix("oracle/").removeprefix("accuracy/"), justify="right", no_wrap=True)
        table.add_column("run", justify="right")
        for rank, run in enumerate(rows, 1):
            cells = [f"{run['metrics'][n]:.3f}" if n in run["metrics"] else "-" for n in names]
            table.add_row(str(rank), run["model"], *cells, str(run["id"]))
        console.print(table)
    if not runs:
        _info(f"{args.db}: no runs yet")
    return 0


def _metric_order(name: str) -> tuple:
    """The headline first (oracle / accuracy), then tags, clause kinds, then head means."""
    rank = {"oracle": 0, "accuracy": 0}.get(name)
    if rank is None:
        rank = 2 if name.startswith(("oracle/clause/", "accuracy/n=")) else 1 if name.count("/") == 1 else 3
    return rank, name


def cmd_leaderboard_report(args) -> int:
    from spatialscore.eval.leaderboard import Leaderboard
    from spatialscore.eval.report import write_report

    with Leaderboard(args.db, create=False) as db, db.snapshot():
        path = write_report(db, Path(args.out))
    _emit(args, {"report": str(path)}, f"report: {path}")
    return 0


def cmd_score(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from spatialscore.train.policy_gradient import head_image_size

    head = _reward_head(args.reward)
    size = head_image_size(head) or 128  # a trained model's own input size, else the shapes world's
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)))
        except (OSError, ValueError) as err:
            raise SpatialScoreError(f"{path}: unreadable image ({err})") from None
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    out = head(batch, [args.prompt] * len(images))  # heads that judge clauses need metadata: they say so
    mu, sigma = out.scores, out.extras.get("sigma", torch.full_like(out.scores, float("nan")))
    rows = [{"image": p, "mu": float(m), "sigma": float(s)} for p, m, s in zip(args.images, mu, sigma)]
    _emit(args, {"prompt": args.prompt, "scores": rows},
          "\n".join(f"{r['mu']:+.4f} (sigma {r['sigma']:.4f})  {r['image']}" for r in rows))
    return 0


# --- heads --------------------------------------------------------------------------------------------------------

def cmd_heads_ls(args) -> int:
    from spatialscore.heads import list_heads

    _print_rows(args, list_heads(), {"name": 12, "source": 18, "description": 0})
    return 0


def cmd_serve(args) -> int:
    from spatialscore.io import atomic_write_text
    from spatialscore.serve.server import RewardServer, ServeSettings, build_heads, openapi_spec, read_token

    token = read_token(args.token_file) if args.token_file else None
    settings = ServeSettings(host=args.host, port=args.port, token=token, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, max_request_bytes=int(args.max_request_mb * 2**20),
                             max_items=args.max_items, max_side=args.max_side, max_pixels=args.max_pixels)
    settings.check()  # before the heads load: a refused start should be quick
    heads = build_heads(args.heads)
    if args.openapi:
        atomic_write_text(Path(args.openapi), json.dumps(openapi_spec(heads, settings), indent=2) + "\n")
        _emit(args, {"openapi": args.openapi}, f"wrote the OpenAPI spec to {args.openapi}")
        return 0
    server = RewardServer(heads, settings)
    _emit(args, {"url": server.url, "heads": sorted(heads)},
          f"serving {', '.join(sorted(heads))} on {server.url} (Ctrl-C stops)")
    for stream in (sys.stdout, args.stdout):
        stream.flush()
    server.run_forever()
    return 0


# --- plan ---------------------------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from spatialscore.plan import plan

    result = plan(args.recipe, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, nodes=args.nodes,
                  precision=args.precision, overrides=list(args.overrides))
    if args.json:
        _print_json(args, result)
        return 0
    counts = result["parameters"]
    frozen = ", ".join(f"{name} {n / 1e9:.3g}B ({'bf16' if counts['frozen_bytes_per_param'][name] == 2 else 'fp32'})"
                       for name, n in counts["frozen"].items())
    print(f"{result['recipe']} ({result['kind']}, precision {result['precision']})\n"
          f"  parameters: trainable {counts['trainable'] / 1e6:.4g}M; frozen: {frozen or 'none'}\n"
          f"  activations: {result['activation_gib_per_sample']:.3g} GiB per sample ({result['samples']})")
    table = Table(title=f"per-GPU memory (GiB), {args.gpus} GPU(s) x {args.nodes} node(s), "
                        f"budget {args.gpu_mem_gb:g} GiB")
    for column in ("preset", "world", "samples/GPU", "params", "grads", "optimizer", "activations", "overhead",
                   "total", "host RAM/node", "fits"):
        table.add_column(column, justify="left" if column == "preset" else "right", no_wrap=True)
    for row in result["presets"]:
        table.add_row(row["preset"], str(row["world_size"]), str(row["samples_per_gpu"]),
                      *(f"{row[k + '_gib']:.2f}" for k in ("parameters", "gradients", "optimizer", "activations",
                                                           "overhead", "total", "cpu_per_node")),
                      "yes" if row["fits"] else "no")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"recommended: {result['recommended']}" if result["recommended"] else
          f"nothing fits {args.gpu_mem_gb:g} GiB per GPU: more GPUs, a smaller micro-batch or image size, or "
          f"gradient checkpointing")
    return 0


# --- demo ---------------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    import dataclasses

    from spatialscore.demo import DemoSizes, run_demo

    sizes = DemoSizes.quick() if args.quick else DemoSizes()
    if args.grpo_iterations is not None:
        if args.grpo_iterations < 1:
            raise SpatialScoreError(f"--grpo-iterations must be >= 1, got {args.grpo_iterations}")
        sizes = dataclasses.replace(sizes, grpo_iterations=args.grpo_iterations)
    result = run_demo(Path(args.out), sizes)
    _emit(args, result, result.pop("summary"))
    return 0


def _add_train_flags(p: argparse.ArgumentParser, kind: str) -> None:
    p.allow_abbrev = False  # the launcher forwards this command to every process: flags are spelt out in full
    p.add_argument("recipe", help=f"a `kind: {kind}` recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=3e-4")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", help="a run directory (its newest checkpoint) or checkpoints/step-N")
    from spatialscore.launch import DEFAULT_PORT, DEFAULT_RDZV_TIMEOUT, LAUNCHERS, PRESETS

    g = p.add_argument_group("launch", "where the processes run (launch/README.md); --dry-run prints the command")
    g.add_argument("--launch", choices=[*PRESETS, "zero3_offload"], metavar="PRESET",
                   help=f"{' | '.join(PRESETS)}: one process, plain DDP, or a DeepSpeed ZeRO stage "
                        "(launch/accelerate/*.yaml, launch/deepspeed/*.json); default single, ddp when --nproc > 1")
    g.add_argument("--nproc", type=int, default=1, help="processes per node (one per GPU)")
    g.add_argument("--nnodes", type=int, default=1, help="nodes; run the same command on each with its --node-rank")
    g.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    g.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (default 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=DEFAULT_PORT, help=f"rendezvous port on node 0 "
                                                                          f"(default {DEFAULT_PORT})")
    g.add_argument("--launcher", choices=LAUNCHERS, default="accelerate", help="accelerate launch (default) or torchrun")
    g.add_argument("--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT,
                   help=f"seconds a node waits for the others before giving up (default {DEFAULT_RDZV_TIMEOUT})")
    g.add_argument("--dry-run", action="store_true", help="print the launch command (and filled DeepSpeed config)")
    p.add_argument("--precision", choices=["no", "bf16"], default="no")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialscore", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train spatial reward models, fine-tune generators against them, keep leaderboards.",
        epilog=_example("spatialscore demo --out runs/demo"))
    parser.add_argument("--version", action="version", version=f"spatialscore {__version__}")
    parser.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    data = _parser(verbs, "data", "make, render, check and validate shapes-world data",
                   "spatialscore data make-pairs --out runs/pairs --n 1000 --seed 0")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="<command>", required=True)

    p = _parser(data_verbs, "make-prompts", "write shapes-world prompt metadata (GenEval JSONL format)",
                "spatialscore data make-prompts --out prompts.jsonl --n 200 --seed 0 --style mixed")
    p.add_argument("recipe", nargs="?", help="a `kind: prompts` recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--n", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--style", choices=["short", "long", "text", "mixed"])
    p.set_defaults(func=cmd_make_prompts)

    p = _parser(data_verbs, "make-pairs", "write preference pairs: images/ + pairs.jsonl",
                "spatialscore data make-pairs --out runs/pairs --n 1000 --seed 0\n"
                "spatialscore data make-pairs recipes/shapes/pairs.yaml n=500 style=long --out runs/long-pairs")
    p.add_argument("recipe", nargs="?", help="a `kind: pairs` recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--out", help="output directory (default runs/pairs-<timestamp>)")
    p.add_argument("--n", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_make_pairs)

    p = _parser(data_verbs, "render", "render a faithful image for every prompt of a prompt file",
                "spatialscore data render --prompts prompts.jsonl --out runs/faithful")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.set_defaults(func=cmd_render)

    p = _parser(data_verbs, "check", "judge images (or pairs) with the shapes-world oracle; accuracy per tag",
                "spatialscore data check --prompts prompts.jsonl --images runs/faithful\n"
                "spatialscore data check --pairs runs/pairs/pairs.jsonl")
    p.add_argument("--prompts", help="prompt metadata JSONL")
    p.add_argument("--images", help="DIR with 00000.png ... or GenEval's 00000/samples/*.png")
    p.add_argument("--pairs", help="pair file (JSONL, parquet, HF dataset dir) whose records carry `meta`")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.set_defaults(func=cmd_check)

    p = _parser(data_verbs, "validate", "report every bad record of a data file (exit 2 if any)",
                "spatialscore data validate runs/pairs/pairs.jsonl")
    p.add_argument("path", help="pairs/prompts JSONL, parquet file or HF dataset directory")
    p.add_argument("--max-problems", type=int, default=50)
    p.set_defaults(func=cmd_validate)

    recipes = _parser(verbs, "recipes", "list, copy and validate recipes (science configs)",
                      "spatialscore recipes validate shapes/pairs n=100")
    recipe_verbs = recipes.add_subparsers(dest="recipes_verb", metavar="<command>", required=True)
    p = _parser(recipe_verbs, "ls", "list shipped recipes", "spatialscore recipes ls")
    p.set_defaults(func=cmd_recipes_ls)
    p = _parser(recipe_verbs, "cp", "copy a shipped recipe to edit it", "spatialscore recipes cp shapes/pairs my.yaml")
    p.add_argument("name")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_recipes_cp)
    p = _parser(recipe_verbs, "validate", "load a recipe with overrides and print the resolved config",
                "spatialscore recipes validate recipes/shapes/pairs.yaml n=100 seed=3")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_recipes_validate)

    p = _parser(verbs, "train-reward", "train a SpatialScore reward model on preference pairs",
                "spatialscore train-reward recipes/shapes/reward.yaml train.steps=200 --out runs/reward\n"
                "spatialscore train-reward recipes/shapes/reward.yaml --launch zero2 --nproc 2 --out runs/reward-z2")
    _add_train_flags(p, "reward")
    p.set_defaults(func=cmd_train_reward)

    p = _parser(verbs, "train-generator", "train a shapes-world base generator from scratch (a diffusers pipeline)",
                "spatialscore train-generator recipes/shapes/base_flow.yaml --out runs/base-flow")
    p.add_argument("recipe", help="a `kind: generator` recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=2000")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", help="a run directory (its newest checkpoint) or checkpoints/step-N")
    p.set_defaults(func=cmd_train_generator)

    p = _parser(verbs, "train-grpo", "Flow-GRPO: fine-tune a flow-matching generator (LoRA) against reward heads",
                "spatialscore train-grpo recipes/shapes/grpo.yaml --out runs/grpo\n"
                "spatialscore train-grpo recipes/shapes/grpo.yaml --launch zero2 --nproc 2 --out runs/grpo-z2")
    _add_train_flags(p, "grpo")
    p.set_defaults(func=cmd_train_grpo)

    p = _parser(verbs, "train-ddpo", "DDPO: fine-tune a DDIM UNet pipeline (SD1.5-style, LoRA) against reward heads",
                "spatialscore train-ddpo recipes/paper/ddpo_sd15.yaml model.pipeline=models/sd15 --out runs/ddpo")
    _add_train_flags(p, "ddpo")
    p.set_defaults(func=cmd_train_ddpo)

    p = _parser(verbs, "train-dpo", "Diffusion-DPO: fine-tune a generator (LoRA) offline on preference pairs",
                "spatialscore train-dpo recipes/shapes/dpo.yaml --out runs/dpo\n"
                "spatialscore train-dpo recipes/shapes/dpo.yaml data.train=runs/pairs/pairs.jsonl --out runs/dpo")
    _add_train_flags(p, "dpo")
    p.set_defaults(func=cmd_train_dpo)

    p = _parser(verbs, "eval-reward", "pairwise accuracy of a reward model, per perturbation kind and count",
                "spatialscore eval-reward --reward runs/reward --pairs runs/pairs/pairs.jsonl --json")
    p.add_argument("--reward", required=True, help="a run directory (its final/), a checkpoint directory, or a "
                                                     "registered head name (scored with each pair's metadata)")
    p.add_argument("--pairs", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--db", help="also record the accuracies in this leaderboard (e.g. runs/leaderboard.sqlite)")
    p.add_argument("--name", help="the reward model's name on the leaderboard (default: --reward as given)")
    p.add_argument("--benchmark", help="the pair set's name on the leaderboard (default: its directory name)")
    p.set_defaults(func=cmd_eval_reward)

    p = _parser(verbs, "eval", "evaluate a generator on a prompt benchmark: images, reward heads, the oracle, the "
                "leaderboard",
                "spatialscore eval --generator shapes-flow --benchmark shapes-short --reward "
                "spatialscore=data/reward/shapes-spatialscore --images-per-prompt 4 --seed 0 --json\n"
                "spatialscore eval --images geneval-outputs/ --benchmark geneval --name my-model --reward clip=models/clip")
    p.add_argument("--generator", help="a pipeline directory, a training run (its final/pipeline) or a shipped "
                                       "generator (shapes-flow, shapes-unet)")
    p.add_argument("--images", help="instead of --generator: images made elsewhere, DIR/00000.png ... or GenEval's "
                                    "DIR/00000/samples/0000.png (every image of a prompt is scored)")
    p.add_argument("--list", action="store_true", help="list the shipped benchmarks and exit")
    p.add_argument("--benchmark", help="a shipped benchmark name (data/benchmarks/) or a prompt "
                                                        "file: GenEval metadata .jsonl, T2I-CompBench .txt, "
                                                        "DPG-Bench .csv")
    p.add_argument("--reward", help="reward heads, comma-separated: NAME, NAME=PATH or LABEL=PATH (a trained "
                                    "SpatialScore model); the oracle always judges prompts with metadata")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--name", help="the generator's name on the leaderboard (default: from --generator)")
    p.add_argument("--out", help="where the images go (default: next to the DB, eval/<name>-<benchmark>-<key>)")
    p.add_argument("--db", default=str(Path("runs") / "leaderboard.sqlite"), help="the leaderboard file")
    p.add_argument("--no-db", action="store_true", help="do not record the run")
    p.set_defaults(func=cmd_eval)

    board = _parser(verbs, "leaderboard", "show the leaderboard or write its HTML report",
                    "spatialscore leaderboard show --benchmark shapes-short\n"
                    "spatialscore leaderboard report --out runs/report")
    board_verbs = board.add_subparsers(dest="leaderboard_verb", metavar="<command>", required=True)
    p = _parser(board_verbs, "show", "rank generators and reward models per benchmark",
                "spatialscore leaderboard show --benchmark shapes-short --metric oracle/position")
    p.add_argument("--db", default=str(Path("runs") / "leaderboard.sqlite"))
    p.add_argument("--benchmark")
    p.add_argument("--metric", help="rank by this metric (and show only it)")
    p.set_defaults(func=cmd_leaderboard_show)
    p = _parser(board_verbs, "report", "write a self-contained HTML report: rankings, reward-model table, image "
                "grids, plots", "spatialscore leaderboard report --out runs/report")
    p.add_argument("--db", default=str(Path("runs") / "leaderboard.sqlite"))
    p.add_argument("--out", required=True, help="directory for index.html")
    p.set_defaults(func=cmd_leaderboard_report)

    p = _parser(verbs, "score", "score images against a prompt with a reward model",
                "spatialscore score --reward runs/reward --prompt \"a red circle left of a blue square\" a.png b.png")
    p.add_argument("--reward", required=True, help="a run or checkpoint directory, or a registered head name")
    p.add_argument("--prompt", required=True)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_score)

    heads = _parser(verbs, "heads", "the reward-head registry (built-ins and plugins)", "spatialscore heads ls")
    head_verbs = heads.add_subparsers(dest="heads_verb", metavar="<command>", required=True)
    p = _parser(head_verbs, "ls", "list registered reward heads and where they come from", "spatialscore heads ls")
    p.set_defaults(func=cmd_heads_ls)

    p = _parser(verbs, "serve", "host reward heads over HTTP for trainers elsewhere (set reward.remote=URL there)",
                "spatialscore serve --heads spatialscore=runs/reward/final,text --host 127.0.0.1 --port 8765\n"
                "spatialscore train-grpo recipes/shapes/grpo.yaml reward.remote=http://127.0.0.1:8765")
    p.add_argument("--heads", required=True, help="comma-separated NAME, NAME=PATH or LABEL=PATH (as eval --reward)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8765, help="default 8765; 0 picks a free port")
    p.add_argument("--token-file", help="a file holding the bearer token clients must send")
    p.add_argument("--max-batch", type=int, default=64, help="images per head call, gathered across requests (1: no "
                   "batching; default 64)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests (default 0: it takes the requests that queued "
                   "while the head ran, so batches form under load at no added latency)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="payload limit (default 64)")
    p.add_argument("--max-items", type=int, default=256, help="images per request (default 256)")
    p.add_argument("--max-side", type=int, default=2048, help="largest image side in pixels (default 2048)")
    p.add_argument("--max-pixels", type=int, default=2**26,
                   help="pixels of all images of one request together, checked before decoding (default 2^26)")
    p.add_argument("--openapi", metavar="FILE", help="write the OpenAPI spec to FILE and exit")
    p.set_defaults(func=cmd_serve)

    p = _parser(verbs, "plan", "estimate per-GPU memory of a recipe under every hardware preset and say which fit",
                "spatialscore plan recipes/paper/flow_grpo_flux.yaml --gpus 8 --gpu-mem-gb 80\n"
                "spatialscore plan paper/spatialscore_qwen2_5_vl_7b --gpus 8 --nodes 2 --gpu-mem-gb 40 --json")
    p.add_argument("recipe", help="a reward, grpo, ddpo or dpo recipe (a path or a shipped recipe's name)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.micro_batch=2")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--precision", choices=["no", "bf16"], help="default: bf16 for recipes meant for it (model.precision: bf16; the paper's reward model), else no")
    p.set_defaults(func=cmd_plan)

    p = _parser(verbs, "demo", "the shapes world end to end: pairs, SpatialScore vs a CLIP baseline, Flow-GRPO, "
                "evaluation, leaderboard, report (~45 min on 2 CPU cores; reruns reuse finished stages)",
                "spatialscore demo --out runs/demo")
    p.add_argument("--out", default=str(Path("runs") / "demo"), help="where everything goes (default runs/demo)")
    p.add_argument("--grpo-iterations", type=int, help="Flow-GRPO iterations (default 100, ~10 s each)")
    p.add_argument("--quick", action="store_true", help="every stage tiny: checks the wiring in a few minutes")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # let `--json` and `-v` work after the verb too
    argv = list(sys.argv[1:] if argv is None else argv)
    global_flags = [a for a in argv if a in ("--json", "-v", "--verbose")]
    argv = global_flags + [a for a in argv if a not in global_flags]
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`train-grpo RECIPE --out X lr=1e-4`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    args.stdout = sys.stdout
    args.argv = argv  # what this process was asked (a launcher re-runs it in every process)
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            return args.func(args)
    except SpatialScoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
