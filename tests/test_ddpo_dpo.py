"""DDPO (DDIM UNets) and Diffusion-DPO (UNets and flows) at tiny size: the maths, on-policy consistency, learning
direction, exact resume, errors."""

from __future__ import annotations

import colorsys
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spatialscore.cli import main
from spatialscore.config import DdpoConfig, DpoConfig, load_config
from spatialscore.errors import SpatialScoreError
from spatialscore.train.ddpo import PerPromptStats, train_ddpo
from spatialscore.train.diffusion_dpo import dpo_loss, train_dpo


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPATIALSCORE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_dpo_loss_by_hand():
    loss, inside = dpo_loss(torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.5]), torch.tensor([0.3, 0.5]),
                            torch.tensor([0.3, 0.4]), beta=10.0)
    # pair 0: the model's chosen-minus-rejected error is -0.2 against the reference's 0 -> inside = +1
    # pair 1: 0 against the reference's +0.1 -> inside = +0.5
    assert torch.allclose(inside, torch.tensor([1.0, 0.5]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    same, inside0 = dpo_loss(*(torch.tensor([0.3]),) * 4, beta=5.0)
    assert inside0.item() == 0 and same.item() == pytest.approx(math.log(2))


def test_per_prompt_statistics_take_over_from_the_batch_once_a_prompt_has_enough_history():
    stats = PerPromptStats(buffer_size=4, min_count=3)
    finite = torch.ones(4, dtype=torch.bool)
    first = stats.advantages(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 30.0]), finite)
    batch = torch.tensor([1.0, 3.0, 10.0, 30.0])
    assert torch.allclose(first, (batch - batch.mean()) / batch.std(unbiased=False), atol=1e-5)
    second = stats.advantages(["a", "b"], torch.tensor([2.0, 20.0]), torch.ones(2, dtype=torch.bool))
    # both prompts now hold 3 rewards: each is standardised by its own history
    a, b = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([10.0, 30.0, 20.0])
    assert second[0].item() == pytest.approx(((2 - a.mean()) / a.std(unbiased=False)).item(), abs=1e-4)
    assert second[1].item() == pytest.approx(((20 - b.mean()) / b.std(unbiased=False)).item(), abs=1e-4)
    restored = PerPromptStats(4, 3)
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert restored.buffers.keys() == stats.buffers.keys()
    assert all(list(restored.buffers[k]) == list(stats.buffers[k]) for k in stats.buffers)
    nan = stats.advantages(["c", "c"], torch.tensor([float("nan"), 1.0]), torch.tensor([False, True]))
    assert list(stats.buffers["c"]) == [1.0] and torch.isfinite(nan[1])


DDPO = ["model.tiny=sd15", "model.image_size=32", "reward.heads={oracle: 1.0}", "prompts.eval_n=2",
        "sample.steps=3", "sample.group_size=4", "sample.prompts_per_iter=2", "sample.eval_steps=2",
        "train.micro_batch=4", "train.eval_every=100", "train.min_count=2"]


def test_ddpo_trains_every_sampled_step_on_policy_and_resumes_exactly(tmp_path):
    overrides = [*DDPO, "train.iterations=3", "train.save_every=1", "train.lr=0.01", "train.clip_range=0.2"]
    result = train_ddpo(load_config(DdpoConfig, None, overrides), tmp_path / "full", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2, 3] and result["world_size"] == 1
    for row in rows:
        assert sorted(row["timesteps"]) == [0, 1, 2] and row["trained_samples"] == 8  # no top-k in DDPO
        assert row["first_step_ratio_dev"] < 1e-4
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["algorithm_state"]["buffers"]  # the per-prompt statistics are checkpointed
    train_ddpo(load_config(DdpoConfig, None, [*overrides, "train.iterations=1"]), tmp_path / "cut", progress=False)
    train_ddpo(load_config(DdpoConfig, None, overrides), tmp_path / "cut", resume=str(tmp_path / "cut"),
               progress=False)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-3" / "lora.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-3" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "final" / "pipeline" / "unet").is_dir()


