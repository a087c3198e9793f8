"""The memory planner (`spatialscore plan`): what one training step of a recipe holds on each GPU under every
hardware preset, and which presets fit a GPU's memory.

Parameters are counted, not guessed: the shapes-world recipes build their models on the CPU (they are small), the
real-scale recipes build skeletons of the real architectures on the meta device (no memory) from configs written
here with the published sizes (KNOWN_MODELS, KNOWN_PIPELINES). T is the trainable parameter count (a LoRA, or every weight of a model
trained in full), F the frozen one (the base under a LoRA, text encoders, the VAE, the reward model a policy is
trained against), L the largest single module's own parameters in the trained module (ZeRO-3 gathers one such
module at a time).

Per GPU, with world = gpus x nodes (`single`: world 1):
- single / ddp: parameters F x b_f + 4T (the trainers keep what they train in fp32; b_f = 2 for bf16 weights, else
  4), gradients 4T (ddp: 8T, its reducer's buckets hold a second copy), AdamW moments 8T; `--precision bf16` is
  autocast there, so it halves the activations but no weight.
- zero2 / zero3 / zero3-offload: DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`) for the trainable part: 2T of 16-bit weights, and 18T / world of 16-bit
  gradients (2), fp32 gradients (4), fp32 master weights (4) and Adam moments (8); ZeRO-3 shards the weights too
  and holds 4L for the module it has gathered; offload moves the optimizer state and the weights to host memory
  (the GPU keeps 4L). Those estimators assume every parameter trains, and that is wrong for a LoRA on a frozen
  base (a frozen weight has no gradient and no optimizer state), so they are given T alone and the frozen weights
  are added here: F x b_f on every GPU under zero2, F x b_f / world under zero3, none on the GPU with offload —
  for the module accelerate prepares (the reward model; a policy's denoiser). A policy's text encoders, VAE and
  reward model are outside it: DeepSpeed never shards, offloads or casts them, and every GPU holds them whole.
  Without bf16 (`--precision no`) DeepSpeed keeps fp32 weights and gradients: 4T + 12T / world.
- activations: the bytes autograd saves for backward per training sample (a pair for reward models and DPO, a
  trajectory step for GRPO / DDPO, classifier-free guidance's doubled batch and the KL reference's forward
  included), counted by running the recipe's forward under `torch.autograd.graph.saved_tensors_hooks` (each storage
  once, parameters excluded) — through the real training step on the CPU for the shapes-world models, at
  TRACE_SAMPLES samples so prompts pad as in a batch; on the meta device for real ones, one sample, with attention
  saved as a fused kernel saves it (q, k, v, output, log-sum-exp; never the score matrix) — times the samples per
  GPU per forward, plus TRANSIENT_SHARE for the tensors alive during backward (gradients of activations), scaled
  from the traced element size to the one that runs.
- overhead: CUDA_CONTEXT_GIB for the CUDA context, cuBLAS workspaces and allocator fragmentation.
Host memory per node: every process loads its whole model on the host before it moves or shards it (the trainers
use no zero.Init): gpus x (F x b_f + 4T); zero3-offload adds DeepSpeed's estimate for the offloaded states and the
frozen shards of the node's GPUs.

Not counted: sampling and reward scoring, which run between training steps without gradients (one forward's
transient tensors at sample.batch_size, not checked against the training step here); the data set in host memory;
gradient checkpointing (the trainers do not use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from spatialscore.errors import SpatialScoreError
from spatialscore.launch import PRESETS  # in order of cost: the first that fits is recommended

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 2.0  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces and allocator fragmentation
TRANSIENT_SHARE = 0.25  # tensors alive in backward beyond the saved ones (benchmarks/plan_accuracy.py: every
#                         shapes-world recipe's estimate within 30% of its measured peak at this value)
TEXT_TOKENS = 64  # a spatial prompt with its chat template, in Qwen2.5-VL tokens (paper recipes)
TRACE_SAMPLES = 4  # shapes-world activations are traced at this many samples and divided
REPLICATED = ("text encoders, VAE", "reward model")  # a policy's parts outside the module accelerate prepares


@dataclass
class Workload:
    """What one training step of a recipe holds, independent of the hardware."""

    recipe: str
    kind: str
    trainable: int  # T
    frozen: dict[str, int]  # F, by component
    frozen_bytes: int  # b_f: bytes per frozen parameter as loaded (2: bf16, 4: fp32)
    largest_layer: int  # L
    activation_per_sample: float  # bytes saved for backward per training sample, at traced_bytes per element
    traced_bytes: int  # the element size the activations were traced at
    samples: Callable[[int], int] = field(repr=False)  # world size -> training samples per GPU per forward
    sample_note: str = ""
    default_precision: str = "no"
    notes: list[str] = field(default_factory=list)
    # frozen components outside the module accelerate prepares (a policy's text encoders, VAE and reward model):
    # DeepSpeed neither shards, offloads nor casts them; every GPU holds them whole
    replicated: tuple[str, ...] = REPLICATED
    component_bytes: dict[str, int] = field(default_factory=dict)  # bytes per parameter where not frozen_bytes

    @property
    def frozen_total(self) -> int:
        return sum(self.frozen.values())

    @property
    def frozen_replicated(self) -> int:
        return sum(n for name, n in self.frozen.items() if name in self.replicated)

    def frozen_replicated_bytes(self) -> int:
        return sum(n * self.component_bytes.get(name, self.frozen_bytes) for name, n in self.frozen.items()
                   if name in self.replicated)


# --- counting ---------------------------------------------------------------------------------------------------

def _modules(obj) -> list[nn.Module]:
    """The torch modules a component holds: itself, or (reward heads, pipelines) the modules among its attributes."""
    if isinstance(obj, nn.Module):
        return [obj]
    found = []
    for value in vars(obj).values():
        if isinstance(value, nn.Module):
            found.append(value)
        elif isinstance(value, dict):  # a composite reward's heads
            found += [m for v in value.values() if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor)
                      for m in _modules(v)]
    return found


def _count(modules: list[nn.Module]) -> tuple[int, int, int]:
    """(trainable, frozen, largest module's own parameters), each parameter once."""
    seen, trainable, frozen, largest = set(), 0, 0, 0
    for module in modules:
        for sub in module.modules():
            own = 0
            for p in sub.parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                own += p.numel()
                if p.requires_grad:
                    trainable += p.numel()
                else:
                    frozen += p.numel()
            largest = max(largest, own)
    return trainable, frozen, largest


@contextlib.contextmanager
def _fused_attention():
    """Attention as a fused kernel runs it (FlashAttention on GPUs, its CPU twin here): what it saves for backward
    is q, k, v, the output and the log-sum-exp, never the score matrix (which the meta device's math path keeps)."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attn_mask,
                                                                                                        -1e4)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def saved_activation_bytes(forward: Callable[[], Any], modules: list[nn.Module]) -> int:
    """Bytes of the tensors autograd saves for backward while `forward()` runs: each storage once, parameters not
    counted (they are counted as parameters). Works on the CPU and on the meta device."""
    skip = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
    saved: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = (storage.nbytes(), t)  # the reference keeps the address from being reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention():
        forward()
    return sum(n for n, _ in saved.values())


# --- the shapes-world recipes: their real training steps --------------------------------------------------------

@dataclass
class TrainingStep:
    """A recipe's training step built from the trainers' own functions: everything resident (by component), the
    trainable parameters and their AdamW, and the loss of a batch of n samples."""

    components: dict[str, list[nn.Module]]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Any]
    loss: Callable[[Any], torch.Tensor]
    max_grad_norm: float

    def run(self, batch) -> float:
        loss = self.loss(batch)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


def _reward_data(cfg, n: int):
    from spatialscore.train.reward_model import load_data

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=None, n_train=n))
    return load_data(cfg, "train", progress=False)


def _reward_step(cfg, data) -> TrainingStep:
    from spatialscore.models.base import build_model
    from spatialscore.train.reward_model import _both_targets, pair_loss

    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(dataclasses.asdict(cfg.model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def loss(n: int) -> torch.Tensor:
        part = torch.arange(n)
        prompts = [data.prompts[i] for i in part.tolist()]
        images = torch.cat([data.images("chosen", part), data.images("rejected", part)])
        targets = _both_targets(data, part, "cpu") if t.aux_weight > 0 else None
        mu, sigma, *aux = model(images, prompts + prompts, targets=targets)
        preference = pair_loss(t.loss, mu[:n], sigma[:n], mu[n:], sigma[n:])
        return preference + t.aux_weight * aux[0] if aux else preference

    return TrainingStep({"reward model": [model]}, params, optimizer, lambda n: n, loss, t.max_grad_norm)


def _pipeline_kinds(kind: str) -> tuple[tuple[str, ...], str]:
    from spatialscore.models.generators import FLOW_PIPELINES, UNET_PIPELINES

    return {"grpo": (FLOW_PIPELINES, "Flow-GRPO"), "ddpo": (UNET_PIPELINES, "DDPO"),
            "dpo": (FLOW_PIPELINES + UNET_PIPELINES, "Diffusion-DPO")}[kind]


def _policy_parts(cfg, kind: str, guidance: float):
    from spatialscore.models.generators import policy_for
    from spatialscore.train.policy_gradient import add_lora, build_reward, load_pipeline

    pipe = load_pipeline(cfg, *_pipeline_kinds(kind))
    policy = policy_for(pipe, guidance, cfg.model.image_size)
    peft_model = add_lora(policy.denoiser, cfg)
    reward = build_reward(cfg)
    components = {"denoiser + LoRA": [peft_model],
                  "text encoders, VAE": [m for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
                                         if (m := getattr(pipe, name, None)) is not None],
                  "reward model": _modules(reward)}
    return policy, peft_model, components


PROMPT = "a red circle to the left of a blue square"


def _rl_step(cfg) -> TrainingStep:
    """One GRPO / DDPO update step as train_policy runs it: the stored step's log-probability under the LoRA, the
    clipped surrogate, and the KL to the adapter-free reference."""
    from spatialscore.train.losses import clipped_policy_loss, gaussian_step_kl
    from spatialscore.train.policy_gradient import Trajectories, step_log_prob

    s, t = cfg.sample, cfg.train
    policy, peft_model, components = _policy_parts(cfg, cfg.kind, s.guidance_scale)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    @torch.no_grad()
    def batch(n: int):
        """n samples' first sampling step (the one trained below), as sample_trajectories takes it."""
        cond = policy.encode([PROMPT] * n)
        generator = torch.Generator().manual_seed(0)
        schedule = policy.schedule(s.steps, getattr(s, policy.noise_field))
        x = policy.initial_noise(n, generator)
        output = policy.predict(x, schedule.model_time(0), cond)
        after, log_prob, _, _ = schedule.step(0, x, output, noise=torch.randn(x.shape, generator=generator))
        traj = Trajectories(torch.stack([x, after], 1), log_prob[:, None], schedule, images=None)
        return cond, traj, torch.randn(n, generator=generator)

    def loss(inputs) -> torch.Tensor:
        cond, traj, advantages = inputs
        lp, mean, std = step_log_prob(policy, traj.latents, 0, traj.schedule, cond)
        value = clipped_policy_loss(lp, traj.log_probs[:, 0], advantages, t.clip_range)
        if t.kl_beta > 0:
            with torch.no_grad(), peft_model.disable_adapter():
                _, ref_mean, _ = step_log_prob(policy, traj.latents, 0, traj.schedule, cond, denoiser=peft_model)
            value = value + t.kl_beta * gaussian_step_kl(mean, ref_mean, std)
        return value

    return TrainingStep(components, params, optimizer, batch, loss, t.max_grad_norm)


def _dpo_data(cfg, n: int):
    from spatialscore.models.generators import policy_for
    from spatialscore.train.diffusion_dpo import load_pairs
    from spatialscore.train.policy_gradient import load_pipeline

    size = policy_for(load_pipeline(cfg, *_pipeline_kinds("dpo")), 1.0, cfg.model.image_size).image_size
    return load_pairs(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=None, n_train=n)), size, False)


