"""The reward server: PNG and array inputs score as in-process, concurrent requests are batched and each gets its own
scores, every kind of bad request gets a 4xx that names the problem and the server keeps serving, the bearer token,
a Flow-GRPO run through `reward.remote` equal to the in-process run, and a short schemathesis fuzz."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from spatialscore import __version__
from spatialscore.config import GrpoConfig, load_config
from spatialscore.data.prompts import make_prompts
from spatialscore.data.render import render
from spatialscore.data.scene import sample_scene
from spatialscore.errors import SpatialScoreError
from spatialscore.heads import get_head
from spatialscore.serve.client import RemoteReward
from spatialscore.serve.protocol import encode_array, encode_png
from spatialscore.serve.server import RewardServer, ServeSettings

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 2**20


def _scenes(n: int, seed: int = 0, size: int = 64) -> tuple[list[dict], list[np.ndarray]]:
    records = make_prompts(n, seed, "short")
    pixels = [np.asarray(render(sample_scene(m, random.Random(f"serve-{seed}-{i}")), size).convert("RGB"))
              for i, m in enumerate(records)]
    return records, pixels


def _floats(pixels: list[np.ndarray], noise: float = 0.03) -> torch.Tensor:
    """Float images as a generator makes them: between the uint8 levels, so quantising would show."""
    x = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1).float() / 255 for p in pixels])
    return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


@pytest.fixture(scope="module")
def heads():
    return {"oracle": get_head("oracle"), "counting": get_head("counting")}


@pytest.fixture(scope="module")
def server(heads):
    with RewardServer(heads, ServeSettings(port=0, max_batch=64, max_wait_ms=30, max_request_bytes=LIMIT,
                                           max_items=16, max_side=256, max_pixels=300_000)) as srv:
        yield srv


def _post(url: str, body: bytes, path: str = "/v1/score", headers: dict | None = None, chunked: bool = False):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked
                     else body, headers={"Content-Type": "application/json", **(headers or {})},
                     encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _get(url: str, path: str, headers: dict | None = None):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _body(head: str, records: list[dict], images: list[dict], **extra) -> bytes:
    return json.dumps({"head": head, "items": [{"prompt": r["prompt"], "meta": r, "image": image}
                                               for r, image in zip(records, images)], **extra}).encode()


def test_png_and_array_inputs_score_as_in_process(server, heads):
    records, pixels = _scenes(6)
    prompts = [r["prompt"] for r in records]
    uint8 = _floats(pixels, noise=0)
    for name in ("oracle", "counting"):
        local = heads[name](uint8, prompts, records).scores.tolist()
        for images in ([encode_png(p) for p in pixels], [encode_array(x) for x in uint8]):
            status, result = _post(server.url, _body(name, records, images, id="req-1"))
            assert status == 200, result
            assert result["scores"] == local and result["head"] == name and result["id"] == "req-1"


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_remote_reward_equals_the_in_process_head_on_float_images(server, heads, dtype):
    """float32 on the wire is lossless; uint8 rounds as the shapes-world heads do themselves: identical either way."""
    records, pixels = _scenes(8, seed=1)
    images = _floats(pixels)
    prompts = [r["prompt"] for r in records]
    remote = RemoteReward(server.url, "oracle", dtype=dtype)
    assert remote.needs_meta and remote.bounded
    out = remote(images, prompts, records)
    local = heads["oracle"](images, prompts, records)
    assert torch.equal(out.scores, local.scores)
    assert torch.equal(out.extras["passed"], local.extras["passed"])


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(server, heads):
    records, pixels = _scenes(24, seed=2)
    images = _floats(pixels)
    local = heads["oracle"](images, [r["prompt"] for r in records], records).scores.tolist()
    results, errors = {}, []
    barrier = threading.Barrier(12)

    payloads = [_body("oracle", records[2 * k:2 * k + 2], [encode_array(x) for x in images[2 * k:2 * k + 2]],
                      id=str(k)) for k in range(12)]  # encoded before the barrier, so the requests arrive together

    def client(k: int):
        try:
            barrier.wait()
            status, body = _post(server.url, payloads[k])
            assert status == 200, body
            results[k] = body
        except Exception as err:  # collected, so the assertion below names it
            errors.append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[k]["id"] == str(k) and results[k]["scores"] == local[2 * k:2 * k + 2] for k in range(12))
    assert max(r["batch_size"] for r in results.values()) > 2  # some requests shared a head call


def test_images_of_different_sizes_in_one_request(server, heads):
    records, small = _scenes(2, seed=3, size=48)
    _, large = _scenes(2, seed=3, size=96)
    status, result = _post(server.url, _body("oracle", records * 2, [encode_png(p) for p in small + large]))
    assert status == 200, result
    expect = [heads["oracle"](_floats([p], 0), [r["prompt"]], [r]).scores.item()
              for p, r in zip(small + large, records * 2)]
    assert result["scores"] == expect


def _bad_requests() -> list[tuple[str, bytes, int, str]]:
    records, pixels = _scenes(1, seed=4)
    good = {"prompt": records[0]["prompt"], "meta": records[0], "image": encode_png(pixels[0])}
    body = lambda **kw: json.dumps({"head": "oracle", "items": [good], **kw}).encode()  # noqa: E731
    item = lambda **kw: body(items=[good, {**good, **kw}])  # noqa: E731
    array = encode_array(torch.rand(3, 16, 16))
    return [
        ("malformed JSON", b'{"head": "oracle", "items": [', 400, "malformed JSON"),
        ("not an object", b"[1, 2]", 422, "expected a JSON object"),
        ("unknown head", body(head="clip"), 422, "unknown head 'clip'; this server hosts: counting, oracle"),
        ("wrong shape", item(image={**array, "shape": [16, 16, 4]}), 422,
         "items[1].image.shape: expected [H, W, 3]"),
        ("shape and bytes disagree", item(image={**array, "shape": [16, 8, 3]}), 422,
         "items[1].image.array: holds 768 bytes; shape [16, 8, 3] of uint8 needs 384"),
        ("too large a side", item(image={**encode_array(torch.rand(3, 8, 300))}), 422, "items[1].image.shape: image "
         "sides must lie in 8..256"),
        ("not base64", item(image={"png": "!!!"}), 422, "items[1].image.png"),
        ("not a PNG", item(image={"png": base64.b64encode(b"GIF89a" + bytes(40)).decode()}), 422,
         "items[1].image.png: not a readable PNG"),
        ("no metadata for a clause-judging head", item(meta=None), 422, "items[1].meta: head 'oracle' judges"),
        ("bad metadata", item(meta={"include": [{"class": "circle", "count": "two"}]}), 422,
         "items[1].meta.include[0].count: must be an integer"),
        ("unknown field", item(picture=1), 422, "items[1].picture"),
        ("too many items", body(items=[good] * 17), 422, "items: List should have at most 16 items"),
        ("no items", body(items=[]), 422, "items: List should have at least 1 item"),
        ("too many pixels (small PNGs, large images)",
         body(items=[{**good, "image": encode_png(np.zeros((256, 256, 3), np.uint8))}] * 5), 413,
         "items: the request's images hold 327680 pixels together; this server takes at most 300000"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, case):
    _, payload, status, message = case
    got, body = _post(server.url, payload)
    assert (got, set(body)) == (status, {"error"}), body
    assert message in body["error"]
    health = {"status": "ok", "version": __version__, "heads": ["counting", "oracle"]}
    assert _get(server.url, "/health") == (200, health)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_payload_gets_413_before_it_is_read(server, chunked):
    records, _ = _scenes(1)
    payload = _body("oracle", records * 8, [encode_array(torch.rand(3, 128, 128), "float32")] * 8)
    assert len(payload) > LIMIT
    status, body = _post(server.url, payload, chunked=chunked)
    assert status == 413 and "limit of 1048576 bytes" in body["error"]
    assert _get(server.url, "/health")[0] == 200


def test_the_client_splits_a_large_batch_to_the_servers_limits(server, heads):
    records, pixels = _scenes(20, seed=5)  # max_items is 16
    images = _floats(pixels)
    out = RemoteReward(server.url, "counting")(images, [r["prompt"] for r in records], records)
    assert torch.equal(out.scores, heads["counting"](images, [r["prompt"] for r in records], records).scores)


def test_client_errors_name_the_url_and_the_head(server):
    with pytest.raises(SpatialScoreError, match=r"does not host head 'text'; it hosts: counting, oracle"):
        RemoteReward(server.url, "text")
    with RewardServer({"oracle": get_head("oracle")}, ServeSettings(port=0)) as gone:
        url = gone.url
    with pytest.raises(SpatialScoreError, match=rf"cannot reach the reward server at {url}"):
        RemoteReward(url, "oracle")
    with pytest.raises(SpatialScoreError, match=r"reward.remote: expected a server URL"):
        load_config(GrpoConfig, None, ["reward.remote=localhost:8765"])


def test_a_token_guards_v1_and_health_stays_open(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    from spatialscore.serve.server import read_token

    records, pixels = _scenes(1)
    payload = _body("oracle", records, [encode_png(pixels[0])])
    with RewardServer({"oracle": get_head("oracle")}, ServeSettings(port=0, token=read_token(str(token)))) as srv:
        assert _post(srv.url, payload) == (401, {"error": "missing bearer token: send 'Authorization: Bearer <token>'"})
        status, body = _post(srv.url, payload, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"].startswith("wrong bearer token")
        assert _get(srv.url, "/v1/heads")[0] == 401
        assert _get(srv.url, "/health")[0] == 200
        assert _post(srv.url, payload, headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        with pytest.raises(SpatialScoreError, match="answered 401: missing bearer token"):
            RemoteReward(srv.url, "oracle")
        os.environ["SPATIALSCORE_REWARD_TOKEN"] = "s3cret-token"
        try:
            assert RemoteReward(srv.url, "oracle").needs_meta
        finally:
            del os.environ["SPATIALSCORE_REWARD_TOKEN"]
        assert RemoteReward(srv.url, "oracle", token_file=str(token)).needs_meta


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spatialscore.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_refuses_a_non_loopback_host_without_a_token_and_writes_the_openapi_spec(tmp_path):
    refused = _cli("serve", "--heads", "oracle", "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2
    assert "--host 0.0.0.0 is not loopback" in refused.stderr and "--token-file" in refused.stderr
    spec = tmp_path / "openapi.json"
    done = _cli("serve", "--heads", "oracle,counting", "--openapi", str(spec))
    assert done.returncode == 0, done.stderr
    schema = json.loads(spec.read_text())
    assert {"/health", "/v1/heads", "/v1/score"} <= set(schema["paths"])
    assert set(schema["paths"]["/v1/score"]["post"]["responses"]) >= {"200", "400", "401", "413", "422"}


def test_a_grpo_run_through_reward_remote_equals_the_in_process_run(server, tmp_path):
    from spatialscore.train.flow_grpo import train_grpo
    from spatialscore.train.policy_gradient import build_reward

    tiny = ["model.tiny=shapes_flow", "reward.heads={oracle: 1.0, counting: 0.5}", "prompts.eval_n=2",
            "sample.steps=2", "sample.eval_steps=2", "sample.group_size=4", "sample.prompts_per_iter=2",
            "train.top_k=1", "train.micro_batch=4", "train.iterations=1", "train.eval_every=100"]
    runs = {}
    for kind, extra in (("local", []), ("remote", [f"reward.remote={server.url}"])):
        cfg = load_config(GrpoConfig, None, [*tiny, *extra])
        assert isinstance(build_reward(cfg).heads["oracle"], RemoteReward) == (kind == "remote")
        train_grpo(cfg, tmp_path / kind, progress=False)
        runs[kind] = [{k: v for k, v in json.loads(line).items() if "second" not in k and "time" not in k}
                      for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert runs["local"] == runs["remote"]
    assert any("reward_mean" in row for row in runs["remote"])


def test_schemathesis_finds_no_server_error_or_schema_violation(server, tmp_path):
    """A bounded fuzz of the OpenAPI spec. positive_data_acceptance is left out: the schema cannot say that an
    array's bytes must match its shape or that a PNG must decode, so such requests rightly get a 422."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--max-examples", "15", "--workers", "1",
         "--phases", "coverage,fuzzing", "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)  # it keeps a .schemathesis/ folder there
    assert run.returncode == 0, run.stdout[-3000:]
    assert _get(server.url, "/health")[0] == 200