DPO = ["model.tiny=shapes_flow", "data.n_train=8", "prompts.eval_n=2", "sample.eval_steps=2", "train.batch_size=4",
       "train.lr=0.01", "train.beta=50", "train.eval_every=1000"]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpo_moves_the_model_towards_the_chosen_images(tmp_path, shift):
    """Also at the shapes base's time shift (train.time_shift: 3 weighs the high-noise steps); a shift <= 0 is
    refused."""
    train_dpo(load_config(DpoConfig, None, [*DPO, "train.steps=30", "train.save_every=1000",
                                            f"train.time_shift={shift}"]), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    first, last = rows[0], rows[-1]
    assert first["margin"] == pytest.approx(0.0, abs=1e-6)  # the LoRA starts as the identity: model == reference
    late = [r["margin"] for r in rows[-10:]]
    assert sum(late) / len(late) > 0.05 and sum(r["loss"] for r in rows[-10:]) / 10 < math.log(2) - 0.01
    assert (tmp_path / "run" / "final" / "pipeline" / "model_index.json").is_file()
    assert last["implicit_accuracy"] >= 0.5
    with pytest.raises(SpatialScoreError, match="time_shift > 0"):
        load_config(DpoConfig, None, [*DPO, "train.time_shift=0"])


def test_dpo_pairs_are_drawn_at_the_bases_object_scale(tmp_path, monkeypatch):
    """data.object_scale draws the generated pairs' objects that much larger (a base trained on 1.5x objects is
    tuned on what it draws), cached apart from the world-size pairs."""
    from spatialscore.train.diffusion_dpo import load_pairs

    monkeypatch.setenv("SPATIALSCORE_CACHE", str(tmp_path))
    ink = {}
    for scale in (1.0, 1.5):
        cfg = load_config(DpoConfig, None, [*DPO, "data.n_train=24", f"data.object_scale={scale}"])
        pairs = load_pairs(cfg, 64, progress=False)
        assert pairs.chosen.shape[0] == 24
        ink[scale] = pairs

    def covered(images):  # share of pixels that differ from the image's corner (background) colour
        images = torch.as_tensor(np.asarray(images)).float()
        return (images != images[:, :1, :1]).any(-1).float().mean().item()
    assert covered(ink[1.5].chosen) > 1.8 * covered(ink[1.0].chosen)
    assert len(list(tmp_path.glob("pairs-*"))) == 2
    with pytest.raises(SpatialScoreError, match="data.object_scale"):
        load_config(DpoConfig, None, [*DPO, "data.object_scale=3"])


@pytest.mark.parametrize("arch", ["shapes_flow", "sd15"])
def test_dpo_resume_is_exact(tmp_path, arch):
    overrides = [*DPO, f"model.tiny={arch}", "model.image_size=32", "train.steps=4", "train.save_every=2"]
    train_dpo(load_config(DpoConfig, None, overrides), tmp_path / "full", progress=False)
    train_dpo(load_config(DpoConfig, None, [*overrides, "train.steps=2"]), tmp_path / "cut", progress=False)
    train_dpo(load_config(DpoConfig, None, overrides), tmp_path / "cut", resume=str(tmp_path / "cut"), progress=False)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / "lora.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-4" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


def test_bad_input_gives_clear_errors_and_leaves_nothing(tmp_path, capsys):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("kind: dpo\nmodel: {tiny: shapes_flow}\n")
    out = tmp_path / "out"
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("")
    assert main(["train-dpo", str(recipe), f"data.train={empty}", "--out", str(out)]) == 2
    assert "pairs.jsonl" in capsys.readouterr().err
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    ddpo = tmp_path / "ddpo.yaml"
    ddpo.write_text(f"kind: ddpo\nmodel: {{pipeline: {flux}}}\nreward: {{heads: {{oracle: 1.0}}}}\n")
    assert main(["train-ddpo", str(ddpo), "--out", str(out)]) == 2
    assert "FluxPipeline" in capsys.readouterr().err
    with pytest.raises(SpatialScoreError, match="top-k filtering is Flow-GRPO's"):
        load_config(DdpoConfig, None, [*DDPO, "train.top_k=2"])
    assert not out.exists()


GENERATOR = ["data.n_train=16", "data.eval_n=2", "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
             "train.sample_steps=2", "model.image_size=32", "model.layers=1", "model.heads=2", "model.head_dim=16",
             "model.text_dim=32", "model.text_layers=1"]


@pytest.mark.parametrize("space", ["pixels", "latents", "unet", "layout", "text"])
def test_base_generator_training_resumes_exactly(tmp_path, space):
    from spatialscore.config import GeneratorConfig
    from spatialscore.models.generators import FLOW_PIPELINES, UNET_PIPELINES, latent_shape, load_pipeline_dir
    from spatialscore.train.generator import prompt_gain, train_generator

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    recipe = root / ("base_unet.yaml" if space == "unet" else "base_flow.yaml")
    latents = ["model.latent_factor=4", "model.patch_size=2", "model.ae_width=8", "train.ae_steps=3"]
    space_overrides = {"latents": latents, "layout": [*latents, "train.layout_weight=0.5", "train.foreground_weight=5",
                                                         "train.shape_weight=1", "train.colour_weight=1",
                                                         "train.shape_reader_steps=3"],
                       "text": [*latents, "train.text_pretrain_steps=3", "train.text_lr_scale=0"],
                       "pixels": ["model.latent_factor=0", "model.patch_size=8", "model.prediction=x"],
                       "unet": ["model.ae_width=8", "model.unet_width=16", "train.ae_steps=3"]}[space]
    cfg = load_config(GeneratorConfig, recipe, [*GENERATOR, "train.steps=6", *space_overrides])
    train_generator(cfg, tmp_path / "full", progress=False)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    result = train_generator(cfg, tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoints" / "step-4"),
                             progress=False)
    assert result["step"] == 6
    name = f"final/{'unet' if space == 'unet' else 'transformer'}/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "resumed" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = UNET_PIPELINES if space == "unet" else FLOW_PIPELINES
    pipe = load_pipeline_dir(tmp_path / "resumed" / "final", "model.pipeline", kinds, "test")
    assert (pipe.vae is not None) == (space != "pixels")
    if space != "pixels":  # the autoencoder was trained once, by the first run, and its normalisation travels
        assert pipe.vae.config.scaling_factor != 1.0 and (tmp_path / "resumed" / "autoencoder" / "stats.json").is_file()
        assert latent_shape(pipe) == (8, 8, 8)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(math.isfinite(r["prompt_gain"]) for r in rows)
    assert all(math.isfinite(r["shape_word_gain"]) and math.isfinite(r["shape_word_gain_high"]) for r in rows)
    if space == "layout":  # the training-only layout head and shape reader are logged, never saved with the pipeline
        assert all(math.isfinite(r["layout_loss"]) and r["layout_loss"] > 0 for r in rows)
        assert all(math.isfinite(r["shape_loss"]) and 0 <= r["colour_reader_accuracy"] <= 1 for r in rows)
        assert not any(k.startswith("net.") for k in a)
    else:
        assert not any("layout_loss" in r for r in rows)
    x0 = torch.randn(3, *latent_shape(pipe))
    assert prompt_gain(pipe, x0, ["a red circle"] * 3) == 0.0  # rolling identical prompts changes nothing
    assert prompt_gain(pipe, x0, ["a red circle", "two blue stars", "a green square"]) != 0.0


def test_a_base_can_reuse_another_bases_autoencoder(tmp_path):
    from spatialscore.config import GeneratorConfig
    from spatialscore.errors import SpatialScoreError
    from spatialscore.train.generator import train_generator

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    small = [*GENERATOR, "train.steps=2", "model.ae_width=8", "train.ae_steps=2"]
    flow = load_config(GeneratorConfig, root / "base_flow.yaml", [*small, "model.patch_size=2"])
    train_generator(flow, tmp_path / "flow", progress=False)
    vae = tmp_path / "flow" / "final" / "vae"
    unet = load_config(GeneratorConfig, root / "base_unet.yaml", [*small, "model.unet_width=16",
                                                                  f"model.autoencoder={vae}"])
    train_generator(unet, tmp_path / "unet", progress=False)
    a = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "unet" / "final" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # reused, not retrained
    assert not (tmp_path / "unet" / "autoencoder").exists()
    bad = load_config(GeneratorConfig, root / "base_unet.yaml", [*small, f"model.autoencoder={tmp_path}"])
    with pytest.raises(SpatialScoreError, match="model.autoencoder: .* not an AutoencoderKL directory"):
        train_generator(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_base_can_warm_start_from_a_saved_base(tmp_path):
    from spatialscore.config import GeneratorConfig
    from spatialscore.errors import SpatialScoreError
    from spatialscore.models.generators import FLOW_PIPELINES, load_pipeline_dir
    from spatialscore.train.generator import _warm_start, build_pipeline, train_generator

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    small = [*GENERATOR, "train.steps=2", "model.ae_width=8", "train.ae_steps=2", "model.patch_size=2"]
    train_generator(load_config(GeneratorConfig, root / "base_flow.yaml", small), tmp_path / "first", progress=False)
    saved = tmp_path / "first" / "final"
    cfg = load_config(GeneratorConfig, root / "base_flow.yaml", [*small, f"model.init={saved}"])
    init = load_pipeline_dir(saved, "model.init", FLOW_PIPELINES, "test")
    pipe = build_pipeline(cfg)
    _warm_start(pipe, init, cfg)
    for name in ("transformer", "text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(init, name).state_dict()
        assert all(torch.equal(a[k], b[k].float()) for k in a), name
    assert pipe.vae.config.scaling_factor == init.vae.config.scaling_factor != 1.0
    result = train_generator(cfg, tmp_path / "second", progress=False)
    assert result["init"] == str(saved) and not (tmp_path / "second" / "autoencoder").exists()  # no stage 1
    vae = "final/vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(saved / vae.split("/", 1)[1])), load_file(str(tmp_path / "second" / vae))
    assert all(torch.equal(a[k], b[k]) for k in a)
    wider = load_config(GeneratorConfig, root / "base_flow.yaml", [*small, "model.layers=2", f"model.init={saved}"])
    with pytest.raises(SpatialScoreError, match="model.init: .* transformer does not match"):
        train_generator(wider, tmp_path / "wider", progress=False)
    assert not (tmp_path / "wider").exists()
    with pytest.raises(SpatialScoreError, match="model.init"):
        train_generator(load_config(GeneratorConfig, root / "base_flow.yaml", [*small, f"model.init={tmp_path}"]),
                        tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SpatialScoreError, match="drop model.autoencoder"):
        load_config(GeneratorConfig, root / "base_flow.yaml", [*small, f"model.init={saved}",
                                                               f"model.autoencoder={saved / 'vae'}"])


def test_the_layout_loss_is_an_option_of_transformer_bases_only():
    from spatialscore.config import GeneratorConfig

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    with pytest.raises(SpatialScoreError, match="train.layout_weight.*shapes_unet"):
        load_config(GeneratorConfig, root / "base_unet.yaml", ["train.layout_weight=0.5"])
    with pytest.raises(SpatialScoreError, match="train.layout_weight must be >= 0"):
        load_config(GeneratorConfig, root / "base_flow.yaml", ["train.layout_weight=-1"])
    assert load_config(GeneratorConfig, root / "base_flow.yaml", ["train.layout_weight=0.5"]).train.layout_weight == 0.5


def test_caption_targets_name_entities_relations_and_counts():
    from spatialscore.data.vocab import COLORS, MAX_COUNT, RELATIONS, SHAPES
    from spatialscore.train.generator import caption_targets

    record = {"prompt": "a red circle left of two squares", "include": [
        {"class": "square", "count": 2}, {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]}
    row = caption_targets([record])[0]
    classes, colours = len(SHAPES) + 1, len(COLORS) + 1
    entity, relation = classes * colours, len(RELATIONS) * classes ** 2
    assert row.shape == (entity + relation + classes * (MAX_COUNT + 1),) and row.sum() == 5
    square, circle = SHAPES.index("square"), SHAPES.index("circle")
    assert row[square * colours + len(COLORS)] == 1  # a square of no named colour
    assert row[circle * colours + list(COLORS).index("red")] == 1
    assert row[entity + (RELATIONS.index("left of") * classes + circle) * classes + square] == 1
    assert row[entity + relation + square * (MAX_COUNT + 1) + 2] == 1
    assert row[entity + relation + circle * (MAX_COUNT + 1) + 1] == 1


def test_text_pretraining_tells_the_shapes_apart():
    from spatialscore.config import GeneratorConfig
    from spatialscore.train.generator import build_pipeline, pretrain_text_encoder

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    cfg = load_config(GeneratorConfig, root / "base_flow.yaml",
                      ["model.text_dim=32", "model.text_layers=1", "train.text_pretrain_steps=400"])
    pipe = build_pipeline(cfg)
    shapes = ["circle", "square", "triangle", "star"]
    records = [{"prompt": f"a {c} {s}", "include": [{"class": s, "count": 1, "color": c}]}
               for s in shapes for c in ("red", "blue")]

    def pooled_similarity():
        with torch.no_grad():
            pooled = torch.nn.functional.normalize(pipe.encode_prompt([f"a red {s}" for s in shapes])[1], dim=-1)
        return (pooled @ pooled.T)[~torch.eye(4, dtype=torch.bool)].max().item()

    before = pooled_similarity()
    stats = pretrain_text_encoder(pipe, records, cfg, progress=False)
    assert stats["text_exact"] == 1.0  # every caption's content is read back from its pooled embedding
    assert pooled_similarity() < min(before, 0.95)


@pytest.mark.parametrize("arch", ["base_flow", "base_unet"])
def test_wide_word_embeddings_keep_the_shape_words_apart(arch):
    """model.text_embed_std: at CLIP's own 0.02 a fresh encoder's states for two shape words are nearly the same
    vector, at 1.0 the words are near orthogonal from the first step."""
    from spatialscore.config import GeneratorConfig
    from spatialscore.train.generator import build_pipeline

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"

    def shape_word_similarity(std: float) -> float:
        pipe = build_pipeline(load_config(GeneratorConfig, root / f"{arch}.yaml", [f"model.text_embed_std={std}"]))
        batch = pipe.tokenizer(["a photo of a blue circle", "a photo of a blue square"], padding="max_length",
                               max_length=32, return_tensors="pt")
        with torch.no_grad():
            states = pipe.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return torch.nn.functional.cosine_similarity(states[0, 5], states[1, 5], dim=0).item()

    assert shape_word_similarity(0.0) > 0.8 and shape_word_similarity(1.0) < 0.3
    with pytest.raises(SpatialScoreError, match="model.text_embed_std must be >= 0"):
        load_config(GeneratorConfig, root / f"{arch}.yaml", ["model.text_embed_std=-1"])


def test_shape_word_pairs_differ_only_in_the_shape_and_the_gain_measures_the_words():
    from spatialscore.models.generators import load_pipeline_dir
    from spatialscore.train.generator import encode_dataset, shape_word_gain, shape_word_pairs

    images, prompts = shape_word_pairs(6, seed=1, image_size=64, object_scale=1.5)
    assert images.shape == (12, 64, 64, 3) and len(prompts) == 12
    for i in range(0, 12, 2):
        a, b = prompts[i].split(), prompts[i + 1].split()
        assert a[:-1] == b[:-1] and a[-1] != b[-1]  # the same colour, another shape word
        pixels = [im.reshape(-1, 3).numpy() for im in images[i:i + 2]]
        shades = [np.unique(p[(p != p[0]).any(1)], axis=0, return_counts=True) for p in pixels]  # p[0]: background
        main = [tuple(values[counts.argmax()]) for values, counts in shades]
        assert main[0] == main[1] and (images[i] != images[i + 1]).any()  # the same shade, another outline
    assert torch.equal(shape_word_pairs(6, seed=1, image_size=64, object_scale=1.5)[0], images)

    root = Path(__file__).resolve().parents[1] / "data" / "generators" / "shapes-flow"
    pipe = load_pipeline_dir(root, "pipeline", ("ShapesFlowPipeline",), "test")
    latents = encode_dataset(pipe, images)
    same = list(prompts)
    same[1::2] = same[0::2]
    assert shape_word_gain(pipe, latents, same) == 0.0  # the same words: the same estimate
    gain = shape_word_gain(pipe, latents, prompts)
    assert shape_word_gain(pipe, latents, same, noise_level=0.85) == 0.0
    assert 0.0 < gain < 1.0


def test_the_layout_loss_noise_floor_is_checked():
    from spatialscore.config import GeneratorConfig

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    for bad in ("-0.1", "1.0"):
        with pytest.raises(SpatialScoreError, match=r"train.layout_min_sigma must be in \[0, 1\)"):
            load_config(GeneratorConfig, root / "base_flow.yaml", [f"train.layout_min_sigma={bad}"])


def test_foreground_cells_cover_the_objects_and_weight_the_loss():
    from spatialscore.config import GeneratorConfig
    from spatialscore.train.generator import _mse, foreground_cells, shape_word_pairs

    images, _ = shape_word_pairs(4, seed=2, image_size=64, object_scale=1.5)
    tight, grown = foreground_cells(images, 16, dilate=0), foreground_cells(images, 16, dilate=1)
    assert tight.shape == (8, 1, 16, 16) and tight.dtype == torch.bool
    for image, cells in zip(images, tight):  # a cell is marked exactly when one of its 4x4 pixels is not background
        object_pixels = (image.int() - image[0, 0].int()).abs().amax(-1) > 0.05 * 255  # beyond faint anti-aliasing
        differs = object_pixels.reshape(16, 4, 16, 4).any(3).any(1)
        assert torch.equal(cells[0], differs) and 0 < differs.sum() < 40
    assert (grown >= tight).all() and grown.sum() > tight.sum()
    shifted = torch.nn.functional.max_pool2d(tight.float(), 3, stride=1, padding=1) > 0
    assert torch.equal(grown, shifted)  # grown by one cell in every direction

    out, target = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    assert torch.allclose(_mse(out, target, torch.full((2, 1, 16, 16), 3.0)), _mse(out, target, None))
    only = torch.zeros(2, 1, 16, 16)
    only[:, :, 2:5, 7:9] = 1.0  # all the weight on a few cells: their error alone
    expected = (out - target)[:, :, 2:5, 7:9].pow(2).mean()
    assert torch.allclose(_mse(out, target, only), expected)
    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    with pytest.raises(SpatialScoreError, match="foreground_weight >= 1 and foreground_dilate >= 0"):
        load_config(GeneratorConfig, root / "base_flow.yaml", ["train.foreground_weight=0.5"])


def test_the_shape_reader_reads_the_outline_from_latents():
    import copy

    from spatialscore.config import GeneratorConfig
    from spatialscore.data.render import render, render_labels
    from spatialscore.data.scene import sample_scene
    from spatialscore.data.tensors import captioned_images, captioned_labels
    from spatialscore.models.generators import load_pipeline_dir
    from spatialscore.train.generator import encode_dataset, fit_shape_reader

    root = Path(__file__).resolve().parents[1]
    pipe = load_pipeline_dir(root / "data" / "generators" / "shapes-flow", "pipeline", ("ShapesFlowPipeline",), "test")
    cfg = load_config(GeneratorConfig, root / "recipes" / "shapes" / "base_flow.yaml",
                      ["data.n_train=1000", "train.shape_reader_steps=200", "train.shape_weight=1"])
    d = cfg.data
    args = (d.n_train, d.seed, d.style, d.phrasing, 64, d.tag_weights)
    images, _ = captioned_images(*args, progress=False, object_scale=d.object_scale)
    maps = captioned_labels(*args, progress=False, object_scale=d.object_scale)
    reader, stats = fit_shape_reader(encode_dataset(pipe, images), maps, cfg, progress=False)
    assert stats["shape_reader_accuracy"] > 0.8 and stats["colour_reader_accuracy"] > 0.9  # scenes it was not fitted on
    assert not any(p.requires_grad for p in reader.parameters())

    rng = random.Random(3)  # the same scene with another shape: the true outline reads better than the swapped one
    right, swapped = [], []
    for shape, other in [("circle", "square"), ("square", "triangle"), ("triangle", "star"), ("star", "circle")] * 2:
        meta = {"prompt": f"a red {shape}", "tag": "single_object",
                "include": [{"class": shape, "count": 1, "color": "red"}]}
        scene = sample_scene(meta, rng, scale=1.5)
        twin, recoloured = copy.deepcopy(scene), copy.deepcopy(scene)
        twin.objects[0].shape = other
        blue = sample_scene({**meta, "include": [{"class": shape, "count": 1, "color": "blue"}]}, rng, scale=1.5)
        recoloured.objects[0].color, recoloured.objects[0].rgb = "blue", blue.objects[0].rgb
        latents = encode_dataset(pipe, torch.from_numpy(np.stack([np.asarray(render(s, 64))
                                                                  for s in (scene, twin, recoloured)])))
        labels = torch.from_numpy(render_labels(scene, 64))[None].expand(3, -1, -1, -1)
        shape_ce, colour_ce = reader.loss(latents, labels)
        right.append(shape_ce[0].item())
        swapped.append(shape_ce[1].item())
        assert colour_ce[0] < colour_ce[2]  # the named colour reads better than another
    assert sum(r < s for r, s in zip(right, swapped)) >= 7, (right, swapped)


def test_the_shape_loss_is_an_option_of_transformer_bases_only():
    from spatialscore.config import GeneratorConfig

    root = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    for option in ("shape_weight", "colour_weight"):
        with pytest.raises(SpatialScoreError, match="train.shape_weight / colour_weight.*shapes_unet"):
            load_config(GeneratorConfig, root / "base_unet.yaml", [f"train.{option}=1"])
    with pytest.raises(SpatialScoreError, match="shape_min_sigma <= shape_max_sigma"):
        load_config(GeneratorConfig, root / "base_flow.yaml",
                    ["train.shape_min_sigma=0.9", "train.shape_max_sigma=0.5"])
    with pytest.raises(SpatialScoreError, match="shape_weight >= 0"):
        load_config(GeneratorConfig, root / "base_flow.yaml", ["train.shape_weight=-1"])


class _LayoutDrawer:
    """A stand-in denoiser whose clean estimate is a known layout: a square of the first colour and one of the second
    on either side of the axis the relation names, placed as the words ask (or, relation-blind, always the first at
    the lower coordinate), so relation_gain's answer is known."""

    latent_shape = (3, 32, 32)

    def __init__(self, follows: bool):
        self.follows = follows

    def encode_prompt(self, prompts):
        return list(prompts), None

    def to_images(self, latents):
        return latents

    def predict(self, latents, sigma, prompts, pooled):
        from spatialscore.data.vocab import COLORS

        clean = torch.ones(len(prompts), 3, 32, 32)
        for i, prompt in enumerate(prompts):
            words = prompt.split()
            first, second = (8, 24) if not self.follows or "left of" in prompt or "above" in prompt else (24, 8)
            for colour, at in ((words[1], first), (words[-2], second)):
                rgb = torch.tensor(colorsys.hsv_to_rgb(COLORS[colour][0] / 360, *COLORS[colour][1:])).view(3, 1, 1)
                y, x = (16, at) if "left of" in prompt or "right of" in prompt else (at, 16)
                clean[i, :, y - 3:y + 4, x - 3:x + 4] = rgb
        return (latents - clean) / sigma


def test_relation_gain_measures_whether_the_words_move_the_layout():
    """A denoiser that places the objects as the relation asks scores about the distance between its two places
    (16 of 31 pixel steps, twice: 1.03, less what neighbouring hues leak); a relation-blind one scores 0; a real tiny
    pipeline gives a finite value."""
    from spatialscore.models.generators import tiny_pipeline
    from spatialscore.train.generator import relation_gain

    assert relation_gain(_LayoutDrawer(follows=True), n=8) == pytest.approx(32 / 31, abs=0.08)  # hues leak a little
    assert relation_gain(_LayoutDrawer(follows=False), n=8) == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(relation_gain(tiny_pipeline("shapes_latent"), n=2, guidance_scale=2.0))


def test_a_t5_text_encoder_sees_the_whole_prompt_and_swaps_in_under_a_warm_started_base(tmp_path):
    """model.text_encoder=t5: a bidirectional encoder, so the subject's words already differ between "left of" and
    "right of" (CLIP's causal ones cannot); the pipeline saves and loads as a diffusers directory; a recipe that swaps
    the encoder kind warm-starts every other weight from a CLIP base, and only the flow arch takes it."""
    from spatialscore.config import GeneratorConfig
    from spatialscore.models.generators import load_pipeline_dir, shapes_flow_pipeline
    from spatialscore.train.generator import _warm_start, build_pipeline, train_generator

    prompts = ["a red circle left of a blue square", "a red circle right of a blue square"]
    subject = slice(0, 3)  # "a red circle"
    for kind, differs in (("clip", False), ("t5", True)):
        pipe = shapes_flow_pipeline(image_size=16, patch_size=4, layers=1, heads=2, head_dim=8, text_dim=32,
                                    text_layers=1, text_encoder=kind)
        states, pooled = pipe.encode_prompt(prompts)
        assert pooled.shape == (2, 32)
        assert bool((states[0, subject] - states[1, subject]).abs().max() > 1e-5) == differs, kind
    pipe.save_pretrained(tmp_path / "t5")
    loaded = load_pipeline_dir(tmp_path / "t5", "pipeline", ("ShapesFlowPipeline",), "test")
    assert type(loaded.text_encoder).__name__ == "T5EncoderModel"
    assert torch.allclose(loaded.encode_prompt(prompts)[1], pooled, atol=1e-6)

    tiny = [*GENERATOR, "train.steps=2"]
    train_generator(load_config(GeneratorConfig, None, tiny), tmp_path / "clip", progress=False)
    cfg = load_config(GeneratorConfig, None, [*tiny, "model.text_encoder=t5", "train.text_pretrain_steps=2",
                                              f"model.init={tmp_path / 'clip' / 'final'}"])
    base = load_pipeline_dir(tmp_path / "clip" / "final", "pipeline", ("ShapesFlowPipeline",), "test")
    swapped = build_pipeline(cfg)
    assert _warm_start(swapped, base, cfg)["text_encoder_swapped"] == "CLIPTextModelWithProjection"
    assert type(swapped.text_encoder).__name__ == "T5EncoderModel"
    for name, weight in base.transformer.state_dict().items():
        assert torch.equal(swapped.transformer.state_dict()[name], weight.float()), name
    cfg.train.save_every = 1  # a checkpoint holds T5's tied embedding weights
    result = train_generator(cfg, tmp_path / "swapped", progress=False)
    assert result["text_encoder_swapped"] == "CLIPTextModelWithProjection" and result["step"] == 2
    assert (tmp_path / "swapped" / "checkpoints" / "step-1" / "ema.safetensors").is_file()
    assert train_generator(cfg, tmp_path / "swapped", resume=str(tmp_path / "swapped"), progress=False)["step"] == 2
    with pytest.raises(SpatialScoreError, match="model.text_encoder"):
        load_config(GeneratorConfig, None, ["model.arch=shapes_unet", "model.text_encoder=t5"])


def test_the_shipped_unet_base_loads_and_samples_as_its_card_says():
    """data/generators/shapes-unet is an ordinary StableDiffusionPipeline directory: it loads in fp32 from its fp16
    files, samples 64 px images, reuses the flow base's autoencoder, and was trained by recipes/shapes/base_unet.yaml
    with the one override its card names."""
    import yaml

    from spatialscore.models.generators import UNET_PIPELINES, load_pipeline_dir

    root = Path(__file__).resolve().parents[1]
    zoo = root / "data" / "generators" / "shapes-unet"
    pipe = load_pipeline_dir(zoo, "model.pipeline", UNET_PIPELINES, "test")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.dtype == torch.float32
    assert sum(f.stat().st_size for f in zoo.rglob("*") if f.is_file()) < 20 * 2**20
    trained = yaml.safe_load((zoo / "training-config.yaml").read_text())
    recipe = yaml.safe_load((root / "recipes" / "shapes" / "base_unet.yaml").read_text())
    assert trained["model"].pop("autoencoder") == "data/generators/shapes-flow/vae"
    for section in ("model", "data", "train"):
        for key, value in recipe[section].items():
            assert trained[section][key] == value, (section, key)
    weights = Path("vae") / "diffusion_pytorch_model.safetensors"
    flow_vae, unet_vae = load_file(str(zoo.parent / "shapes-flow" / weights)), load_file(str(zoo / weights))
    assert flow_vae.keys() == unet_vae.keys() and all(torch.equal(flow_vae[k], unet_vae[k]) for k in flow_vae)
    rows = [json.loads(line) for line in (zoo / "training-metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == trained["train"]["steps"] == 3000 and rows[-1]["by_tag"]["single_object"] > 0.3
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle", "a blue square left of a green star"], num_inference_steps=4, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all() and images.std() > 0.01