def _dpo_step(cfg, data) -> TrainingStep:
    """One Diffusion-DPO step as train_dpo runs it: chosen and rejected noised alike, the LoRA's and the
    reference's denoising errors, the DPO loss."""
    from spatialscore.train.diffusion_dpo import dpo_loss
    from spatialscore.train.generator import shifted

    t = cfg.train
    policy, peft_model, components = _policy_parts(cfg, "dpo", 1.0)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def batch(n: int):
        part = torch.arange(n)
        with torch.no_grad():
            cond = policy.encode([data.prompts[i] for i in part.tolist()])
            latents = policy.encode_images(torch.cat([data.images("chosen", part), data.images("rejected", part)]))
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(latents[:n].shape, generator=generator)
        u = shifted(torch.sigmoid(torch.randn(n, generator=generator)), t.time_shift)
        noisy, time, target = policy.noised(latents, torch.cat([noise, noise]), torch.cat([u, u]))
        return n, noisy, time, target, {k: torch.cat([v, v]) for k, v in cond.items()}

    def loss(inputs) -> torch.Tensor:
        n, noisy, time, target, both = inputs
        errors = (policy.predict(noisy, time, both).float() - target.float()).pow(2).flatten(1).mean(1)
        with torch.no_grad(), peft_model.disable_adapter():
            ref = (policy.predict(noisy, time, both, denoiser=peft_model).float() - target.float())
            ref = ref.pow(2).flatten(1).mean(1)
        return dpo_loss(errors[:n], errors[n:], ref[:n], ref[n:], t.beta)[0]

    return TrainingStep(components, params, optimizer, batch, loss, t.max_grad_norm)


