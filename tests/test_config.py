"""Typed configs: precedence, errors for people, and every shipped recipe loaded, validated and run tiny."""


import pytest

from spatialscore.config import (KINDS, DdpoConfig, DpoConfig, GeneratorConfig, GrpoConfig, PairsConfig,
                                 PromptsConfig, RewardConfig, find_recipe, list_recipes, load_config, save_config,
                                 schema_for)
from spatialscore.errors import SpatialScoreError


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: pairs\nn: 50\nseed: 3\n")
    assert load_config(PairsConfig).n == PairsConfig().n
    cfg = load_config(PairsConfig, recipe, ["seed=9"])
    assert (cfg.n, cfg.seed, cfg.style) == (50, 9, "mixed")


def test_unknown_key_names_it_with_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: pairs\nsede: 3\n")
    with pytest.raises(SpatialScoreError, match=r"r.yaml: unknown key 'sede' \(did you mean 'seed'\?\)"):
        load_config(PairsConfig, recipe)
    with pytest.raises(SpatialScoreError, match=r"override 'image_sise=64'.*did you mean 'image_size'"):
        load_config(PairsConfig, None, ["image_sise=64"])


def test_wrong_type_and_bad_values():
    with pytest.raises(SpatialScoreError, match=r"bad value for 'n'"):
        load_config(PairsConfig, None, ["n=many"])
    with pytest.raises(SpatialScoreError, match=r"style: 'tiny' is not one of"):
        load_config(PairsConfig, None, ["style=tiny"])
    with pytest.raises(SpatialScoreError, match=r"data.rough must be a share in \[0, 1\], got 1.5"):
        load_config(RewardConfig, None, ["data.rough=1.5"])


@pytest.mark.parametrize("bad", ["seed", "=3", "seed 3", "9x=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(SpatialScoreError, match=r"bad override .*expected key=value"):
        load_config(PairsConfig, None, [bad])


def test_bad_yaml_and_wrong_kind(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: pairs\nn: [1, 2\n")
    with pytest.raises(SpatialScoreError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(PairsConfig, broken)
    other = tmp_path / "other.yaml"
    other.write_text("kind: prompts\n")
    with pytest.raises(SpatialScoreError, match=r"takes a 'pairs' recipe"):
        load_config(PairsConfig, other)


def test_resolved_config_is_saved_and_reloads(tmp_path):
    cfg = load_config(PairsConfig, None, ["n=7"])
    path = save_config(cfg, tmp_path)
    assert load_config(PairsConfig, path) == cfg


@pytest.mark.parametrize("name", [r[0] for r in list_recipes()])
def test_every_shipped_recipe_validates_and_runs_tiny(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALSCORE_CACHE", str(tmp_path / "cache"))
    from spatialscore.data.pairs import PairSpec, make_pairs
    from spatialscore.data.prompts import make_prompts

    path = find_recipe(name)
    schema = schema_for(path)
    cfg = load_config(schema, path, ["n=2"] if schema in (PairsConfig, PromptsConfig) else [])
    if schema is PairsConfig:
        out = make_pairs(tmp_path, cfg.n, PairSpec(cfg.seed, cfg.style, cfg.phrasing, cfg.image_size, cfg.multi_prob),
                         workers=1, progress=False)
        assert len(out.read_text().splitlines()) == 2
    elif schema is PromptsConfig:
        assert len(make_prompts(cfg.n, cfg.seed, cfg.style, cfg.phrasing)) == 2
    elif schema is RewardConfig:
        from spatialscore.train.reward_model import train_reward

        # tiny scale: generated shapes pairs instead of the recipe's files, a tiny backbone instead of a 7B one
        tiny = ["data.train=null", "data.val=null", "data.n_train=16", "data.n_val=8", "train.steps=2",
                "train.batch_size=4", "train.grad_accum=1", "model.image_size=56", "model.head_hidden=16"]
        if cfg.model.arch == "qwen2_5_vl":
            tiny += ["model.pretrained=null", "model.tiny=true", "model.lora_r=4", "model.lora_alpha=8"]
        else:
            tiny += ["model.channels=16", "model.text_dim=32", "model.g_dim=32", "model.f_dim=32"]
        result = train_reward(load_config(schema, path, tiny), tmp_path / "run", progress=False)
        assert result["steps"] == 2 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    elif schema is GeneratorConfig:
        from spatialscore.train.generator import train_generator

        tiny = ["data.n_train=8", "data.eval_n=2", "train.steps=2", "train.batch_size=2", "train.eval_every=2",
                "train.sample_steps=2", "model.image_size=32", "model.layers=1", "model.heads=2", "model.head_dim=16",
                "model.text_dim=32", "model.text_layers=1"]
        if cfg.model.init:  # a continuation stage: a tiny first stage (base_flow) gives the weights it starts from
            first = find_recipe("shapes/base_flow")
            train_generator(load_config(schema, first, tiny + ["train.ae_steps=2"]), tmp_path / "stage1",
                            progress=False)
            tiny += [f"model.init={tmp_path / 'stage1' / 'final'}", "train.shape_reader_steps=2"]
        result = train_generator(load_config(schema, path, tiny), tmp_path / "run", progress=False)
        assert result["step"] == 2 and (tmp_path / "run" / "final" / "model_index.json").is_file()
    elif schema in (GrpoConfig, DdpoConfig):
        from spatialscore.train.ddpo import train_ddpo
        from spatialscore.train.flow_grpo import train_grpo

        arch = ("flux" if "flux" in name else "sd3" if "sd3" in name else "sd15" if schema is DdpoConfig
                else "shapes_flow")
        tiny = ["model.pipeline=null", f"model.tiny={arch}", "model.image_size=32", "model.precision=fp32",
                "prompts.file=null", "prompts.eval_file=null", "prompts.eval_n=2", "reward.heads={oracle: 1.0}",
                "reward.kwargs={}", "sample.prompts_per_iter=1", "sample.group_size=4", "sample.eval_steps=2",
                "sample.steps=2", "train.iterations=1", "train.eval_every=1"]
        if schema is GrpoConfig:
            tiny.append("train.top_k=1")
        train = train_grpo if schema is GrpoConfig else train_ddpo
        result = train(load_config(schema, path, tiny), tmp_path / "run", progress=False)
        assert result["final"]["iteration"] == 1
    elif schema is DpoConfig:
        from spatialscore.train.diffusion_dpo import train_dpo

        tiny = ["model.pipeline=null", "model.tiny=shapes_flow", "data.train=null", "data.n_train=8",
                "prompts.eval_n=2", "sample.eval_steps=2", "train.steps=1", "train.batch_size=2", "train.eval_every=1"]
        result = train_dpo(load_config(schema, path, tiny), tmp_path / "run", progress=False)
        assert result["final"]["step"] == 1
    else:
        pytest.fail(f"no tiny run for recipe kind {cfg.kind!r}: add one here")
    assert schema in KINDS.values()
