"""`RemoteReward`: a head hosted by `spatialscore serve`, called like any RewardHead. Trainers use it when
`reward.remote` is set.

Images go as float32 arrays by default, so the server's head sees exactly the floats the trainer made and the scores
equal in-process scoring bit for bit (for per-image heads; a learned model batched with other clients' images may
differ in the last bits). `dtype="uint8"` sends a quarter of the bytes; the shapes-world heads (oracle, counting,
text, binding) round images to uint8 themselves, so their scores stay identical, while a learned model then scores
the uint8-quantised image.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import threading
import urllib.parse

import torch

from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead, RewardOutput
from spatialscore.serve.protocol import encode_array

TOKEN_ENV = "SPATIALSCORE_REWARD_TOKEN"


def check_url(url: str, field: str = "reward.remote") -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise SpatialScoreError(f"{field}: expected a server URL like http://HOST:PORT (what `spatialscore serve` "
                                f"prints), got {url!r}")
    return parts


class RemoteReward(RewardHead):
    def __init__(self, url: str, head: str, token: str | None = None, token_file: str | None = None,
                 timeout: float = 300.0, dtype: str = "float32", field: str = "reward.remote"):
        from spatialscore.serve.server import read_token

        if dtype not in ("uint8", "float32"):
            raise SpatialScoreError(f"{field}: dtype must be uint8 or float32, got {dtype!r}")
        self.parts = check_url(url, field)
        self.url, self.name, self.timeout, self.dtype, self.field = url.rstrip("/"), head, timeout, dtype, field
        self.token = token or os.environ.get(TOKEN_ENV) or (read_token(token_file, "reward.token_file")
                                                            if token_file else None)
        self._local = threading.local()
        info = self._call("GET", "/v1/heads")
        hosted = {h["name"]: h for h in info["heads"]}
        if head not in hosted:
            raise SpatialScoreError(f"{field}: the server at {self.url} does not host head {head!r}; it hosts: "
                                    f"{', '.join(sorted(hosted))}")
        self.needs_meta, self.bounded = hosted[head]["needs_meta"], hosted[head]["bounded"]
        self.image_size = hosted[head]["image_size"]
        self.limits = info["limits"]

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = kind(self.parts.hostname, self.parts.port, timeout=self.timeout)
        return conn

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if data else {}),
                   **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        for attempt in (0, 1):  # a kept-alive connection the server has closed fails once: reconnect
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                self._local.conn = None
                if attempt:
                    raise SpatialScoreError(f"{self.field}: cannot reach the reward server at {self.url} ({err}); "
                                            f"is `spatialscore serve` running there?") from None
        try:
            result = json.loads(payload)
        except ValueError:
            result = {"error": payload[:200].decode(errors="replace")}
        if response.status != 200:
            raise SpatialScoreError(f"{self.field}: the reward server at {self.url} answered {response.status}: "
                                    f"{result.get('error', result) if isinstance(result, dict) else result}")
        return result

    def score(self, images: torch.Tensor, prompts: list[str], meta: list[dict]) -> RewardOutput:
        items = [{"prompt": p, "meta": m or None, "image": encode_array(img, self.dtype)}
                 for img, p, m in zip(images, prompts, meta)]
        per_image = max((len(json.dumps(item)) for item in items), default=1)
        pixels = images.shape[-1] * images.shape[-2]
        step = max(1, min(self.limits["max_items"], (self.limits["max_request_bytes"] - 4096) // per_image,
                          self.limits.get("max_pixels", pixels) // pixels))
        scores, extras = [], {}
        for start in range(0, len(items), step):
            try:
                result = self._call("POST", "/v1/score", {"head": self.name, "items": items[start:start + step]})
            except TypeError as err:  # json.dumps on metadata that is not JSON
                raise SpatialScoreError(f"{self.field}: prompt metadata must be JSON ({err})") from None
            scores += result["scores"]
            for key, values in result["extras"].items():
                extras.setdefault(key, []).extend(values)
        as_tensor = lambda values: torch.tensor([math.nan if v is None else v for v in values],  # noqa: E731
                                                dtype=torch.float32)
        return RewardOutput(as_tensor(scores), {k: as_tensor(v) for k, v in extras.items()})