def _tiny_data(cfg, n: int):
    return _reward_data(cfg, n) if cfg.kind == "reward" else _dpo_data(cfg, n) if cfg.kind == "dpo" else None


def _tiny_step(cfg, data) -> TrainingStep:
    if cfg.kind == "reward":
        return _reward_step(cfg, data)
    return _dpo_step(cfg, data) if cfg.kind == "dpo" else _rl_step(cfg)


def _micro_samples(cfg) -> tuple[Callable[[int], int], str]:
    """World size -> training samples per GPU per forward, as the trainers split their batches, and what a sample
    is."""
    if cfg.kind == "reward":
        pairs = cfg.train.batch_size // cfg.train.grad_accum
        return (lambda world: max(1, pairs // world)), (f"train.batch_size {cfg.train.batch_size} pairs / "
                                                        f"grad_accum {cfg.train.grad_accum} / world")
    if cfg.kind == "dpo":
        return (lambda world: max(1, cfg.train.batch_size // world)), (f"train.batch_size {cfg.train.batch_size} "
                                                                       f"pairs / world")
    return (lambda world: cfg.train.micro_batch), f"train.micro_batch {cfg.train.micro_batch} per GPU"


def _is_shapes_recipe(cfg) -> bool:
    """Whether the recipe's models exist here (or are built in code): then they are built for real."""
    from spatialscore.config import project_path

    if cfg.kind == "reward":
        return not cfg.model.pretrained or Path(project_path(cfg.model.pretrained)).is_dir()
    return bool(cfg.model.tiny) or Path(project_path(cfg.model.pipeline)).is_dir()


def tiny_workload(cfg, recipe: str, step: TrainingStep | None = None) -> Workload:
    """Counts from the recipe's real models and activations traced on the CPU through its real training step
    (`step`, or one built here)."""
    step = step or _tiny_step(cfg, _tiny_data(cfg, TRACE_SAMPLES))
    modules = [m for ms in step.components.values() for m in ms]
    trainable = _count(modules)[0]
    largest = _count([m for name, ms in step.components.items() if name not in REPLICATED for m in ms])[2]
    by_component = {name: _count(ms)[1] for name, ms in step.components.items()}
    samples, note = _micro_samples(cfg)
    # a few samples, not one: a batch pads its prompts to the longest (25% more tokens than one prompt's own for
    # reward_qwen's character-level tokenizer)
    n = min(TRACE_SAMPLES, samples(1))
    inputs = step.batch(n)
    per_sample = saved_activation_bytes(lambda: step.loss(inputs), modules) / n
    frozen_bytes = 2 if getattr(cfg.model, "precision", "fp32") == "bf16" else 4
    return Workload(recipe, cfg.kind, trainable, {k: v for k, v in by_component.items() if v}, frozen_bytes, largest,
                    per_sample, 4, samples, note,
                    notes=["counted from the recipe's models built on the CPU; activations traced through its "
                           "training step"])


# --- the real-scale recipes: skeletons on the meta device -------------------------------------------------------

def _qwen2_5_vl_7b_config():
    """Qwen2.5-VL-7B-Instruct's published config.json."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                     "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "tie_word_embeddings": False,
                     "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                       "in_chans": 3},
        vocab_size=152064, tie_word_embeddings=False)


def _t5_xxl_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def _clip_text(hidden: int, layers: int, heads: int, ffn: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, projection_dim=projection or 768, max_position_embeddings=77)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2)


def _flux_dev():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _sd3_5_medium():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                attention_head_dim=8)


def _meta(tensor_shape: tuple[int, ...], dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(tensor_shape, device="meta", dtype=dtype)


@dataclass
class KnownPipeline:
    """A real generator: its denoiser, its other frozen parts, the default image size, and one training sample's
    denoiser inputs on the meta device."""

    name: str
    denoiser: Callable[[], nn.Module]
    others: Callable[[], list[nn.Module]]
    image_size: int
    inputs: Callable[[int], dict]  # image size -> keyword inputs of the denoiser for one sample
    distilled_guidance: bool = False


def _flux_inputs(size: int) -> dict:
    tokens = (size // 16) ** 2
    return {"hidden_states": _meta((1, tokens, 64)), "encoder_hidden_states": _meta((1, 512, 4096)),
            "pooled_projections": _meta((1, 768)), "timestep": _meta((1,), torch.float32),
            "guidance": _meta((1,), torch.float32), "img_ids": _meta((tokens, 3), torch.float32),
            "txt_ids": _meta((512, 3), torch.float32)}


def _sd3_inputs(size: int) -> dict:
    return {"hidden_states": _meta((1, 16, size // 8, size // 8)), "encoder_hidden_states": _meta((1, 333, 4096)),
            "pooled_projections": _meta((1, 2048)), "timestep": _meta((1,), torch.float32)}


def _sd15_inputs(size: int) -> dict:
    return {"sample": _meta((1, 4, size // 8, size // 8)), "encoder_hidden_states": _meta((1, 77, 768)),
            "timestep": _meta((1,), torch.float32)}


KNOWN_PIPELINES = {
    "flux.1": KnownPipeline("FLUX.1-dev", _flux_dev, lambda: [_clip_text(768, 12, 12, 3072, None), _t5_xxl_encoder(),
                                                               _vae(16)], 1024, _flux_inputs, distilled_guidance=True),
    "stable-diffusion-3.5-medium": KnownPipeline(
        "SD3.5-Medium", _sd3_5_medium,
        lambda: [_clip_text(768, 12, 12, 3072, 768), _clip_text(1280, 32, 20, 5120, 1280), _t5_xxl_encoder(), _vae(16)],
        512, _sd3_inputs),
    "stable-diffusion-v1-5": KnownPipeline("SD1.5", _sd15_unet, lambda: [_clip_text(768, 12, 12, 3072, None), _vae(4)],
                                           512, _sd15_inputs),
}
KNOWN_MODELS = {"qwen2.5-vl-7b": _qwen2_5_vl_7b_config}


def _known(table: dict, path: str, field_name: str):
    key = Path(path).name.lower()
    for name, value in table.items():
        if name in key:
            return value
    raise SpatialScoreError(f"{field_name}: {path} is not a local directory and not a model the planner knows "
                            f"({', '.join(table)}); give a local directory or add its config to spatialscore/plan.py")


def _qwen_reward_skeleton(cfg_model) -> nn.Module:
    """The SpatialScore model of a real Qwen2.5-VL on the meta device: the backbone (Qwen2_5_VLModel, no LM head),
    the LoRA on its language model, the <reward> embedding and the Gaussian head, as models/qwen.py builds it."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen2_5_VLModel

    from spatialscore.models.base import GaussianHead

    config = _known(KNOWN_MODELS, cfg_model.pretrained, "model.pretrained")()
    with torch.device("meta"):
        model = nn.Module()
        model.backbone = Qwen2_5_VLModel(config)
        model.backbone.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=cfg_model.lora_r, lora_alpha=cfg_model.lora_alpha,
                                           lora_dropout=cfg_model.lora_dropout,
                                           target_modules=list(cfg_model.lora_target_modules)),
                                model.backbone.language_model)
        if cfg_model.train_backbone:
            model.backbone.requires_grad_(True)
        hidden = config.text_config.hidden_size
        model.reward_embedding = nn.Parameter(torch.empty(hidden))
        model.head = GaussianHead(hidden, cfg_model.head_hidden)
    return model


