"""Flow-GRPO on tiny pipelines: on-policy consistency, the sampler against the pipeline, a run end to end, exact
resume, non-finite rewards, bad input."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spatialscore.config import GrpoConfig, load_config
from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead, RewardOutput, register_head
from spatialscore.models.generators import policy_for, tiny_pipeline
from spatialscore.train.flow_grpo import train_grpo
from spatialscore.train.policy_gradient import add_lora, sample_ode, sample_trajectories, step_log_prob

TINY = ["model.tiny=shapes_flow", "reward.heads={oracle: 1.0}", "prompts.eval_n=4", "sample.steps=4", "sample.group_size=4",
        "sample.prompts_per_iter=2", "train.top_k=1", "train.micro_batch=4", "train.eval_every=100"]


class _Brightness(RewardHead):
    """Mean brightness: a reward that differs between any two images, so every group has a signal."""

    def score(self, images, prompts, meta):
        return RewardOutput(images.mean(dim=(1, 2, 3)))


class _SometimesNaN(RewardHead):
    """Mean brightness, except NaN for every third image."""

    def score(self, images, prompts, meta):
        scores = images.mean(dim=(1, 2, 3))
        scores[::3] = float("nan")
        return RewardOutput(scores)


@pytest.fixture(autouse=True)
def test_heads():
    """Heads for these tests only: registered for each test and removed after, so the registry-wide head tests
    elsewhere never see them."""
    from spatialscore import heads

    heads.head_names()  # load the built-ins first
    added = {"test_brightness": _Brightness, "test_sometimes_nan": _SometimesNaN}
    for name, cls in added.items():
        register_head(name)(cls)
    yield
    for name in added:
        heads._REGISTRY.pop(name, None)


def _cfg(*overrides: str) -> GrpoConfig:
    return load_config(GrpoConfig, None, [*TINY, *overrides])


def _policy_with_lora(guidance: float = 1.0):
    cfg = _cfg()
    pipe = tiny_pipeline("shapes_flow")
    pipe.transformer.requires_grad_(False)
    peft = add_lora(pipe.transformer, cfg)
    with torch.no_grad():  # a LoRA that changes the policy, so policy and reference differ
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy = policy_for(pipe, guidance)
    policy.denoiser = peft
    return pipe, peft, policy


def test_lora_layers_puts_the_adapter_on_the_chosen_blocks_only():
    """model.lora_layers=[0] on FLUX: LoRA on transformer_blocks.0's target modules and not on
    single_transformer_blocks.0 (peft's layers_to_transform, the pattern anchored at a module boundary); an index
    the denoiser lacks, or a pattern that names no block, is refused with the field's name."""
    transformer = tiny_pipeline("flux").transformer
    everywhere = {n.split(".lora_")[0] for n, p in add_lora(copy.deepcopy(transformer), _cfg()).named_parameters()
                  if p.requires_grad}
    assert any(n.startswith("base_model.model.single_transformer_blocks.0.") for n in everywhere)
    adapted = {n.split(".lora_")[0] for n, p in add_lora(copy.deepcopy(transformer), _cfg("model.lora_layers=[0]"))
               .named_parameters() if p.requires_grad}
    assert adapted and adapted == {n for n in everywhere if n.startswith("base_model.model.transformer_blocks.0.")}
    with pytest.raises(SpatialScoreError, match=r"model.lora_layers: .* no block \[1\]"):
        add_lora(copy.deepcopy(transformer), _cfg("model.lora_layers=[0,1]"))
    with pytest.raises(SpatialScoreError, match="model.lora_layers_pattern"):
        add_lora(copy.deepcopy(transformer), _cfg("model.lora_layers=[0]", "model.lora_layers_pattern=down_blocks"))
    with pytest.raises(SpatialScoreError, match="model.lora_layers"):
        _cfg("model.lora_layers=[]")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_recomputed_step_log_probs_match_the_sampler_and_the_ratio_is_one(guidance):
    _, peft, policy = _policy_with_lora(guidance)
    prompts = ["a red circle to the left of a blue star", "a green square above a yellow triangle"] * 3
    cond = policy.encode(prompts)
    traj = sample_trajectories(policy, cond, steps=5, noise=0.7, generator=torch.Generator().manual_seed(0),
                               batch_size=4)
    assert traj.latents.shape[:2] == (6, 6) and traj.log_probs.shape == (6, 5)
    index = torch.tensor([5, 0, 3])  # another batch composition than sampling used
    sub = policy.select(cond, index)
    reference_gap = 0.0
    for j in range(5):  # every timestep
        lp, _, _ = step_log_prob(policy, traj.latents[index], j, traj.schedule, sub)
        # log-probs are means over the image's elements (as Flow-GRPO's), so they are compared tightly
        assert torch.allclose(lp, traj.log_probs[index, j], atol=1e-6, rtol=0)
        assert (torch.exp(lp - traj.log_probs[index, j]) - 1).abs().max() < 1e-4
        with peft.disable_adapter():  # the reference policy is really another policy
            lp_ref, _, _ = step_log_prob(policy, traj.latents[index], j, traj.schedule, sub)
        reference_gap = max(reference_gap, float((lp_ref - traj.log_probs[index, j]).abs().max()))
    assert reference_gap > 1e-5  # 100x the tolerance above


def test_a_group_can_share_its_initial_latent():
    """shared_start=G: the G images of a group start from one latent and part through the step noise only (their
    stored step log-probabilities still recompute); groups start apart; a batch that does not split into groups is
    refused."""
    _, _, policy = _policy_with_lora()
    cond = policy.encode(["a red circle to the left of a blue star"] * 3 + ["a green square above a yellow triangle"] * 3)
    traj = sample_trajectories(policy, cond, steps=3, noise=0.7, generator=torch.Generator().manual_seed(0),
                               batch_size=4, shared_start=3)
    start = traj.latents[:, 0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2]) and torch.equal(start[3], start[5])
    assert not torch.allclose(start[0], start[3])
    assert not torch.allclose(traj.latents[0, -1], traj.latents[1, -1])  # the step noise differs within a group
    lp, _, _ = step_log_prob(policy, traj.latents[[1, 4]], 0, traj.schedule, policy.select(cond, torch.tensor([1, 4])))
    assert torch.allclose(lp, traj.log_probs[[1, 4], 0], atol=1e-6, rtol=0)
    with pytest.raises(SpatialScoreError, match="groups of 4"):
        sample_trajectories(policy, cond, 2, 0.7, torch.Generator().manual_seed(0), shared_start=4)


