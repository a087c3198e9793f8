"""`spatialscore serve`: reward heads behind HTTP, so generator training on some GPUs can call reward models
hosted on others.

    GET  /health      status, version, hosted heads (no token needed)
    GET  /v1/heads    each head's properties and the server's limits
    POST /v1/score    {"head", "items": [{"prompt", "meta"?, "image": {"png"} | {"array", "shape", "dtype"}}]}
    GET  /openapi.json

Concurrent requests to one head are batched (spatialscore/serve/batching.py). Every error is JSON
`{"error": "..."}` with a 4xx naming the field (`items[3].image.shape: ...`), and the server keeps serving.
Payloads over the byte limit are refused before they are read; a bearer token guards /v1/ when one is set, and
binding to anything but loopback requires one.

This module does not use `from __future__ import annotations`: FastAPI reads the endpoint annotations, and the
request model is built per server (its `head` is an enum of the hosted heads).
"""

import asyncio
import hmac
import ipaddress
import math
import socket
import threading
from dataclasses import dataclass
from typing import Literal

from spatialscore import __version__
from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead
from spatialscore.serve.batching import HeadBatcher
from spatialscore.serve.protocol import (ErrorResponse, HeadInfo, HeadsResponse, HealthResponse, Limits,
                                         PayloadTooLarge, RequestError, ScoreItem, ScoreRequest, ScoreResponse,
                                         decode_items)


ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "malformed JSON"), (401, "missing or wrong bearer token"), (413, "payload over --max-request-mb"),
    (422, "a field is wrong; the message names it"), (500, "the head failed"))}


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_batch: int = 64  # images per head call, gathered across requests
    max_wait_ms: float = 0.0  # how long a batch waits for more requests; 0: it takes what queued while the head ran
    max_request_bytes: int = 64 * 2**20
    max_items: int = 256  # items per request
    max_side: int = 2048  # image side, pixels
    max_pixels: int = 2**26  # all images of a request together (64 Mpx: ~0.8 GB as float32), checked before decoding

    def check(self) -> None:
        for name in ("max_batch", "max_request_bytes", "max_items", "max_side", "max_pixels"):
            if getattr(self, name) < 1:
                raise SpatialScoreError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise SpatialScoreError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not is_loopback(self.host) and not self.token:
            raise SpatialScoreError(f"--host {self.host} is not loopback: anyone who can reach it could use the "
                                    f"server, so give --token-file FILE (a bearer token every client must send)")


def build_heads(specs: str, batch_size: int = 32) -> dict[str, RewardHead]:
    """--heads: comma-separated specs as `spatialscore eval --reward` takes them (NAME, NAME=PATH, PATH,
    LABEL=PATH); clients ask for a head by its label."""
    from spatialscore.eval.runner import head_from_spec

    heads = {}
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        label, head = head_from_spec(spec, batch_size)
        if label in heads:
            raise SpatialScoreError(f"--heads: the label {label!r} is used twice (name one LABEL=PATH)")
        heads[label] = head
    if not heads:
        raise SpatialScoreError("--heads: give at least one head, e.g. --heads oracle,spatialscore=runs/reward")
    return heads


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str, flag: str = "--token-file") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as err:
        raise SpatialScoreError(f"{flag} {path}: cannot read it ({err.strerror})") from None
    if not token or any(c.isspace() for c in token):
        raise SpatialScoreError(f"{flag} {path}: expected one token (no spaces) on one line")
    return token