def _qwen_sample_bytes(model: nn.Module, image_size: int) -> int:
    """One pair's saved activations: two sequences of an image's merged vision tokens plus the prompt through the
    language model (the LoRA's home; the frozen vision tower saves nothing: no input of it needs a gradient)."""
    language = model.backbone.language_model
    tokens = (image_size // 28) ** 2 + TEXT_TOKENS
    embeds = torch.empty((2, tokens, language.config.hidden_size), device="meta", dtype=torch.bfloat16,
                         requires_grad=True)
    model.to(torch.bfloat16)  # no padding mask: a causal mask (a padding one would need values, which meta lacks)
    return saved_activation_bytes(lambda: language(inputs_embeds=embeds), [model])


def _lora_on_meta(denoiser: nn.Module, cfg) -> nn.Module:
    from spatialscore.train.policy_gradient import add_lora

    with torch.device("meta"):
        return add_lora(denoiser, cfg)


def paper_workload(cfg, recipe: str) -> Workload:
    """Counts from skeletons of the real architectures on the meta device; activations traced there."""
    samples, note = _micro_samples(cfg)
    if cfg.kind == "reward":
        model = _qwen_reward_skeleton(cfg.model)
        trainable, frozen, largest = _count([model])
        per_sample = _qwen_sample_bytes(model, cfg.model.image_size)
        return Workload(recipe, "reward", trainable, {"Qwen2.5-VL backbone": frozen}, 4, largest, per_sample, 2,
                        samples, note, default_precision="bf16",
                        notes=[f"Qwen2.5-VL-7B skeleton built on the meta device from its published config "
                               f"(Qwen2_5_VLModel: no LM head); {TEXT_TOKENS} text tokens per prompt assumed",
                               "models/qwen.py loads the backbone in fp32: only DeepSpeed's bf16 casts it"])
    known = _known(KNOWN_PIPELINES, cfg.model.pipeline, "model.pipeline")
    with torch.device("meta"):
        denoiser = known.denoiser().requires_grad_(False)
        others = [m.requires_grad_(False) for m in known.others()]
    peft_model = _lora_on_meta(denoiser, cfg)
    size = cfg.model.image_size or known.image_size
    guidance = 1.0 if cfg.kind == "dpo" else cfg.sample.guidance_scale
    doubled = 2 if guidance > 1 and not known.distilled_guidance else 1
    if cfg.kind == "dpo":
        doubled = 2  # chosen and rejected in one forward
    peft_model.to(torch.bfloat16)
    inputs = known.inputs(size)
    per_sample = doubled * saved_activation_bytes(lambda: peft_model(**inputs), [peft_model])
    trainable, frozen_denoiser, largest = _count([peft_model])
    frozen = {f"{known.name} denoiser": frozen_denoiser, "text encoders, VAE": _count(others)[1]}
    notes = [f"{known.name} skeleton built on the meta device from its published config; {size} px"]
    notes.append("text encoders, VAE and reward model are counted whole on every GPU: they are outside the "
                 "module DeepSpeed shards")
    reward = _reward_model_of(cfg)
    if reward is not None:
        frozen["reward model"] = reward
        notes.append("reward model: the paper's Qwen2.5-VL-7B SpatialScore (its checkpoint is not here), frozen, "
                     "in fp32 as the spatialscore head loads it")
    return Workload(recipe, cfg.kind, trainable, frozen, 2 if cfg.model.precision == "bf16" else 4,
                    largest, per_sample, 2, samples,
                    note + (", x2: classifier-free guidance" if doubled == 2 and cfg.kind != "dpo" else ""),
                    default_precision="bf16" if cfg.model.precision == "bf16" else "no", notes=notes,
                    component_bytes={"reward model": 4})


def _reward_model_of(cfg) -> int | None:
    """Parameters of a policy recipe's learned reward model when it is the paper's (absent here), else None."""
    from spatialscore.config import project_path

    checkpoint = cfg.reward.kwargs.get("spatialscore", {}).get("checkpoint")
    if "spatialscore" not in cfg.reward.heads or not checkpoint or Path(project_path(checkpoint)).exists():
        return None
    return _paper_reward_parameters()


@functools.cache
def _paper_reward_parameters() -> int:
    from spatialscore.config import RECIPES_DIR, RewardConfig, load_config

    paper = load_config(RewardConfig, RECIPES_DIR / "paper" / "spatialscore_qwen2_5_vl_7b.yaml")
    return sum(_count([_qwen_reward_skeleton(paper.model)])[:2])


def workload(recipe: str, overrides: list[str] = ()) -> Workload:
    """The workload of a recipe (a path or a shipped recipe's name)."""
    from spatialscore.config import find_recipe, load_config, schema_for

    path = find_recipe(recipe) if not Path(recipe).is_file() else Path(recipe)
    cfg = load_config(schema_for(path), path, list(overrides))
    if cfg.kind not in ("reward", "grpo", "ddpo", "dpo"):
        raise SpatialScoreError(f"{path}: the planner knows reward, grpo, ddpo and dpo recipes; this one is "
                                f"kind: {cfg.kind}")
    return tiny_workload(cfg, str(path)) if _is_shapes_recipe(cfg) else paper_workload(cfg, str(path))


# --- per preset -------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    preset: str
    world: int
    samples_per_gpu: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    cpu_per_node: float
    gpu_mem: float  # the budget it is judged against, bytes

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem

    def as_dict(self) -> dict:
        gib = {k: round(getattr(self, k) / GIB, 3) for k in ("parameters", "gradients", "optimizer", "activations",
                                                              "overhead", "total", "cpu_per_node")}
        return {"preset": self.preset, "world_size": self.world, "samples_per_gpu": self.samples_per_gpu,
                **{f"{k}_gib": v for k, v in gib.items()}, "fits": self.fits}


def _deepspeed_states(preset: str, trainable: int, largest: int, gpus: int, nodes: int) -> tuple[int, int, int]:
    """DeepSpeed's estimators for the trainable part: (gpu bytes, cpu bytes per node, gathered-layer bytes)."""
    with contextlib.redirect_stdout(sys.stderr):  # its logger prints to stdout on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if preset == "zero2":
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, gpus, nodes, cpu_offload=False)
        return gpu, cpu, 0
    offload = preset == "zero3-offload"
    cpu, gpu, layer = estimate_zero3_model_states_mem_needs(trainable, largest, gpus, nodes, cpu_offload=offload,
                                                            cpu_offload_params=offload, zero_init=True)
    return gpu, cpu, layer