def test_the_merged_final_pipeline_keeps_the_base_settings_and_predicts_as_the_lora_policy(tmp_path):
    """final/pipeline of a velocity-predicting shapes base (as the shipped one) still predicts velocities: saved
    without its `prediction` it came back as a clean-image predictor and sampled garbage."""
    from spatialscore.models.generators import load_flow_pipeline, shapes_flow_pipeline
    from spatialscore.train.policy_gradient import save_final

    pipe = shapes_flow_pipeline(image_size=32, patch_size=2, layers=1, heads=2, head_dim=16, text_dim=32,
                                text_layers=1, latent_factor=4, ae_width=8, prediction="v")
    pipe.transformer.requires_grad_(False)
    peft = add_lora(pipe.transformer, _cfg())
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_final(pipe, peft, _cfg(), tmp_path / "final")
    merged = load_flow_pipeline(tmp_path / "final" / "pipeline", "model.pipeline")
    assert merged.config.prediction == "v"
    embeds, pooled = pipe.encode_prompt(["a red circle left of a blue star"])
    x = torch.randn(1, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pipe.velocity(peft, x, torch.tensor(0.7), embeds, pooled)
        got = merged.predict(x, torch.tensor(0.7), embeds, pooled)
    assert torch.allclose(got, want, atol=1e-4)


def test_only_the_named_sde_steps_are_stochastic():
    """sde_steps=[0, 1] of 4: after step 1 a group sharing its initial latent follows the deterministic ODE (its
    images part only through the noise of steps 0 and 1), those steps' log-probabilities are 0 and the stochastic
    ones still recompute; the recipe refuses trained timesteps outside sample.sde_steps with the field's name."""
    _, _, policy = _policy_with_lora()
    cond = policy.encode(["a red circle to the left of a blue star"] * 2)
    traj = sample_trajectories(policy, cond, steps=4, noise=0.7, generator=torch.Generator().manual_seed(0),
                               shared_start=2, sde_steps=[0, 1])
    assert torch.equal(traj.log_probs[:, 2:], torch.zeros(2, 2)) and (traj.log_probs[:, :2] != 0).all()
    state = traj.latents[:, 2].clone()  # continue both images from their step-2 state with the ODE alone
    for i in (2, 3):
        state = traj.schedule.ode_step(i, state, policy.predict(state, traj.schedule.model_time(i), cond))
    assert torch.allclose(state, traj.latents[:, -1], atol=1e-5)
    assert not torch.allclose(traj.latents[0, -1], traj.latents[1, -1])  # the SDE steps did part them
    lp, _, _ = step_log_prob(policy, traj.latents, 1, traj.schedule, cond)
    assert torch.allclose(lp, traj.log_probs[:, 1], atol=1e-6, rtol=0)
    assert _cfg("sample.sde_steps=[0,1]", "train.timesteps=[0,1]").sample.sde_steps == [0, 1]
    with pytest.raises(SpatialScoreError, match=r"train.timesteps: \[2\] are deterministic steps"):
        _cfg("sample.sde_steps=[0,1]", "train.timesteps=[1,2]")
    with pytest.raises(SpatialScoreError, match="sample.sde_steps: also set train.timesteps"):
        _cfg("sample.sde_steps=[0]")
    with pytest.raises(SpatialScoreError, match=r"sample.sde_steps: 4 is not a step index"):
        _cfg("sample.sde_steps=[4]", "train.timesteps=[0]")


@pytest.mark.parametrize("arch,guidance", [("shapes_flow", 2.0), ("shapes_latent", 2.0), ("sd3", 2.0), ("flux", 3.5),
                                           ("sd15", 5.0)])
def test_the_policy_view_reproduces_the_pipeline_call(arch, guidance):
    """The deterministic sampler through our policy adapter (prompt encoding, schedule, guidance, packing, VAE) equals
    the pipeline's own call from the same noise (Euler for flows, DDIM eta 0 for SD1.5), so the stochastic sampler
    trains the model the pipeline runs; and every stored step's log-probability recomputes exactly."""
    pipe = tiny_pipeline(arch)
    pipe.set_progress_bar_config(disable=True)
    policy = policy_for(pipe, guidance)
    prompts = ["a red circle", "two blue stars"]
    noise = policy.initial_noise(2, torch.Generator().manual_seed(1))
    ours = sample_ode(policy, policy.encode(prompts), 5, noise)
    size = {} if arch.startswith("shapes") else {"height": policy.image_size, "width": policy.image_size}
    theirs = pipe(prompts, num_inference_steps=5, guidance_scale=guidance, latents=noise.clone(), output_type="pt",
                  **size).images
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)
    noise_level = 1.0 if arch == "sd15" else 0.7  # DDPO's eta, Flow-GRPO's SDE noise level
    traj = sample_trajectories(policy, policy.encode(prompts), 3, noise_level, torch.Generator().manual_seed(0))
    for j in range(3):
        lp, _, _ = step_log_prob(policy, traj.latents, j, traj.schedule, policy.encode(prompts))
        assert torch.allclose(lp, traj.log_probs[:, j], atol=1e-6, rtol=0)