def test_a_grpo_run_against_the_learned_head_through_reward_remote_equals_the_in_process_run(tmp_path):
    """The shipped SpatialScore model hosted by the server: one trainer's requests are batched as it sends them, so its
    rewards are bit-identical to scoring in-process."""
    from spatialscore.train.flow_grpo import train_grpo

    shipped = str(Path(__file__).resolve().parents[1] / "data" / "reward" / "shapes-spatialscore")
    tiny = ["model.tiny=shapes_flow", "reward.heads={spatialscore: 1.0}", "prompts.eval_n=2", "sample.steps=2",
            "sample.eval_steps=2", "sample.group_size=4", "sample.prompts_per_iter=2", "train.top_k=1",
            "train.micro_batch=4", "train.iterations=2", "train.eval_every=100"]
    runs = {}
    with RewardServer({"spatialscore": get_head("spatialscore", checkpoint=shipped)},
                      ServeSettings(port=0, max_batch=64, max_items=64, max_request_bytes=64 * 2**20)) as srv:
        for kind, extra in (("local", [f"reward.kwargs={{spatialscore: {{checkpoint: {shipped}}}}}"]),
                            ("remote", [f"reward.remote={srv.url}"])):
            train_grpo(load_config(GrpoConfig, None, [*tiny, *extra]), tmp_path / kind, progress=False)
            runs[kind] = [{k: v for k, v in json.loads(line).items() if "second" not in k and "time" not in k}
                          for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert runs["local"] == runs["remote"]
    assert any("reward_mean" in row for row in runs["remote"])


def test_the_batch_loop_skips_cancelled_requests_and_survives_a_failing_head():
    """A request cancelled while queued (its client went away) is skipped, and a head that raises fails only its own
    request: the worker thread keeps serving."""
    import threading

    from spatialscore.heads import RewardHead, RewardOutput
    from spatialscore.serve.batching import HeadBatcher
    from spatialscore.serve.protocol import DecodedItem

    release = threading.Event()

    class Slow(RewardHead):
        def score(self, images, prompts, meta):
            release.wait(10)
            if "boom" in prompts:
                raise ValueError("boom")
            return RewardOutput(images.mean(dim=(1, 2, 3)))

    batcher = HeadBatcher("slow", Slow(), max_batch=1, max_wait=0.0)
    item = lambda prompt: [DecodedItem(torch.full((3, 8, 8), 0.5), prompt, {})]  # noqa: E731
    try:
        first = batcher.submit(item("a"))  # occupies the worker until released
        cancelled, failing, last = batcher.submit(item("b")), batcher.submit(item("boom")), batcher.submit(item("c"))
        assert cancelled.cancel()
        release.set()
        assert first.result(10).scores == [0.5] and last.result(10).scores == [0.5]
        with pytest.raises(ValueError, match="boom"):
            failing.result(10)
        assert batcher.submit(item("d")).result(10).scores == [0.5]
    finally:
        batcher.close()