def activation_bytes(w: Workload, world: int, precision: str) -> tuple[int, float]:
    """(samples per GPU, bytes): the traced per-sample bytes times the samples, plus the transient share, at the
    element size the step runs in (bf16 when asked or when the weights are bf16)."""
    samples = w.samples(world)
    element = 2 if precision == "bf16" or w.frozen_bytes == 2 else 4
    return samples, samples * w.activation_per_sample * (1 + TRANSIENT_SHARE) * element / w.traced_bytes


def estimate(w: Workload, preset: str, gpus: int, nodes: int = 1, gpu_mem_gb: float = 80.0,
             precision: str | None = None) -> Estimate:
    precision = precision or w.default_precision
    if preset not in PRESETS:
        raise SpatialScoreError(f"preset {preset!r}: choose from {', '.join(PRESETS)}")
    if preset == "single":
        gpus, nodes = 1, 1
    world = gpus * nodes
    t, f = w.trainable, w.frozen_total - w.frozen_replicated
    samples, activations = activation_bytes(w, world, precision)
    overhead = CUDA_CONTEXT_GIB * GIB
    whole_bytes = w.frozen_replicated_bytes()
    loaded = f * w.frozen_bytes + whole_bytes + 4 * t  # what each process loads on the host before moving it
    if preset in ("single", "ddp"):
        grads = 4 * t * (2 if preset == "ddp" else 1)
        return Estimate(preset, world, samples, loaded, grads, 8 * t, activations, overhead, gpus * loaded,
                        gpu_mem_gb * GIB)
    frozen_bytes = 2 if precision == "bf16" else w.frozen_bytes  # DeepSpeed's bf16 casts the whole module
    offload = preset == "zero3-offload"
    if precision == "bf16":
        gpu, cpu, layer = _deepspeed_states(preset, t, w.largest_layer, gpus, nodes)
        weights = 0 if offload else (2 * t if preset == "zero2" else 2 * t / world)
        grads = 0 if offload else 6 * t / world
        optimizer = gpu - weights - grads - layer  # DeepSpeed's total, split as its source comments split it
    else:  # fp32: DeepSpeed keeps fp32 weights and gradients and no master copy
        layer = 0 if preset == "zero2" else 4 * w.largest_layer
        weights = 0 if offload else (4 * t if preset == "zero2" else 4 * t / world)
        grads = optimizer = 0
        if not offload:
            grads, optimizer = 4 * t / world, 8 * t / world
        cpu = 16 * t / nodes * 1.5 if offload else 0  # DeepSpeed's additional_buffer_factor
    frozen_gpu = ({"zero2": f * frozen_bytes, "zero3": f * frozen_bytes / world, "zero3-offload": 0}[preset]
                  + whole_bytes)
    # host memory: every process loads its model on the host first; offload then keeps the node's shards there
    cpu = gpus * loaded + (cpu + f * frozen_bytes / nodes if offload else 0)
    return Estimate(preset, world, samples, frozen_gpu + weights + layer, grads, optimizer, activations, overhead,
                    cpu, gpu_mem_gb * GIB)