@pytest.mark.parametrize("recipe,arch", [("paper/flow_grpo_flux", "flux"), ("paper/flow_grpo_sd3_5_medium", "sd3")])
def test_paper_recipes_run_two_iterations_on_tiny_models_of_their_architecture(tmp_path, recipe, arch):
    from spatialscore.config import RECIPES_DIR

    path = RECIPES_DIR / f"{recipe}.yaml"
    cfg = load_config(GrpoConfig, path)
    if arch == "flux":  # the paper's settings, as the issue states them
        assert (cfg.sample.group_size, cfg.train.top_k, cfg.model.lora_r, cfg.train.lr, cfg.train.clip_range,
                cfg.train.kl_beta, cfg.sample.steps) == (24, 6, 32, 3e-4, 1e-4, 0.01, 6)
    # same recipe, a tiny model of the same architecture, shapes prompts and the oracle instead of the local files
    cfg = load_config(GrpoConfig, path, [
        "model.pipeline=null", f"model.tiny={arch}", "model.image_size=32", "model.precision=fp32",
        "prompts.file=null", "prompts.eval_file=null", "prompts.eval_n=2", "reward.heads={oracle: 1.0}", "reward.kwargs={}",
        "sample.prompts_per_iter=1", "sample.eval_steps=2", "train.iterations=2", "train.eval_every=2"])
    result = train_grpo(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["trained_samples"] == 12 and r["first_step_ratio_dev"] < 1e-4 for r in rows)  # 6 best + 6 worst
    assert result["final"]["iteration"] == 2
    assert (tmp_path / "run" / "final" / "lora" / "adapter_model.safetensors").is_file()


