"""Atomic file writes: write beside the target, fsync, rename. A crash or SIGKILL leaves the old file or the new
one, never half of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spatialscore.errors import SpatialScoreError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def local_model_dir(path: str, field: str, what: str) -> Path:
    """A local from_pretrained directory (weights are never downloaded), or an error naming the field."""
    directory = Path(path)
    if not directory.is_dir():
        raise SpatialScoreError(f"{field}: {path}: no such directory (expected a local from_pretrained directory "
                                f"of {what})")
    return directory