def recommend(rows: list[Estimate]) -> str | None:
    """The cheapest preset that fits: the first in PRESETS order (less communication, no host round trips), and
    with more than one GPU not `single`, which would leave the others idle."""
    fitting = [r for r in rows if r.fits and not (r.preset == "single" and max(x.world for x in rows) > 1)]
    return fitting[0].preset if fitting else None


def plan(recipe: str, gpus: int = 8, gpu_mem_gb: float = 80.0, nodes: int = 1, precision: str | None = None,
         overrides: list[str] = ()) -> dict:
    """Every preset's per-GPU estimate for `recipe`, which fit `gpu_mem_gb`, and the cheapest that does."""
    if gpus < 1:
        raise SpatialScoreError(f"--gpus must be >= 1, got {gpus}")
    if nodes < 1:
        raise SpatialScoreError(f"--nodes must be >= 1, got {nodes}")
    if not gpu_mem_gb > 0:
        raise SpatialScoreError(f"--gpu-mem-gb must be > 0, got {gpu_mem_gb}")
    if precision not in (None, "no", "bf16"):
        raise SpatialScoreError(f"--precision must be no or bf16, got {precision}")
    w = workload(recipe, overrides)
    precision = precision or w.default_precision
    rows = [estimate(w, p, gpus, nodes, gpu_mem_gb, precision) for p in PRESETS]
    return {"recipe": w.recipe, "kind": w.kind, "gpus_per_node": gpus, "nodes": nodes, "gpu_mem_gb": gpu_mem_gb,
            "precision": precision,
            "parameters": {"trainable": w.trainable, "frozen": w.frozen, "frozen_bytes_per_param": {
                               name: w.component_bytes.get(name, w.frozen_bytes) for name in w.frozen},
                           "largest_layer": w.largest_layer},
            "activation_gib_per_sample": round(w.activation_per_sample / GIB, 4), "samples": w.sample_note,
            "presets": [r.as_dict() for r in rows], "fits": [r.preset for r in rows if r.fits],
            "recommended": recommend(rows), "notes": w.notes}