def test_the_trainer_reports_ratio_one_on_the_first_inner_step_for_every_trained_timestep(tmp_path):
    result = train_grpo(_cfg("train.iterations=2", "train.timestep_fraction=1.0"),
                        tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert sorted(row["timesteps"]) == [0, 1, 2, 3]
        assert row["first_step_ratio_dev"] < 1e-4
        assert 0.0 <= row["oracle_train"] <= 1.0  # the oracle on the training samples (shapes-world prompts)
    assert result["world_size"] == 1 and result["base"]["iteration"] == 0
    assert (tmp_path / "run" / "final" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "run" / "final" / "lora" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "run" / "samples").glob("iter-*.png"))


def test_training_prompts_skip_the_evaluation_set_and_an_exhausted_tag_mix_is_refused():
    """Single-object prompts are few (a dozen): 200 evaluation prompts hold them all, and most colour prompts. The
    training draw still finds fresh prompts among the rest (it used to redraw the same all-held-out batch forever),
    and with nothing fresh left it stops with an error that names the settings instead of hanging."""
    from spatialscore.train.policy_gradient import PromptSource

    weights = ("prompts.tag_weights={{position: 0, single_object: 1, two_object: 0, counting: 0, colors: {c}, "
               "color_attr: 0}}")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("drawing training prompts hung"))
    signal.alarm(60)
    try:
        source = PromptSource(_cfg(weights.format(c=1), "prompts.eval_n=200"))
        for iteration in range(5):
            drawn = source.for_iteration(iteration, 8)
            assert len(drawn) == 8 and not {r["prompt"] for r in drawn} & source.held_out
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert drawn == PromptSource(_cfg(weights.format(c=1), "prompts.eval_n=200")).for_iteration(4, 8)  # reproducible
    with pytest.raises(SpatialScoreError, match=r"prompts.eval_n=200.*prompts.tag_weights"):
        PromptSource(_cfg(weights.format(c=0), "prompts.eval_n=200"))  # refused before any run directory exists


