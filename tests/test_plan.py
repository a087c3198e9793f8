"""The memory planner: its estimate of a shapes-world training step against the peak measured on the CPU, exact
parameter counts of the real architectures, the presets' sharding, and the CLI's errors."""

import json

import pytest

from spatialscore.cli import main
from spatialscore.plan import (GIB, PRESETS, _deepspeed_states, estimate, measure_peak, recommend,
                               saved_activation_bytes, workload)


@pytest.mark.parametrize("recipe, overrides", [
    ("recipes/shapes/reward.yaml", []),
    ("recipes/shapes/grpo.yaml", []),
    ("recipes/shapes/dpo.yaml", []),
    ("recipes/shapes/ddpo.yaml", ["train.micro_batch=8"]),  # its UNet at micro-batch 24 takes ~30 s
])
def test_estimate_is_within_30_percent_of_the_measured_peak(recipe, overrides):
    result = measure_peak(recipe, steps=2, overrides=overrides)
    assert result["measured_bytes"] > 10 * 2 ** 20  # a real step was profiled, not an empty timeline
    assert abs(result["relative_error"]) <= 0.30, result


def test_saved_activations_count_each_storage_once_and_no_parameter():
    import torch

    layer = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    # x is saved by both matmuls (for the weight gradient); the weight is saved too, but it is a parameter
    saved = saved_activation_bytes(lambda: (layer(x) + layer(x)).sum(), [layer])
    assert saved == x.numel() * 4


@pytest.fixture(scope="module")
def paper():
    """The paper recipes' workloads, built once (meta-device skeletons of 8B and 12B models take a few seconds)."""
    return {name: workload(f"recipes/paper/{name}.yaml") for name in
            ("spatialscore_qwen2_5_vl_7b", "flow_grpo_flux", "ddpo_sd15", "flow_grpo_sd3_5_medium")}


def test_paper_parameter_counts_are_the_published_architectures(paper):
    qwen = paper["spatialscore_qwen2_5_vl_7b"]
    backbone = qwen.frozen["Qwen2.5-VL backbone"]
    # Qwen2.5-VL-7B is 8.29B with its LM head (152064 x 3584), which a reward model does not load
    assert abs(backbone + 152064 * 3584 - 8.292e9) / 8.292e9 < 0.002
    # LoRA r64 on the 7 linears of 28 layers, the <reward> embedding and the Gaussian head (3584 -> 1024 -> 2)
    per_layer = 64 * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)
    assert qwen.trainable == 28 * per_layer + 3584 + (3584 * 1024 + 1024) + (1024 * 2 + 2)

    flux = paper["flow_grpo_flux"]
    assert abs(flux.frozen["FLUX.1-dev denoiser"] - 11.90e9) / 11.90e9 < 0.002
    assert flux.frozen["reward model"] == backbone + qwen.trainable  # the paper's reward model, frozen
    sd15 = paper["ddpo_sd15"]
    assert sd15.frozen["SD1.5 denoiser"] == 859_520_964  # the SD1.5 UNet, exactly
    sd3 = paper["flow_grpo_sd3_5_medium"]
    assert 2.2e9 < sd3.frozen["SD3.5-Medium denoiser"] < 2.6e9


def test_presets_shard_what_deepspeed_shards(paper):
    w = paper["flow_grpo_flux"]
    rows = {p: estimate(w, p, gpus=8, nodes=2, precision="bf16") for p in PRESETS}
    assert rows["single"].world == 1 and rows["zero3"].world == 16
    assert rows["ddp"].gradients == 2 * rows["single"].gradients  # the reducer's buckets
    assert rows["zero3"].parameters < rows["zero2"].parameters
    assert rows["zero3-offload"].optimizer == 0 and rows["zero3-offload"].cpu_per_node > rows["zero3"].cpu_per_node / 8
    # the text encoders, VAE and reward model are outside the prepared module: whole on every GPU even under ZeRO-3
    assert rows["zero3-offload"].parameters >= w.frozen_replicated * 2
    # zero2's trainable states are DeepSpeed's own estimate; the frozen base is added beside it
    gpu, _, _ = _deepspeed_states("zero2", w.trainable, w.largest_layer, 8, 2)
    z2 = rows["zero2"]
    prepared = (w.frozen_total - w.frozen_replicated) * 2  # the denoiser, cast to bf16 by DeepSpeed
    assert z2.parameters + z2.gradients + z2.optimizer == pytest.approx(gpu + prepared + w.frozen_replicated_bytes())


def test_paper_recipes_fit_80gb_somewhere_and_nothing_fits_1gb(paper):
    for w in paper.values():
        rows = [estimate(w, p, gpus=8, gpu_mem_gb=80) for p in PRESETS]
        assert recommend(rows) in PRESETS and recommend(rows) != "single", w.recipe
        assert 5 * GIB < min(r.total for r in rows) < 80 * GIB
        if "flux" in w.recipe or "qwen" in w.recipe:  # 12B / 8B: one GPU is not enough
            assert not rows[0].fits and rows[0].preset == "single"
        tiny_gpu = [estimate(w, p, gpus=8, gpu_mem_gb=1) for p in PRESETS]
        assert not any(r.fits for r in tiny_gpu) and recommend(tiny_gpu) is None


def test_cli_table_json_and_nothing_fits(capsys):
    assert main(["plan", "recipes/paper/flow_grpo_flux.yaml", "--gpus", "8", "--gpu-mem-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "zero3-offload" in out and "recommended: zero3" in out
    assert main(["plan", "paper/flow_grpo_flux", "--gpus", "8", "--gpu-mem-gb", "1"]) == 0
    assert "nothing fits 1 GiB" in capsys.readouterr().out
    assert main(["plan", "recipes/shapes/reward.yaml", "--gpus", "1", "--gpu-mem-gb", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recommended"] == "single" and result["parameters"]["trainable"] > 0
    assert [r["preset"] for r in result["presets"]] == list(PRESETS)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--gpu-mem-gb", "0"], "--gpu-mem-gb must be > 0"),
])
def test_cli_bad_flags_are_named_and_exit_2(capsys, argv, message):
    assert main(["plan", "recipes/paper/flow_grpo_flux.yaml", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_precision_and_unknown_recipe_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "recipes/paper/flow_grpo_flux.yaml", "--precision", "fp16"])
    assert exit_.value.code == 2 and "--precision" in capsys.readouterr().err
    assert main(["plan", "recipes/shapes/base_flow.yaml"]) == 2
    assert "the planner knows reward, grpo, ddpo and dpo recipes" in capsys.readouterr().err
