"""Typed configuration: dataclasses + OmegaConf, precedence defaults < recipe YAML < `key=value` overrides.

Every recipe YAML names its `kind`, which picks the dataclass that validates it. Unknown keys and wrong types are
errors that name the file or override, the key, and the closest valid key. `save_config` writes the resolved
config next to a run's outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from spatialscore.errors import SpatialScoreError
from spatialscore.io import atomic_write_text

T = TypeVar("T")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*=.*$", re.S)


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise SpatialScoreError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass
class PairsConfig:
    """Shapes-world preference pairs (`spatialscore data make-pairs`)."""

    kind: str = "pairs"
    n: int = 1000
    seed: int = 0
    style: str = "mixed"  # short | long | text | mixed
    phrasing: str = "train"  # train | heldout | all: which template set words the prompts
    image_size: int = 128
    multi_prob: float = 0.5  # share of pairs with 2-3 perturbations instead of one
    workers: int = 0  # 0: one per core

    def __post_init__(self):
        from spatialscore.data.prompts import PHRASINGS, STYLES

        _one_of("style", self.style, STYLES)
        _one_of("phrasing", self.phrasing, PHRASINGS)
        if self.n < 1 or self.image_size < 16 or not 0 <= self.multi_prob <= 1 or self.workers < 0:
            raise SpatialScoreError("pairs config: need n >= 1, image_size >= 16, 0 <= multi_prob <= 1, workers >= 0")


@dataclass
class PromptsConfig:
    """Shapes-world prompt metadata (`spatialscore data make-prompts`)."""

    kind: str = "prompts"
    n: int = 500
    seed: int = 0
    style: str = "mixed"
    phrasing: str = "train"

    def __post_init__(self):
        from spatialscore.data.prompts import PHRASINGS, STYLES

        _one_of("style", self.style, STYLES)
        _one_of("phrasing", self.phrasing, PHRASINGS)
        if self.n < 1:
            raise SpatialScoreError(f"prompts config: n must be at least 1, got {self.n}")


@dataclass
class ModelConfig:
    """One block for every architecture; each reads the keys it needs (see spatialscore/models/)."""

    arch: str = "relation"  # relation | clip_dual | qwen2_5_vl
    image_size: int = 128
    channels: int = 64
    grid: int = 8  # relation: cells per side of the feature grid
    objects: int = 8  # relation: the most object-like cells that enter the pairwise relation module
    text_dim: int = 128
    g_dim: int = 128
    f_dim: int = 128
    seed: int = 0
    pretrained: str | None = None  # qwen2_5_vl: a local from_pretrained directory
    tiny: bool = False  # qwen2_5_vl: a tiny model built from a config in code (tests, CI)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    head_hidden: int = 128


@dataclass
class RewardDataConfig:
    train: str | None = None  # a pairs file (JSONL / parquet / HF dir); None: generate shapes-world pairs in memory
    val: str | None = None
    n_train: int = 20000
    n_val: int = 1000
    seed: int = 0  # generated training pairs; validation uses val_seed, so it is held out
    val_seed: int = 1000
    style: str = "mixed"
    phrasing: str = "all"
    tag_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {position: 3, long: 3}

    def __post_init__(self):
        from spatialscore.data.prompts import PHRASINGS, STYLES, TAGS

        _one_of("data.style", self.style, STYLES)
        _one_of("data.phrasing", self.phrasing, PHRASINGS)
        for tag, weight in self.tag_weights.items():
            _one_of("data.tag_weights", tag, TAGS)
            if weight < 0:
                raise SpatialScoreError(f"data.tag_weights.{tag}: weights must be >= 0, got {weight}")


@dataclass
class RewardTrainConfig:
    steps: int = 2000
    batch_size: int = 32  # per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    loss: str = "gaussian_bt"  # gaussian_bt | bt
    max_grad_norm: float = 1.0
    aux_weight: float = 1.0  # dense per-cell supervision from the scene graphs (relation backbone, generated data)
    eval_every: int = 500
    save_every: int = 500
    seed: int = 0

    def __post_init__(self):
        _one_of("train.loss", self.loss, ("gaussian_bt", "bt"))
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise SpatialScoreError("train: need steps >= 1, batch_size >= 1, and batch_size divisible by grad_accum")


@dataclass
class RewardConfig:
    """SpatialScore reward-model training (`spatialscore train-reward`)."""

    kind: str = "reward"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: RewardDataConfig = dataclasses.field(default_factory=RewardDataConfig)
    train: RewardTrainConfig = dataclasses.field(default_factory=RewardTrainConfig)
    report_to: str = "none"  # none | wandb (offline unless WANDB_MODE says otherwise)

    def __post_init__(self):
        _one_of("report_to", self.report_to, ("none", "wandb"))


KINDS: dict[str, type] = {"pairs": PairsConfig, "prompts": PromptsConfig, "reward": RewardConfig}


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(schema: type, dotted: str) -> list[str]:
    """Valid keys at the level of `dotted` ("model.lr" -> the fields of the `model` dataclass)."""
    cls = schema
    for part in dotted.split(".")[:-1]:
        sub = typing.get_type_hints(cls).get(part)
        if sub is None or not dataclasses.is_dataclass(sub):
            break
        cls = sub
    return [f.name for f in dataclasses.fields(cls)]


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> SpatialScoreError:
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "?")
    if isinstance(err, ConfigKeyError) or "not in" in str(err).lower():
        return SpatialScoreError(f"{source}: unknown key {key!r}{_did_you_mean(key.split('.')[-1], _fields_at(schema, key))}; "
                                 f"valid keys: {', '.join(_fields_at(schema, key))}")
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return SpatialScoreError(f"{source}: bad value for {key!r}: {first}")
    return SpatialScoreError(f"{source}: {str(err).splitlines()[0]}")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpatialScoreError(f"{path}: no such recipe file (see `spatialscore recipes ls`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SpatialScoreError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise SpatialScoreError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def schema_for(path: str | Path) -> type:
    kind = read_yaml(path).get("kind")
    if kind not in KINDS:
        raise SpatialScoreError(f"{path}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    return KINDS[kind]


def parse_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise SpatialScoreError(f"bad override {item!r}: expected key=value (for example seed=3 or model.lr=1e-4)")
    return overrides


def load_config(schema: type[T], recipe: str | Path | None = None, overrides: list[str] = ()) -> T:
    """defaults < recipe YAML < overrides, validated against `schema`."""
    cfg = OmegaConf.structured(schema)
    if recipe is not None:
        data = read_yaml(recipe)
        expected = cfg.kind
        if data.get("kind", expected) != expected:
            raise SpatialScoreError(f"{recipe}: field 'kind' is {data['kind']!r}, but this command takes a "
                                    f"{expected!r} recipe")
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, str(recipe)) from None
    for item in parse_overrides(list(overrides)):
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, schema, f"override {item!r}") from None
    if cfg.kind != OmegaConf.structured(schema).kind:
        raise SpatialScoreError(f"field 'kind' cannot be changed to {cfg.kind!r}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, str(recipe or "config")) from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, to_yaml(cfg))
    return path


def list_recipes() -> list[tuple[str, str, str]]:
    """(name, kind, description) of every shipped recipe; description = the first comment line."""
    rows = []
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        text = path.read_text()
        first = next((l[1:].strip() for l in text.splitlines() if l.startswith("#")), "")
        kind = (yaml.safe_load(text) or {}).get("kind", "?")
        rows.append((str(path.relative_to(RECIPES_DIR).with_suffix("")), kind, first))
    return rows


def find_recipe(name: str) -> Path:
    """A recipe by path, or by its name under recipes/ ("shapes/pairs")."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = [r[0] for r in list_recipes()]
    raise SpatialScoreError(f"no recipe {name!r}{_did_you_mean(name, names)}; shipped: {', '.join(names)}")


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    src, dest = find_recipe(name), Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise SpatialScoreError(f"{dest} already exists (pass --force to overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest

