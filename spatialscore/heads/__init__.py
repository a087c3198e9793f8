"""The reward-head registry: the plugin point of spatialscore.

A head maps `images: FloatTensor[B, 3, H, W]` in [0, 1], `prompts: list[str]` and `meta: list[dict]` (prompt
metadata, GenEval format) to `RewardOutput(scores: FloatTensor[B], extras: dict)`; a `bounded` head promises
scores in [0, 1]. Heads register by name with
`@register_head("name")`, or from another package through the `spatialscore.reward_heads` entry-point group:

    # pyproject.toml of your package
    [project.entry-points."spatialscore.reward_heads"]
    my_head = "my_package.heads:MyHead"      # a RewardHead subclass, or any callable returning one

Without packaging, `SPATIALSCORE_PLUGINS=my_heads,other.module` imports those modules (on the Python path) on the
first lookup, so the `@register_head` calls in them run — in every process a multi-process launch starts.
Entry points and these modules are loaded lazily, on the first lookup; `SPATIALSCORE_DISABLE_PLUGINS=1` turns them off.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

import torch

from spatialscore.errors import SpatialScoreError

ENTRY_POINT_GROUP = "spatialscore.reward_heads"


@dataclass
class RewardOutput:
    scores: torch.Tensor  # [B], float
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardHead:
    """Base class: subclasses implement `score`; `__call__` checks the inputs first."""

    name = "?"
    description = ""
    needs_meta = False  # heads that judge clauses need each prompt's metadata
    bounded = True  # scores lie in [0, 1]; learned heads (a reward model's mu, a cosine) set False

    @classmethod
    def example_kwargs(cls, tmp_path: Path) -> dict:
        """kwargs that build a small working instance, for the registry-wide tests; heads that need arguments
        (a checkpoint, a model) override this, and may create what they need under `tmp_path`."""
        return {}

    def __call__(self, images: torch.Tensor, prompts: list[str], meta: list[dict] | None = None) -> RewardOutput:
        check_inputs(self.name, images, prompts, meta, self.needs_meta)
        return self.score(images, prompts, meta or [{} for _ in prompts])

    def score(self, images: torch.Tensor, prompts: list[str], meta: list[dict]) -> RewardOutput:
        raise NotImplementedError


def check_inputs(name: str, images, prompts, meta, needs_meta: bool) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SpatialScoreError(f"head {name!r}: images must be a FloatTensor[B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise SpatialScoreError(f"head {name!r}: images must be floats in [0, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise SpatialScoreError(f"head {name!r}: images must lie in [0, 1], got values in "
                                f"[{images.min().item():.3g}, {images.max().item():.3g}] (divide uint8 by 255)")
    if len(prompts) != images.shape[0]:
        raise SpatialScoreError(f"head {name!r}: {images.shape[0]} images but {len(prompts)} prompts")
    if meta is not None and len(meta) != len(prompts):
        raise SpatialScoreError(f"head {name!r}: {len(prompts)} prompts but {len(meta)} meta records")
    if needs_meta and (meta is None or any(not m or "include" not in m for m in meta)):
        raise SpatialScoreError(f"head {name!r} judges prompt clauses and needs each prompt's metadata "
                                f"(GenEval format, with 'include')")


@dataclass
class _Entry:
    factory: Callable[..., RewardHead]
    source: str  # "built-in" or the distribution that registered it


_REGISTRY: dict[str, _Entry] = {}
_plugins_loaded = False


_importing: list[str] = []  # the SPATIALSCORE_PLUGINS module being imported, so its heads say where they come from


def register_head(name: str, source: str | None = None):
    """Class or factory decorator; a second head under the same name is an error, not a silent override."""
    source = source or (f"SPATIALSCORE_PLUGINS:{_importing[-1]}" if _importing else "built-in")

    def decorate(factory):
        if name in _REGISTRY:
            raise SpatialScoreError(f"reward head {name!r} is registered twice "
                                    f"({_REGISTRY[name].source} and {source})")
        _REGISTRY[name] = _Entry(factory, source)
        if isinstance(factory, type):
            factory.name = name
        return factory

    return decorate


def _load_builtins() -> None:
    from spatialscore.heads import learned, shapes  # noqa: F401  (register on import)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    if os.environ.get("SPATIALSCORE_DISABLE_PLUGINS") == "1":
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        try:
            factory = ep.load()
        except Exception as err:  # a broken plugin must not take the built-ins down with it
            raise SpatialScoreError(f"reward-head plugin {ep.name!r} from {dist} failed to load: {err}") from err
        register_head(ep.name, source=dist)(factory)
    for module in filter(None, (m.strip() for m in os.environ.get("SPATIALSCORE_PLUGINS", "").split(","))):
        _importing.append(module)
        try:
            importlib.import_module(module)
        except Exception as err:
            raise SpatialScoreError(f"SPATIALSCORE_PLUGINS: module {module!r} failed to import: {err}") from err
        finally:
            _importing.pop()


def _ensure_loaded() -> None:
    _load_builtins()
    _load_plugins()


def head_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def list_heads() -> list[tuple[str, str, str]]:
    """(name, source, description) of every registered head."""
    _ensure_loaded()
    return [(n, e.source, getattr(e.factory, "description", "") or (e.factory.__doc__ or "").strip().split("\n")[0])
            for n, e in sorted(_REGISTRY.items())]


def _entry(name: str) -> _Entry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpatialScoreError(f"unknown reward head {name!r}{hint}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def head_class(name: str) -> type[RewardHead]:
    """The class registered under `name`; RewardHead itself for a plugin registered as a plain factory function
    (so `head_class(name).example_kwargs(tmp_path)` is always callable, and gives {} there)."""
    factory = _entry(name).factory
    return factory if isinstance(factory, type) and issubclass(factory, RewardHead) else RewardHead


def get_head(name: str, **kwargs) -> RewardHead:
    head = _entry(name).factory(**kwargs)
    if not isinstance(head, RewardHead):
        raise SpatialScoreError(f"reward head {name!r} ({_REGISTRY[name].source}) did not build a RewardHead")
    return head
