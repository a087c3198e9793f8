"""The reward server under load: C concurrent clients for S seconds on loopback against `spatialscore serve`
started by this script, one server with dynamic batching (--max-batch) and one without (--max-batch 1), taking turns
(--rounds) so that the machine's other load hits both alike.

    .venv/bin/python benchmarks/serve_load.py [--head oracle] [--seconds 30] [--clients 8] [--max-batch 32]
    .venv/bin/python benchmarks/serve_load.py --head spatialscore=data/reward/shapes-spatialscore

Each request carries --items shapes-world images (uint8 arrays, 128x128) from a pool of --pool images whose in-process
scores (each image scored alone) were computed first, and a request id. Every response is checked: status 200, its
id echoed, its scores equal to the in-process scores of its images. Counted: dropped (no 200 answer), duplicated (an id
answered twice) and mismatched (a wrong id or score) responses. Reported: requests/s, p50/p99 latency, the mean
batch size the server ran, and the throughput ratio batched / unbatched.

The shapes-world heads score each image in Python, so batching them saves only per-request overhead; a learned head
runs a batch in one forward pass. Its scores are then equal to the alone-scored ones up to float rounding (the
kernels' summation order depends on the batch size): `max_abs_dev` reports how far, and `--tolerance` sets what
counts as a mismatch (0: bit for bit, the default).
"""

import argparse
import http.client
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from spatialscore.data.prompts import make_prompts
from spatialscore.data.render import render
from spatialscore.data.scene import sample_scene
from spatialscore.serve.protocol import encode_array
from spatialscore.serve.server import build_heads

ROOT = Path(__file__).resolve().parents[1]


def pool(n: int, seed: int = 0, size: int = 128) -> tuple[list[dict], torch.Tensor]:
    records = make_prompts(n, seed, "short")
    pixels = [np.asarray(render(sample_scene(m, random.Random(f"load-{seed}-{i}")), size).convert("RGB"))
              for i, m in enumerate(records)]
    return records, torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1).float() / 255 for p in pixels])


def start_server(spec: str, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "spatialscore.cli", "serve", "--heads", spec, "--port", "0",
                             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    found = re.search(r"on (http://\S+)", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, found.group(1)


def load(url: str, head: str, bodies: list[str], expected: list[float], clients: int, seconds: float,
         tolerance: float, first_id: int, items: int = 1) -> dict:
    """One segment of closed-loop load: raw counts and latencies (request ids start at `first_id`, so they stay
    unique across segments)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    raw = {"sent": 0, "dropped": 0, "duplicated": 0, "mismatched": 0, "latencies": [], "batch_sizes": [],
           "max_abs_dev": 0.0, "answered": set()}
    lock = threading.Lock()
    start_at = time.perf_counter() + 0.2
    stop_at = start_at + seconds

    def client(k: int) -> None:
        rng = random.Random(first_id + k)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        seq = 0
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while time.perf_counter() < stop_at:
            indices, request_id = [rng.randrange(len(bodies)) for _ in range(items)], f"{first_id}-{k}-{seq}"
            seq += 1
            body = f'{{"head": "{head}", "id": "{request_id}", "items": [{", ".join(bodies[i] for i in indices)}]}}'
            sent = time.perf_counter()
            try:
                conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                result, status = json.loads(response.read()), response.status
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                result, status = None, 0
            took = time.perf_counter() - sent
            with lock:
                raw["sent"] += 1
                if status != 200:
                    raw["dropped"] += 1
                    continue
                if result["id"] in raw["answered"]:
                    raw["duplicated"] += 1
                raw["answered"].add(result["id"])
                scores = result["scores"] if len(result["scores"]) == items else [None] * items
                dev = max(abs(got - expected[i]) if got is not None else float("inf")
                          for got, i in zip(scores, indices))
                raw["max_abs_dev"] = max(raw["max_abs_dev"], dev)
                if result["id"] != request_id or dev > tolerance:
                    raw["mismatched"] += 1
                raw["latencies"].append(took)
                raw["batch_sizes"].append(result["batch_size"])
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw["elapsed"] = max(time.perf_counter(), stop_at) - start_at
    return raw


def summary(segments: list[dict]) -> dict:
    counts = {k: sum(s[k] for s in segments) for k in ("sent", "dropped", "duplicated", "mismatched")}
    ids = [i for s in segments for i in s["answered"]]
    counts["duplicated"] += len(ids) - len(set(ids))  # across segments too
    ms = sorted(x * 1000 for s in segments for x in s["latencies"])
    batches = [b for s in segments for b in s["batch_sizes"]]
    ok = len(ms)
    return {**counts, "ok": ok, "requests_per_s": ok / sum(s["elapsed"] for s in segments),
            "p50_ms": statistics.median(ms) if ms else None, "p99_ms": ms[min(ok - 1, int(0.99 * ok))] if ms else None,
            "mean_batch": statistics.fmean(batches) if batches else None,
            "max_abs_dev": max(s["max_abs_dev"] for s in segments)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="oracle", help="one --heads spec of `spatialscore serve` (default oracle)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--pool", type=int, default=64, help="distinct images the clients draw from")
    parser.add_argument("--items", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each server takes (--seconds in all)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest score deviation not counted as a "
                                                                       "mismatch (default 0: bit for bit)")
    args = parser.parse_args(argv)
    (label, head), = build_heads(args.head).items()
    records, images = pool(args.pool)
    with torch.no_grad():  # each image alone: what a client scoring in-process would get
        expected = [head(images[i:i + 1], [records[i]["prompt"]], [records[i]]).scores.item()
                    for i in range(len(records))]
    bodies = [json.dumps({"prompt": r["prompt"], "meta": r, "image": encode_array(x)}) for r, x in zip(records, images)]
    report = {"head": args.head, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
              "torch_threads":
              torch.get_num_threads(), "images": f"uint8 arrays 128x128, {args.items} per request"}
    modes = {"batched": args.max_batch, "unbatched": 1}
    servers = {name: start_server(args.head, max_batch, args.max_wait_ms) for name, max_batch in modes.items()}
    segments = {name: [] for name in modes}
    try:  # the two servers take turns, so a change in the machine's other load hits both alike
        for round_ in range(args.rounds):
            for index, name in enumerate(modes):
                segments[name].append(load(servers[name][1], label, bodies, expected, args.clients,
                                           args.seconds / args.rounds, args.tolerance, 1000 * (2 * round_ + index),
                                           args.items))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    for name, max_batch in modes.items():
        report[name] = {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, **summary(segments[name])}
        print(f"{name}: {json.dumps(report[name])}", file=sys.stderr)
    report["throughput_ratio_batched_over_unbatched"] = (report["batched"]["requests_per_s"]
                                                         / report["unbatched"]["requests_per_s"])
    print(json.dumps(report, indent=2))
    clean = all(report[k][c] == 0 for k in ("batched", "unbatched") for c in ("dropped", "duplicated", "mismatched"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