def _json(status: int, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: the bearer token on /v1/, and the byte limit, checked on Content-Length before anything is
    read and counted while reading (a chunked body has no Content-Length)."""

    def __init__(self, app, token: str | None, max_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                why = "missing bearer token" if not given else "wrong bearer token"
                return await _json(401, f"{why}: send 'Authorization: Bearer <token>'",
                                   {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_big = (f"payload over the server's limit of {self.max_bytes} bytes (--max-request-mb); "
                   f"send fewer or smaller images per request")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _json(400, "Content-Length is not a number")(scope, receive, send)
            if declared > self.max_bytes:
                return await _json(413, too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _json(413, too_big)(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _field(loc: tuple) -> str:
    """('body', 'items', 3, 'image', 'array', 'shape') -> 'items[3].image.shape' (the union tag after 'image'
    dropped)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for i, part in enumerate(parts):
        if i and parts[i - 1] == "image" and part in ("png", "array") and i + 1 < len(parts):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _validation_message(errors: list[dict], hosted: list[str]) -> tuple[int, str]:
    first = errors[0]
    if first["type"] == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    where = _field(tuple(first["loc"])) or "request body"
    if where == "head" and first["type"] == "literal_error":
        message = f"unknown head {first.get('input')!r}; this server hosts: {', '.join(hosted)}"
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] in ("model_attributes_type", "dict_type") and where == "request body":
        message = "expected a JSON object {\"head\", \"items\": [...]}"
    else:
        message = first["msg"]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return 422, f"{where}: {message}{more}"


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def build_app(heads: dict[str, RewardHead], settings: ServeSettings):
    """The FastAPI app and its batchers (close them when done)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import Field, create_model
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    if not heads:
        raise SpatialScoreError("--heads: give at least one head, e.g. --heads oracle")
    hosted = sorted(heads)
    batchers = {name: HeadBatcher(name, head, settings.max_batch, settings.max_wait_ms / 1000)
                for name, head in heads.items()}
    Request_ = create_model(  # noqa: N806  (a class)
        "ScoreRequest", __base__=ScoreRequest, __doc__=ScoreRequest.__doc__,
        head=(Literal[tuple(hosted)], Field(description="one of the hosted heads")),
        items=(list[ScoreItem], Field(min_length=1, max_length=settings.max_items)))

    app = FastAPI(title="spatialscore reward server", version=__version__,
                  description="Reward heads over HTTP. Images are PNG or raw arrays with an explicit shape, base64; "
                              "errors are JSON {\"error\": ...} naming the field.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status, message = _validation_message(list(exc.errors()), hosted)
        return _json(status, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _json(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.get("/health", response_model=HealthResponse)
    async def health():
        return HealthResponse(status="ok", version=__version__, heads=hosted)

    @app.get("/v1/heads", response_model=HeadsResponse, responses={401: ERRORS[401]})
    async def list_heads():
        return HeadsResponse(
            heads=[HeadInfo(name=name, needs_meta=heads[name].needs_meta, bounded=heads[name].bounded,
                            image_size=_image_size(heads[name])) for name in hosted],
            limits=Limits(max_request_bytes=settings.max_request_bytes, max_items=settings.max_items,
                          max_side=settings.max_side, max_pixels=settings.max_pixels, max_batch=settings.max_batch,
                          max_wait_ms=settings.max_wait_ms))

    async def score(request: Request_):
        head = heads[request.head]
        try:
            items = await run_in_threadpool(decode_items, request, head.needs_meta, settings.max_side,
                                            settings.max_pixels)
        except PayloadTooLarge as err:
            return _json(413, str(err))
        except RequestError as err:
            return _json(422, str(err))
        try:
            result = await asyncio.wrap_future(batchers[request.head].submit(items))
        except SpatialScoreError as err:
            return _json(422, str(err))
        except Exception as err:
            return _json(500, f"head {request.head!r} failed: {type(err).__name__}: {err}")
        return ScoreResponse(head=request.head, id=request.id, scores=_finite(result.scores),
                             extras={k: _finite(v) for k, v in result.extras.items()}, batch_size=result.batch_size)

    app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)(score)
    return _Guard(app, settings.token, settings.max_request_bytes), app, batchers


def _image_size(head: RewardHead) -> int | None:
    from spatialscore.train.policy_gradient import head_image_size

    return head_image_size(head)


def openapi_spec(heads: dict[str, RewardHead], settings: ServeSettings) -> dict:
    _, app, batchers = build_app(heads, settings)
    try:
        return app.openapi()
    finally:
        for batcher in batchers.values():
            batcher.close()


class RewardServer:
    """The server on its own thread (tests, benchmarks), or in the foreground (`run_forever`, the CLI)."""

    def __init__(self, heads: dict[str, RewardHead], settings: ServeSettings):
        import uvicorn

        settings.check()
        self.settings = settings
        self.asgi, self.app, self.batchers = build_app(heads, settings)
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((settings.host, settings.port))
        except OSError as err:
            self.socket.close()
            raise SpatialScoreError(f"--host {settings.host} --port {settings.port}: cannot bind ({err.strerror})") \
                from None
        self.port = self.socket.getsockname()[1]
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.asgi, log_level="warning", access_log=False,
                                                    timeout_keep_alive=30))
        self._thread: threading.Thread | None = None

    def run_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._close_batchers()

    def start(self) -> "RewardServer":
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise SpatialScoreError(f"the reward server on {self.url} failed to start")
            threading.Event().wait(0.01)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()
        self._close_batchers()

    def _close_batchers(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

