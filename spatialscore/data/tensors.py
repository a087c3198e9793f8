"""Preference pairs as uint8 tensors in memory, for training and evaluating reward models.

Shapes-world pairs are generated in parallel and cached under $SPATIALSCORE_CACHE (default ~/.cache/spatialscore)
as plain .npy arrays + a JSON sidecar (no pickle), keyed by everything that determines them, so every process of a
multi-process run and every rerun reads the same bytes. Pair files (JSONL, parquet, HF dirs) load through
`formats.load_pairs` and are resized to the model's image size.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from spatialscore.errors import SpatialScoreError


@dataclass
class PairTensors:
    chosen: torch.Tensor  # uint8 [N, H, W, 3]
    rejected: torch.Tensor
    prompts: list[str]
    kinds: list[list[str]]  # perturbation kinds per pair ([] when unknown)
    targets: dict[str, torch.Tensor] | None = None  # "chosen.color", ... (data/targets.py), generated pairs only
    meta: list[dict] | None = None  # each pair's prompt metadata (GenEval format), pair files only

    def __len__(self) -> int:
        return len(self.prompts)

    def images(self, side: str, index: torch.Tensor) -> torch.Tensor:
        """FloatTensor [B, 3, H, W] in [0, 1]."""
        return getattr(self, side)[index].permute(0, 3, 1, 2).float().div_(255)

    def cell_targets(self, side: str, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if self.targets is None:
            return None
        return {key.split(".", 1)[1]: value[index] for key, value in self.targets.items() if key.startswith(side)}


def cache_dir() -> Path:
    return Path(os.environ.get("SPATIALSCORE_CACHE", Path.home() / ".cache" / "spatialscore"))


def _one(job) -> tuple[dict[str, np.ndarray], str, list[str]]:
    from spatialscore.data.pairs import PairSpec, make_pair
    from spatialscore.data.scene import Scene
    from spatialscore.data.targets import cell_targets, relation_targets

    index, spec, grid = job
    weights = tuple((tag, weight) for tag, weight in spec["tag_weights"])
    record, chosen, rejected = make_pair(index, PairSpec(**{**spec, "tag_weights": weights}))
    arrays = {"chosen": np.asarray(chosen), "rejected": np.asarray(rejected)}
    relations = relation_targets(record["meta"]) if grid else None  # the prompt's, the same for both images
    for side in ("chosen", "rejected") if grid else ():
        for key, value in cell_targets(Scene.from_dict(record["meta"]["scenes"][side]), grid, record["meta"]).items():
            arrays[f"{side}.{key}"] = value
        arrays[f"{side}.relations"] = relations
    return arrays, record["prompt"], record["perturbation"]["kinds"]


def _cached(base: Path, fn, jobs: list, desc: str, unit: str, workers: int | None, progress: bool,
            sidecar) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run `fn` over `jobs` in a process pool once and keep the result under `base`: each row is (arrays, ...), the
    arrays are stacked into .npy files and `sidecar(rows)` becomes meta.json. Written under a temporary name and
    renamed, so concurrent processes and crashes never leave half a cache."""
    if not (base / "meta.json").is_file():
        with mp.get_context("fork").Pool(workers or min(os.cpu_count() or 1, 8)) as pool:
            rows = list(tqdm(pool.imap(fn, jobs, chunksize=32), total=len(jobs), desc=desc, unit=unit,
                             disable=not progress))
        tmp = base.with_name(f".{base.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name in rows[0][0]:
            np.save(tmp / f"{name}.npy", np.stack([r[0][name] for r in rows]))
        (tmp / "meta.json").write_text(json.dumps({**sidecar(rows), "arrays": list(rows[0][0])}))
        try:
            os.replace(tmp, base)
        except OSError:  # another process finished the same cache first
            pass
    meta = json.loads((base / "meta.json").read_text())
    return meta, {name: torch.from_numpy(np.load(base / f"{name}.npy")) for name in meta["arrays"]}


def _captioned_scene(index: int, spec: dict):
    """(scene, prompt metadata) of training image `index`: depends only on (spec, index)."""
    from spatialscore.data.prompts import PromptWriter
    from spatialscore.data.scene import sample_scene

    rng = random.Random(f"captions-{spec['seed']}-{index}")
    writer = PromptWriter(rng, spec["phrasing"])
    while True:
        meta = writer.sample(spec["style"], dict(spec["tag_weights"]))
        try:
            return sample_scene(meta, rng, tries=50, scale=spec.get("object_scale", 1.0),
                                composition=spec.get("composition", "free")), meta
        except SpatialScoreError:  # too crowded to place with clear margins: take the next prompt
            continue


def _captioned(job) -> tuple[dict[str, np.ndarray], dict]:
    from spatialscore.data.render import render

    index, spec = job
    scene, meta = _captioned_scene(index, spec)
    return {"images": np.asarray(render(scene, spec["image_size"]))}, meta


def _captioned_labels(job) -> tuple[dict[str, np.ndarray], None]:
    from spatialscore.data.render import render_labels

    index, spec = job
    scene, _ = _captioned_scene(index, spec)
    return {"labels": render_labels(scene, spec["image_size"])}, None


def _captioned_spec(seed: int, style: str, phrasing: str, image_size: int, tag_weights: dict[str, float] | None,
                    object_scale: float, composition: str = "free") -> dict:
    spec = {"seed": seed, "style": style, "phrasing": phrasing, "image_size": image_size,
            "tag_weights": sorted((tag_weights or {}).items())}
    if object_scale != 1.0:
        spec["object_scale"] = object_scale
    if composition != "free":  # absent by default: the caches made before this option stay valid
        spec["composition"] = composition
    return spec


def captioned_images(n: int, seed: int, style: str, phrasing: str, image_size: int,
                     tag_weights: dict[str, float] | None = None, workers: int | None = None,
                     progress: bool = True, object_scale: float = 1.0,
                     composition: str = "free") -> tuple[torch.Tensor, list[dict]]:
    """n faithful shapes-world images (uint8 [N, H, W, 3], cached) and their prompt metadata: a generator's
    training set (`object_scale` multiplies the objects' sizes; `composition`: scene.sample_scene's)."""
    spec = _captioned_spec(seed, style, phrasing, image_size, tag_weights, object_scale, composition)
    key = hashlib.sha256(json.dumps({**spec, "n": n, "what": "captions", "version": 1}, sort_keys=True).encode())
    meta, arrays = _cached(cache_dir() / f"captions-{key.hexdigest()[:16]}", _captioned,
                           [(i, spec) for i in range(n)], "shapes images", "image", workers, progress,
                           lambda rows: {"records": [r[1] for r in rows]})
    return arrays["images"], meta["records"]


def captioned_labels(n: int, seed: int, style: str, phrasing: str, image_size: int,
                     tag_weights: dict[str, float] | None = None, workers: int | None = None,
                     progress: bool = True, object_scale: float = 1.0, composition: str = "free") -> torch.Tensor:
    """The class maps (uint8 [N, 2, H, W]: shape, colour; render.render_labels) of exactly the scenes
    `captioned_images` draws for the same arguments, cached."""
    spec = _captioned_spec(seed, style, phrasing, image_size, tag_weights, object_scale, composition)
    key = hashlib.sha256(json.dumps({**spec, "n": n, "what": "caption-labels", "version": 1},
                                    sort_keys=True).encode())
    _, arrays = _cached(cache_dir() / f"labels-{key.hexdigest()[:16]}", _captioned_labels,
                        [(i, spec) for i in range(n)], "shapes class maps", "image", workers, progress,
                        lambda rows: {})
    return arrays["labels"]


def generated_pairs(n: int, seed: int, style: str, phrasing: str, image_size: int, target_grid: int = 0,
                    tag_weights: dict[str, float] | None = None, workers: int | None = None,
                    progress: bool = True, rough: float = 0.0, object_scale: float = 1.0) -> PairTensors:
    """n shapes-world pairs (cached); with target_grid > 0 also the dense cell targets of both images; `rough`: the
    share of pairs drawn by the rough renderer (data/augment.py); `object_scale` multiplies the objects' sizes."""
    spec = {"seed": seed, "style": style, "phrasing": phrasing, "image_size": image_size,
            "tag_weights": sorted((tag_weights or {}).items())}
    if rough:
        spec["rough"] = rough  # absent when 0, so the caches of clean pairs keep their keys
    if object_scale != 1.0:
        spec["object_scale"] = object_scale  # likewise absent at 1
    key = hashlib.sha256(json.dumps({**spec, "n": n, "grid": target_grid, "version": 6}, sort_keys=True).encode())
    base = cache_dir() / f"pairs-{key.hexdigest()[:16]}"
    jobs = [(i, spec, target_grid) for i in range(n)]
    meta, arrays = _cached(base, _one, jobs, "shapes pairs", "pair", workers, progress,
                           lambda rows: {"prompts": [r[1] for r in rows], "kinds": [r[2] for r in rows]})
    chosen, rejected = arrays.pop("chosen"), arrays.pop("rejected")
    return PairTensors(chosen, rejected, meta["prompts"], meta["kinds"], arrays or None)


def file_pairs(path: str | Path, image_size: int, on_error: str = "raise") -> PairTensors:
    from spatialscore.data.formats import load_pairs

    records = load_pairs(path, on_error=on_error)
    if not records:
        raise SpatialScoreError(f"{path}: no pairs to train or evaluate on")

    def array(image: Image.Image) -> np.ndarray:
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(image.convert("RGB"))

    return PairTensors(torch.from_numpy(np.stack([array(r.chosen) for r in records])),
                       torch.from_numpy(np.stack([array(r.rejected) for r in records])),
                       [r.prompt for r in records], [(r.perturbation or {}).get("kinds", []) for r in records],
                       meta=[r.meta or {} for r in records])