def _lora(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step}" / "lora.safetensors"))


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    overrides = ("train.iterations=3", "reward.heads={test_brightness: 1.0}", "train.save_every=1", "train.lr=0.01",
                 "train.clip_range=0.2")
    train_grpo(_cfg(*overrides), tmp_path / "full", progress=False)
    train_grpo(_cfg(*overrides[1:], "train.iterations=1"), tmp_path / "cut", progress=False)
    train_grpo(_cfg(*overrides), tmp_path / "cut", resume=str(tmp_path / "cut"), progress=False)
    full, resumed = _lora(tmp_path / "full", 3), _lora(tmp_path / "cut", 3)
    assert full.keys() == resumed.keys()
    assert any((v - _lora(tmp_path / "full", 1)[k]).abs().max() > 0 for k, v in full.items()), "LoRA never moved"
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_non_finite_rewards_drop_their_samples_and_are_counted(tmp_path):
    result = train_grpo(_cfg("train.iterations=1", "reward.heads={test_sometimes_nan: 1.0}"), tmp_path / "run",
                        progress=False)
    assert result["non_finite_rewards"] == 3  # 8 training images, every third NaN
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert row["non_finite_rewards"] == 3 and row["skipped_steps"] == 0


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SpatialScoreError, match="empty.jsonl"):
        train_grpo(_cfg(f"prompts.file={empty}"), tmp_path / "a", progress=False)
    with pytest.raises(SpatialScoreError, match="unknown reward head 'nope'"):
        train_grpo(_cfg("reward.heads={nope: 1.0}"), tmp_path / "b", progress=False)
    not_a_pipeline = tmp_path / "dir"
    not_a_pipeline.mkdir()
    with pytest.raises(SpatialScoreError, match="model_index.json"):
        train_grpo(load_config(GrpoConfig, None, [*TINY[1:], f"model.pipeline={not_a_pipeline}"]), tmp_path / "c",
                   progress=False)
    for name in "abc":
        assert not (tmp_path / name).exists()


# --- the CLI: SIGKILL and resume, two processes under DeepSpeed, errors --------------------------------------------

EXE = str(Path(sys.executable).parent / "spatialscore")
TINY_RECIPE = """kind: grpo
model: {tiny: shapes_flow}
reward: {heads: {test_brightness_cli: 1.0}}
prompts: {eval_n: 4}
sample: {steps: 3, group_size: 4, prompts_per_iter: 2, eval_steps: 2}
train: {top_k: 1, micro_batch: 4, eval_every: 100, lr: 0.01, clip_range: 0.2}
"""
PLUGIN = '''
from spatialscore.heads import RewardHead, RewardOutput, register_head

@register_head("test_brightness_cli")
class Brightness(RewardHead):
    def score(self, images, prompts, meta):
        return RewardOutput(images.mean(dim=(1, 2, 3)))
'''


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """A recipe file and a reward-head plugin module the subprocesses import (SPATIALSCORE_PLUGINS)."""
    (tmp_path / "brightness_plugin.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SPATIALSCORE_PLUGINS", "brightness_plugin")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    return recipe


def _final_lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "lora" / "adapter_model.safetensors"))


TINY_DDPO = """kind: ddpo
model: {tiny: sd15, image_size: 32}
reward: {heads: {test_brightness_cli: 1.0}}
prompts: {eval_n: 4}
sample: {steps: 3, group_size: 4, prompts_per_iter: 2, eval_steps: 2}
train: {micro_batch: 4, eval_every: 100, lr: 0.01, clip_range: 0.2, min_count: 2}
"""
TINY_DPO = """kind: dpo
model: {tiny: shapes_flow}
data: {n_train: 16}
prompts: {eval_n: 4}
sample: {eval_steps: 2}
train: {batch_size: 4, lr: 0.01, beta: 50, eval_every: 100}
"""
# verb, recipe, the key that counts training steps
TRAINERS = {"grpo": ("train-grpo", "tiny.yaml", "train.iterations"),
            "ddpo": ("train-ddpo", "ddpo.yaml", "train.iterations"),
            "dpo": ("train-dpo", "dpo.yaml", "train.steps")}


