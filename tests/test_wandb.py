"""wandb: offline by default, the run named after its directory, the config recorded, the metrics logged, and a
resumed run continuing the same wandb run. Checked by reading the offline run's own `.wandb` file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from spatialscore.config import RewardConfig, load_config
from spatialscore.errors import SpatialScoreError
from spatialscore.train import reward_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "reward.yaml"
TINY = ["model.channels=16", "model.text_dim=32", "model.g_dim=32", "model.f_dim=32", "data.n_train=48",
        "data.n_val=16", "train.batch_size=8", "train.warmup=2", "train.eval_every=2", "train.save_every=2"]


def read_offline_run(path: Path) -> list:
    """The protobuf records of a wandb offline run file (`run-<id>.wandb`): a ':W&B' header, then LevelDB-style log
    records (crc32, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            break
        parts += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def _runs(out: Path) -> dict[Path, list]:
    return {p: read_offline_run(p) for p in sorted(out.glob("wandb/offline-run-*/run-*.wandb"))}


def test_offline_run_records_name_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from the config's default, not the env
    out = tmp_path / "reward-wandb"
    cfg = load_config(RewardConfig, RECIPE, [*TINY, "train.steps=4", "report_to=wandb", "wandb.tags=[tiny]"])
    reward_model.train_reward(cfg, out, progress=False)
    (path, records), = _runs(out).items()
    name = path.name
    ids = json.loads((out / "wandb-run.json").read_text())
    assert ids["mode"] == "offline" and name == f"run-{ids['id']}.wandb"
    run = next(r.run for r in records if r.HasField("run"))
    assert run.display_name == "reward-wandb" and run.project == "spatialscore" and list(run.tags) == ["tiny"]
    config = {item.key: json.loads(item.value_json) for r in records if r.HasField("config")
              for item in r.config.update}
    config |= {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["steps"] == 4 and config["launch"]["world_size"] == 1
    history = [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.HasField("history")]
    losses = [h["loss"] for h in history if "loss" in h]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [row["loss"] for row in logged if "loss" in row] and len(losses) == 4
    assert any("val_accuracy" in h for h in history)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    cfg = load_config(RewardConfig, RECIPE, [*TINY, "train.steps=2", "report_to=wandb"])
    reward_model.train_reward(cfg, out, progress=False)
    first = json.loads((out / "wandb-run.json").read_text())["id"]
    cfg = load_config(RewardConfig, RECIPE, [*TINY, "train.steps=4", "report_to=wandb"])
    reward_model.train_reward(cfg, out, resume=str(out), progress=False)
    assert json.loads((out / "wandb-run.json").read_text())["id"] == first
    runs = _runs(out)  # wandb writes a resumed offline run to a new folder, under the same run id
    assert {path.name for path in runs} == {f"run-{first}.wandb"} and len(runs) == 2
    steps = sorted({int(json.loads(item.value_json)) for records in runs.values() for r in records
                    if r.HasField("history") for item in r.history.item if ".".join(item.nested_key) == "_step"})
    assert steps[-1] == 4 and {1, 2, 3, 4} <= set(steps)


def test_bad_wandb_mode_names_the_field():
    with pytest.raises(SpatialScoreError, match=r"wandb.mode: 'live' is not one of offline, online, disabled"):
        load_config(RewardConfig, RECIPE, ["wandb.mode=live"])