# --- measuring: the peak of a real training step on the CPU -----------------------------------------------------

def measure_peak(recipe: str, steps: int = 2, overrides: list[str] = (), by_category: bool = False) -> dict:
    """The peak CPU memory of `steps` training steps of a shapes-world recipe at its own micro-batch (world 1, fp32),
    with the planner's single-preset estimate beside it. The profiler records every allocation and free from before
    the models are built; the peak is the largest running sum of their sizes in time order. Data are made before it
    starts (a data set is not a training step's memory). `by_category`: also the profiler's memory timeline at the
    peak, split into parameters, gradients, optimizer state, activations... (slower: it records stacks)."""
    from torch.profiler import ProfilerActivity, profile

    from spatialscore.config import find_recipe, load_config, schema_for

    path = find_recipe(recipe) if not Path(recipe).is_file() else Path(recipe)
    cfg = load_config(schema_for(path), path, list(overrides))
    if not _is_shapes_recipe(cfg):
        raise SpatialScoreError(f"{path}: measuring needs a recipe whose models are here (a shapes-world recipe)")
    samples, _ = _micro_samples(cfg)
    n = samples(1)
    data = _tiny_data(cfg, n)
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=by_category,
                 with_stack=by_category) as prof:
        step = _tiny_step(cfg, data)
        for _ in range(steps):
            step.run(step.batch(n))
    measured = _peak_allocated(prof)
    w = tiny_workload(cfg, str(path), step)
    single = estimate(w, "single", 1, 1, precision="no")
    result = {"recipe": str(path), "samples": n, "steps": steps, "measured_bytes": measured,
              "estimated_bytes": single.total - single.overhead,
              "estimate": {k: getattr(single, k) for k in ("parameters", "gradients", "optimizer", "activations")}}
    result["relative_error"] = (result["estimated_bytes"] - measured) / measured
    if by_category:
        result["measured_by_category"] = _peak_by_category(prof)
    return result


def _peak_allocated(prof) -> int:
    """The largest running sum, in time order, of the CPU allocations (+) and frees (-) the profiler recorded."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _peak_by_category(prof) -> dict[str, int]:
    """The profiler's memory timeline (torch.profiler._memory_profiler) at its peak, bytes by category."""
    from torch.profiler._memory_profiler import Category, MemoryProfileTimeline

    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    row = max(sizes, key=sum)
    names = ["unknown"] + [c.name.lower() for c in Category]
    return {name: int(v) for name, v in zip(names, row) if v}