@pytest.fixture
def recipes(cli_env):
    (cli_env.parent / "ddpo.yaml").write_text(TINY_DDPO)
    (cli_env.parent / "dpo.yaml").write_text(TINY_DPO)
    return cli_env.parent


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, recipes, trainer):
    verb, recipe, steps = TRAINERS[trainer]
    args = [EXE, verb, str(recipes / recipe), f"{steps}=12", "train.save_every=2"]
    subprocess.run([*args, "--out", str(tmp_path / "straight")], check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "step-4" / "state.json").is_file() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed: make it longer"
    result = subprocess.run([*args, "--out", str(run), "--resume", str(run)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = _final_lora(tmp_path / "straight"), _final_lora(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "resumed_from" in line]
    assert starts[0]["resumed_from"] == 0 and starts[-1]["resumed_from"] >= 4


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_zero2_on_two_processes_runs_and_resumes_to_the_same_weights(tmp_path, recipes, trainer):
    verb, recipe, steps = TRAINERS[trainer]
    args = [EXE, verb, str(recipes / recipe), f"{steps}=4", "train.save_every=2", "--launch", "zero2", "--nproc", "2"]
    halfway = tmp_path / "straight" / "checkpoints" / "step-2"
    for name, extra in [("straight", []), ("resumed", ["--resume", str(halfway)])]:
        result = subprocess.run([*args, "--out", str(tmp_path / name), *extra], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2
    a, b = _final_lora(tmp_path / "straight"), _final_lora(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


def test_cli_refuses_bad_input_with_clear_errors_and_writes_nothing(tmp_path, capsys):
    from spatialscore.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("test_brightness_cli", "oracle"))
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train-grpo", str(recipe), f"prompts.file={empty}", "--out", str(out)]) == 2
    assert "empty.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"prompt": 3}\n')
    assert main(["train-grpo", str(recipe), f"prompts.file={bad}", "--out", str(out)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert main(["train-grpo", str(recipe), "reward.heads={spatialscorre: 1.0}", "--out", str(out)]) == 2
    assert "unknown reward head 'spatialscorre'" in capsys.readouterr().err
    unet = tmp_path / "sd15"
    unet.mkdir()
    (unet / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["train-grpo", str(recipe), "model.tiny=null", f"model.pipeline={unet}", "--out", str(out)]) == 2
    assert "StableDiffusionPipeline" in capsys.readouterr().err
    assert not out.exists()


def test_the_shipped_flow_base_loads_and_samples_as_its_card_says():
    """data/generators/shapes-flow is an ordinary diffusers directory of the recipe's architecture: it loads in fp32
    from its fp16 files, samples 64 px images, and its training config is the one its model card describes."""
    import yaml

    from spatialscore.models.generators import FLOW_PIPELINES, load_pipeline_dir

    zoo = Path(__file__).resolve().parents[1] / "data" / "generators" / "shapes-flow"
    pipe = load_pipeline_dir(zoo, "model.pipeline", FLOW_PIPELINES, "test")
    assert type(pipe).__name__ == "ShapesFlowPipeline" and pipe.transformer.dtype == torch.float32
    assert sum(f.stat().st_size for f in zoo.rglob("*") if f.is_file()) < 20 * 2**20
    stage1 = yaml.safe_load((zoo / "stage1-training-config.yaml").read_text())
    assert stage1["data"]["object_scale"] == 1.5 and stage1["train"]["steps"] == 6000
    rows = [json.loads(line) for line in (zoo / "stage1-training-metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6000 and rows[-1]["ae_oracle"] > 0.9
    # stage 2 continued stage 1 with the shape and colour reader's losses, as recipes/shapes/base_flow_continue.yaml
    trained = yaml.safe_load((zoo / "training-config.yaml").read_text())
    recipe = yaml.safe_load((zoo.parents[2] / "recipes" / "shapes" / "base_flow_continue.yaml").read_text())
    assert trained["model"]["init"] == recipe["model"]["init"] == "runs/base-flow/final"
    for key in ("steps", "shape_weight", "colour_weight", "lr", "batch_size"):
        assert trained["train"][key] == recipe["train"][key], key
    rows = [json.loads(line) for line in (zoo / "training-metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 18000 and rows[-1]["shape_word_gain"] > 0.1
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    images = pipe(["a red circle", "a blue square left of a green star"], num_inference_steps=4, latents=noise,
                  output_type="pt").images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all() and images.std() > 0.01
