"""Text-to-image generators as ordinary diffusers pipelines, and the policy view RL trains through.

`ShapesFlowPipeline` is the shapes world's small flow-matching generator: an SD3-style MMDiT
(`SD3Transformer2DModel`) denoising the latents of a small convolutional `AutoencoderKL` (or, without one, RGB pixels
in [-1, 1]), a small CLIP text encoder with projection trained with it, a word-level tokenizer over the shapes-world
vocabulary, and `FlowMatchEulerDiscreteScheduler`. `shapes_unet_pipeline` is the SD1.5-style one, a plain
`StableDiffusionPipeline` (autoencoder, CLIP text encoder, cross-attention UNet, DDIM). Both save and load with
`save_pretrained` / `from_pretrained` (safetensors) like any diffusers pipeline. 64 px is what the oracle judges
reliably; on 16x16 latents the transformer sees 64 tokens instead of 256 pixel patches (3.4 vs 1.8 steps/s here).

`FlowPolicy` is what Flow-GRPO needs from any flow-matching pipeline (the shapes one, SD3, FLUX): encode prompts,
draw initial noise, predict the velocity (with classifier-free guidance), decode to images, and the module LoRA
wraps. Adapters for the real pipelines live beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from spatialscore.errors import SpatialScoreError

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_TOKENS = 32


def shapes_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the shapes-world vocabulary (every template word, shape, colour,
    count and relation word); punctuation is dropped, unknown words map to <unk>, each prompt ends in <eos>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from spatialscore.models.text import ShapesTokenizer

    words = [w for w in ShapesTokenizer().vocab if w.isalnum()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9]+"), " ")])
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=MAX_TOKENS)


def shapes_text_encoder(tokenizer, text_dim: int, text_layers: int, projection: bool, embed_std: float = 0.0,
                        kind: str = "clip"):
    """A small text encoder over the shapes tokenizer, trained with its generator. `kind="clip"`: CLIP's, with a
    projection (pooled embedding, SD3-style) or without (SD1.5-style); its attention is causal, so a word's state
    never sees the words after it ("red" in "a red circle left of a blue square" cannot know it is left of anything).
    `kind="t5"`: T5's encoder, bidirectional (the token states SD3 and FLUX read); its pooled embedding is the mean
    of its token states (text_states). `embed_std` > 0 draws the word embeddings at that scale instead of CLIP's
    0.02: at 0.02 the residual stream hides which word it is (a freshly made encoder's states for "circle" and
    "square" have cosine 0.93), at 1.0 they are near orthogonal (0.02) and stay apart while the generator learns."""
    from transformers import T5Config, T5EncoderModel

    if kind == "t5":
        heads = max(1, text_dim // 32)
        model = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // heads, d_ff=text_dim * 4,
            num_layers=text_layers, num_heads=heads, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id))
    elif kind == "clip":
        model = _clip_text_encoder(tokenizer, text_dim, text_layers, projection)
    else:
        raise SpatialScoreError(f"model.text_encoder must be 'clip' or 't5', got {kind!r}")
    if embed_std > 0:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    return model


def _clip_text_encoder(tokenizer, text_dim: int, text_layers: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=text_dim * 4, num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_dim // 32), max_position_embeddings=MAX_TOKENS, projection_dim=text_dim,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def text_states(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states [B, L, D], pooled [B, D']) of a shapes text encoder: CLIP's projected (or plain) end-of-text
    embedding, or for an encoder without one (T5) the mean of the token states over the prompt's tokens."""
    out = encoder(input_ids=input_ids, attention_mask=attention_mask)
    states = out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return states, pooled


def shapes_autoencoder(image_size: int = 64, factor: int = 4, channels: int = 4, width: int = 32):
    """A small convolutional `AutoencoderKL` (no attention) that maps image_size px RGB to a grid `factor` times
    smaller with `channels` channels: SD's VAE design at shapes-world scale."""
    from diffusers import AutoencoderKL

    if factor < 2 or factor & (factor - 1) or image_size % factor:
        raise SpatialScoreError(f"model.latent_factor must be a power of two >= 2 dividing model.image_size "
                                f"({image_size}), got {factor}")
    blocks = factor.bit_length()  # factor 4: three blocks, two of them downsampling
    widths = tuple(width * min(2 ** i, 2) for i in range(blocks))
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=widths, layers_per_block=1,
                         latent_channels=channels, norm_num_groups=min(16, width), sample_size=image_size,
                         scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False)


def shapes_flow_pipeline(image_size: int = 64, patch_size: int = 8, layers: int = 4, heads: int = 6,
                         head_dim: int = 32, text_dim: int = 64, text_layers: int = 2, shift: float = 1.0,
                         prediction: str = "x", seed: int = 0, latent_factor: int = 0, latent_channels: int = 4,
                         ae_width: int = 32, text_embed_std: float = 0.0,
                         text_encoder: str = "clip") -> "ShapesFlowPipeline":
    """A freshly initialised shapes-world flow pipeline (train it with `spatialscore train-generator`); with
    `latent_factor` > 0 it denoises the latents of a (to be trained) autoencoder instead of pixels."""
    torch.manual_seed(seed)
    vae = shapes_autoencoder(image_size, latent_factor, latent_channels, ae_width) if latent_factor else None
    grid, channels = (image_size // latent_factor, latent_channels) if vae is not None else (image_size, 3)
    if grid % patch_size:
        raise SpatialScoreError(f"model.patch_size ({patch_size}) must divide the {'latent' if vae else 'image'} "
                                f"size ({grid})")
    tokenizer = shapes_tokenizer()
    text_encoder = shapes_text_encoder(tokenizer, text_dim, text_layers, projection=True, embed_std=text_embed_std,
                                       kind=text_encoder)
    transformer = SD3Transformer2DModel(
        sample_size=grid, patch_size=patch_size, in_channels=channels, out_channels=channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=text_dim,
        pos_embed_max_size=grid // patch_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return ShapesFlowPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae, prediction=prediction)


def shapes_unet_pipeline(image_size: int = 64, latent_factor: int = 4, latent_channels: int = 8, ae_width: int = 16,
                         unet_width: int = 64, text_dim: int = 64, text_layers: int = 2, seed: int = 0,
                         top_attention: bool = True, text_embed_std: float = 0.0):
    """SD1.5's design at shapes-world scale, as a `StableDiffusionPipeline`: the autoencoder above, a CLIP text
    encoder trained with it over the shapes tokenizer, a cross-attention `UNet2DConditionModel` predicting the noise
    of its latents (DDPM training, cosine schedule) and `DDIMScheduler` for sampling (DDPO's eta = 1 or eta = 0).
    Without `top_attention` the full-resolution blocks are convolutional only (the text enters at the lower ones):
    half the step time on CPU."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if not latent_factor:
        raise SpatialScoreError("model.arch shapes_unet denoises autoencoder latents: set model.latent_factor (4)")
    torch.manual_seed(seed)
    vae = shapes_autoencoder(image_size, latent_factor, latent_channels, ae_width)
    tokenizer = shapes_tokenizer()
    text_encoder = shapes_text_encoder(tokenizer, text_dim, text_layers, projection=False, embed_std=text_embed_std)
    w = unet_width
    top = "CrossAttn" if top_attention else ""
    unet = UNet2DConditionModel(
        sample_size=image_size // latent_factor, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=1, block_out_channels=(w, 2 * w, 2 * w),
        down_block_types=(f"{top}DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", f"{top}UpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def latent_shape(pipe) -> tuple[int, int, int]:
    """(channels, height, width) of what a shapes-world pipeline's denoiser sees."""
    if isinstance(pipe, ShapesFlowPipeline):
        return pipe.latent_shape
    side = int(pipe.unet.config.sample_size)
    return int(pipe.unet.config.in_channels), side, side


MIN_SIGMA = 0.05  # x-prediction: the velocity divides by sigma, clamped here (as JiT does)


class ShapesFlowPipeline(DiffusionPipeline):
    """Pixel-space text-to-image flow matching: x_sigma = (1 - sigma) * image + sigma * noise, sampled by integrating
    the velocity noise - image from sigma = 1 to 0 with the flow-matching Euler scheduler.

    With `prediction="x"` (the default) the transformer predicts the clean image and the velocity is
    (x_sigma - image) / sigma: a 64 px image in 8 px patches gives 192 numbers per token, and predicting noise (or the
    velocity) at that width fails where predicting the clean image, which lies on a low-dimensional manifold, works
    (Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025). `prediction="v"` is SD3's."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, text_encoder, tokenizer, vae=None, prediction: str = "x"):
        super().__init__()
        if prediction not in ("x", "v"):
            raise SpatialScoreError(f"prediction must be 'x' or 'v', got {prediction!r}")
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(prediction=prediction)

    @property
    def image_size(self) -> int:
        return int(self.vae.config.sample_size if self.vae is not None else self.transformer.config.sample_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the transformer denoises: pixels, or the autoencoder's latents."""
        side = int(self.transformer.config.sample_size)
        return int(self.transformer.config.in_channels), side, side

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> what the transformer denoises (the latent mean, normalised by the
        autoencoder's shift and scaling factors, as SD3 does)."""
        x = images.float() * 2 - 1
        if self.vae is None:
            return x
        vae = self.vae
        latents = vae.encode(x.to(vae.dtype)).latent_dist.mode().float()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """What the transformer denoises -> images [B, 3, H, W] in [0, 1]."""
        if self.vae is not None:
            vae = self.vae
            latents = (latents.float() / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)
            latents = vae.decode(latents).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states [B, L, D], pooled [B, D]); gradients flow when the text encoder trains."""
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                               return_tensors="pt")
        device = self.text_encoder.device
        return text_states(self.text_encoder, batch.input_ids.to(device), batch.attention_mask.to(device))

    def predict(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """Velocity at noise level `sigma` ([B] or scalar, in [0, 1])."""
        return self.velocity(self.transformer, latents, sigma, embeds, pooled)

    def velocity(self, transformer, latents, sigma, embeds, pooled) -> torch.Tensor:
        """`transformer` (this pipeline's, or a wrapped / adapted one) turned into a velocity."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        timestep = (sigma * self.scheduler.config.num_train_timesteps).expand(latents.shape[0]).to(latents.dtype)
        out = transformer(hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
                          timestep=timestep).sample
        if self.config.prediction == "v":
            return out
        s = sigma.clamp(min=MIN_SIGMA).view(-1, *([1] * (latents.ndim - 1))) if sigma.ndim else sigma.clamp(min=MIN_SIGMA)
        return (latents.float() - out.float()) / s

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, pooled = self.encode_prompt(prompts)
        if guidance_scale > 1:
            neg, neg_pooled = self.encode_prompt([""] * len(prompts))
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        device, dtype = self.transformer.device, self.transformer.dtype
        if latents is None:
            latents = torch.randn((len(prompts), *self.latent_shape), generator=generator, device="cpu")
        latents = latents.to(device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if guidance_scale > 1 else latents
            sigma = t.float() / self.scheduler.config.num_train_timesteps
            velocity = self.velocity(self.transformer, model_in, sigma, embeds, pooled)
            if guidance_scale > 1:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        images = self.to_images(latents)
        if output_type == "pt":
            result = images
        else:
            arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
            result = self.numpy_to_pil(arrays) if output_type == "pil" else arrays
        return ImagePipelineOutput(images=result) if return_dict else (result,)


PIPELINES = {"ShapesFlowPipeline": ShapesFlowPipeline}


def rebuilt(pipe, **components):
    """The same kind of pipeline with some components swapped, keeping the pipeline's own settings: a
    ShapesFlowPipeline's `prediction` (a base that predicts the velocity would otherwise come back predicting the
    clean image, and sample garbage), a StableDiffusionPipeline without its safety checker."""
    from diffusers import StableDiffusionPipeline

    settings = {}
    if isinstance(pipe, ShapesFlowPipeline):
        settings["prediction"] = pipe.config.prediction
    elif isinstance(pipe, StableDiffusionPipeline):
        settings["requires_safety_checker"] = False
    return type(pipe)(**{**pipe.components, **components}, **settings)


def pipeline_class_name(path: str | Path) -> str:
    """The `_class_name` a pipeline directory's model_index.json names, or a clear error."""
    index = Path(path) / "model_index.json"
    if not Path(path).is_dir():
        raise SpatialScoreError(f"{path}: no such pipeline directory")
    if not index.is_file():
        raise SpatialScoreError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise SpatialScoreError(f"{index}: unreadable model_index.json ({err})") from None


class FlowPolicy:
    """What policy-gradient RL needs from a pipeline (here a flow-matching one; DDIMPolicy for UNets). `denoiser` is
    the module LoRA wraps and the trainer prepares (DDP / DeepSpeed); the trainer may swap in the wrapped module,
    which `predict` then calls. Conditions are dicts of tensors with the batch first, so `select` can slice them."""

    def __init__(self, pipe, guidance_scale: float = 1.0, denoiser=None):
        self.pipe, self.guidance_scale = pipe, guidance_scale
        self.denoiser = denoiser if denoiser is not None else pipe.transformer

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    noise_field = "noise_level"  # which sample.* setting sets the sampler's randomness

    def schedule(self, steps: int, noise: float):
        """The stochastic sampler RL trains through (train/sde.py): here Flow-GRPO's SDE with noise level `noise`."""
        from spatialscore.train.sde import FlowSchedule

        return FlowSchedule(self.sigmas(steps), noise)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The schedule's noise levels, decreasing from ~1 to a final 0: [steps + 1]."""
        scheduler = copy_scheduler(self.pipe.scheduler)
        scheduler.set_timesteps(steps, **self._timestep_kwargs())
        return scheduler.sigmas.float().cpu()

    def _timestep_kwargs(self) -> dict:
        return {}

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, time: torch.Tensor, cond: dict[str, torch.Tensor],
                denoiser=None) -> torch.Tensor:
        """The model's output at the schedule's time (a velocity here, at noise level sigma), guided when asked."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> the latents the model denoises (offline training: Diffusion-DPO)."""
        raise NotImplementedError

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        """(noisy latents, model time, regression target) at training times drawn from `u` ~ U(0, 1) [B]: for flow
        matching sigma = u, x = (1 - sigma) x0 + sigma noise, target = noise - x0 (the velocity)."""
        sigma = u.view(-1, *([1] * (latents.ndim - 1)))
        return (1 - sigma) * latents + sigma * noise, u, noise - latents

    @staticmethod
    def select(cond: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in cond.items()}

    def _guided(self, forward, latents: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """forward(latents, cond-part) with classifier-free guidance when the scale is > 1 (one doubled batch)."""
        if self.guidance_scale <= 1:
            return forward(latents, {k: v for k, v in cond.items() if not k.startswith("neg_")})
        both = {k: torch.cat([cond["neg_" + k], v]) for k, v in cond.items() if not k.startswith("neg_")}
        uncond, guided = forward(torch.cat([latents, latents]), both).chunk(2)
        return uncond + self.guidance_scale * (guided - uncond)


def copy_scheduler(scheduler):
    return type(scheduler).from_config(scheduler.config)


class ShapesFlowPolicy(FlowPolicy):
    @property
    def image_size(self) -> int:
        return self.pipe.image_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = self.pipe.encode_prompt(prompts)
        cond = {"embeds": embeds, "pooled": pooled}
        if self.guidance_scale > 1:
            neg, neg_pooled = self.pipe.encode_prompt([""] * len(prompts))
            cond |= {"neg_embeds": neg, "neg_pooled": neg_pooled}
        return cond

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.pipe.latent_shape), generator=generator)

    def predict(self, latents, sigma, cond, denoiser=None):
        model = denoiser or self.denoiser

        def forward(x, c):
            return self.pipe.velocity(model, x, sigma, c["embeds"], c["pooled"])

        return self._guided(forward, latents, cond)

    @torch.no_grad()
    def decode(self, latents):
        return self.pipe.to_images(latents)

    @torch.no_grad()
    def encode_images(self, images):
        return self.pipe.encode_images(_resized(images, self.image_size))


@torch.no_grad()
def _vae_encode(pipe, images: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents; `shift`: subtract the VAE's shift factor (SD3, FLUX; SD1.5 has none and
    its pipeline ignores one)."""
    vae = pipe.vae
    latents = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mean.float()
    return (latents - ((vae.config.shift_factor or 0.0) if shift else 0.0)) * vae.config.scaling_factor


def _vae_decode(pipe, latents: torch.Tensor, shift: bool = True) -> torch.Tensor:
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + ((vae.config.shift_factor or 0.0) if shift else 0.0)
    return (vae.decode(latents, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


class SD3Policy(FlowPolicy):
    """StableDiffusion3Pipeline (SD3, SD3.5): CLIP-L + CLIP-G (+ T5) prompt encodings, latents through the VAE."""

    def __init__(self, pipe, guidance_scale: float = 1.0, image_size: int = 0):
        super().__init__(pipe, guidance_scale)
        self.image_size = image_size or pipe.default_sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def encode(self, prompts):
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=self.guidance_scale > 1,
            device=self.pipe.transformer.device)
        cond = {"embeds": embeds, "pooled": pooled}
        if self.guidance_scale > 1:
            cond |= {"neg_embeds": neg, "neg_pooled": neg_pooled}
        return cond

    def _latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.pipe.vae_scale_factor
        return self.pipe.transformer.config.in_channels, side, side

    def _timestep_kwargs(self) -> dict:
        if not self.pipe.scheduler.config.get("use_dynamic_shifting"):
            return {}
        _, h, w = self._latent_shape()
        patch = self.pipe.transformer.config.patch_size
        return {"mu": _shift_mu(self.pipe.scheduler, (h // patch) * (w // patch))}

    def initial_noise(self, n, generator):
        return torch.randn((n, *self._latent_shape()), generator=generator)

    def predict(self, latents, sigma, cond, denoiser=None):
        model = denoiser or self.denoiser
        dtype = self.pipe.transformer.dtype

        def forward(x, c):
            t = (torch.as_tensor(sigma, dtype=torch.float32) * 1000).expand(x.shape[0])
            return model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=c["embeds"],
                         pooled_projections=c["pooled"], return_dict=False)[0].float()

        return self._guided(forward, latents, cond)

    @torch.no_grad()
    def decode(self, latents):
        return _vae_decode(self.pipe, latents)

    def encode_images(self, images):
        return _vae_encode(self.pipe, _resized(images, self.image_size))


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def _shift_mu(scheduler, image_seq_len: int) -> float:
    """The resolution-dependent timestep shift of FLUX (and SD3 with dynamic shifting), as their pipelines compute."""
    c = scheduler.config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


class FluxPolicy(FlowPolicy):
    """FluxPipeline (FLUX.1): CLIP pooled + T5 prompt encodings, 2x2-packed latents, guidance distilled into an
    embedding (`guidance_scale` goes there; no doubled batch)."""

    def __init__(self, pipe, guidance_scale: float = 3.5, image_size: int = 0, max_sequence_length: int = 512):
        super().__init__(pipe, guidance_scale)
        self.image_size = image_size or pipe.default_sample_size * pipe.vae_scale_factor
        self.max_sequence_length = max_sequence_length
        self.text_ids = None

    @torch.no_grad()
    def encode(self, prompts):
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                                           device=self.pipe.transformer.device,
                                                           max_sequence_length=self.max_sequence_length)
        self.text_ids = text_ids  # [L, 3], the same for every prompt
        return {"embeds": embeds, "pooled": pooled}

    def _grid(self) -> int:
        return 2 * (self.image_size // (self.pipe.vae_scale_factor * 2))

    def sigmas(self, steps):
        import numpy as np

        scheduler = copy_scheduler(self.pipe.scheduler)
        side = self._grid() // 2
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=_shift_mu(scheduler, side * side))
        return scheduler.sigmas.float().cpu()

    def initial_noise(self, n, generator):
        channels, grid = self.pipe.transformer.config.in_channels // 4, self._grid()
        noise = torch.randn((n, channels, grid, grid), generator=generator)
        return self.pipe._pack_latents(noise, n, channels, grid, grid)

    def predict(self, latents, sigma, cond, denoiser=None):
        model = denoiser or self.denoiser
        dtype = self.pipe.transformer.dtype
        n, grid = latents.shape[0], self._grid()
        image_ids = self.pipe._prepare_latent_image_ids(n, grid // 2, grid // 2, latents.device, dtype)
        guidance = (torch.full((n,), self.guidance_scale, dtype=torch.float32)
                    if self.pipe.transformer.config.guidance_embeds else None)
        t = torch.as_tensor(sigma, dtype=torch.float32).expand(n)
        return model(hidden_states=latents.to(dtype), timestep=t, guidance=guidance,
                     pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"], txt_ids=self.text_ids,
                     img_ids=image_ids, return_dict=False)[0].float()

    @torch.no_grad()
    def decode(self, latents):
        unpacked = self.pipe._unpack_latents(latents, self.image_size, self.image_size, self.pipe.vae_scale_factor)
        return _vae_decode(self.pipe, unpacked)

    def encode_images(self, images):
        latents = _vae_encode(self.pipe, _resized(images, self.image_size))
        n, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, n, c, h, w)


class DDIMPolicy(FlowPolicy):
    """StableDiffusionPipeline-style UNets (SD1.5) for DDPO: epsilon prediction at integer timesteps, DDIM steps
    with eta-scaled noise, latents through the VAE."""

    noise_field = "eta"

    def __init__(self, pipe, guidance_scale: float = 5.0, image_size: int = 0):
        super().__init__(pipe, guidance_scale, pipe.unet)
        self.image_size = image_size or pipe.unet.config.sample_size * pipe.vae_scale_factor

    def schedule(self, steps: int, noise: float):
        from spatialscore.train.sde import DDIMSchedule

        scheduler = copy_scheduler(self.pipe.scheduler)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.cpu()
        alphas = scheduler.alphas_cumprod.float().cpu()
        previous = timesteps - scheduler.config.num_train_timesteps // steps
        final = alphas.new_tensor(1.0) if scheduler.config.set_alpha_to_one else alphas[0]
        alphas_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], final)
        return DDIMSchedule(timesteps, alphas[timesteps], alphas_prev, noise)

    @torch.no_grad()
    def encode(self, prompts):
        embeds, neg = self.pipe.encode_prompt(list(prompts), self.pipe.unet.device, 1, self.guidance_scale > 1)
        return {"embeds": embeds, **({"neg_embeds": neg} if self.guidance_scale > 1 else {})}

    def initial_noise(self, n, generator):
        side = self.image_size // self.pipe.vae_scale_factor
        return torch.randn((n, self.pipe.unet.config.in_channels, side, side), generator=generator)

    def predict(self, latents, timestep, cond, denoiser=None):
        model = denoiser or self.denoiser
        dtype = self.pipe.unet.dtype

        def forward(x, c):
            t = torch.as_tensor(timestep).expand(x.shape[0])
            return model(x.to(dtype), t, encoder_hidden_states=c["embeds"], return_dict=False)[0].float()

        return self._guided(forward, latents, cond)

    @torch.no_grad()
    def decode(self, latents):
        return _vae_decode(self.pipe, latents, shift=False)

    def encode_images(self, images):
        return _vae_encode(self.pipe, _resized(images, self.image_size), shift=False)

    def noised(self, latents, noise, u):
        """DDPM forward process at integer timesteps t = floor(u * T): x = sqrt(a) x0 + sqrt(1 - a) noise; the model
        predicts the noise."""
        steps = self.pipe.scheduler.config.num_train_timesteps
        t = (u * steps).long().clamp(max=steps - 1)
        a = self.pipe.scheduler.alphas_cumprod.float()[t].view(-1, *([1] * (latents.ndim - 1)))
        return a.sqrt() * latents + (1 - a).sqrt() * noise, t, noise


def policy_for(pipe, guidance_scale: float, image_size: int = 0) -> FlowPolicy:
    """The policy view of any supported pipeline."""
    from diffusers import StableDiffusionPipeline

    if isinstance(pipe, StableDiffusionPipeline):
        return DDIMPolicy(pipe, guidance_scale, image_size)
    return flow_policy(pipe, guidance_scale, image_size)


def flow_policy(pipe, guidance_scale: float = 1.0, image_size: int = 0) -> FlowPolicy:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if isinstance(pipe, ShapesFlowPipeline):
        return ShapesFlowPolicy(pipe, guidance_scale)
    if isinstance(pipe, StableDiffusion3Pipeline):
        return SD3Policy(pipe, guidance_scale, image_size)
    if isinstance(pipe, FluxPipeline):
        return FluxPolicy(pipe, guidance_scale, image_size)
    raise SpatialScoreError(f"Flow-GRPO needs a flow-matching pipeline (ShapesFlowPipeline, StableDiffusion3Pipeline, "
                            f"FluxPipeline); got {type(pipe).__name__}")


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=32, shift_factor=0.0609,
                         scaling_factor=1.5035)


def _tiny_clip(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_t5():
    """A T5 encoder and a word-level fast tokenizer for it (real T5 tokenizers need a downloaded sentencepiece file)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = shapes_tokenizer()
    tokenizer.model_max_length = 77
    model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                    num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id))
    return tokenizer, model


def tiny_pipeline(arch: str):
    """A tiny random pipeline of a named architecture, in eval mode like a loaded one (see _tiny_pipeline)."""
    pipe = _tiny_pipeline(arch)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # a freshly built T5 or CLIP would otherwise apply dropout
    return pipe


def _tiny_pipeline(arch: str):
    """A tiny random pipeline of a named architecture, built in code (tests, CI, benchmarks): the shapes generator,
    SD3 (two CLIP towers, no T5, 32 px through a 2x VAE), FLUX (CLIP + T5, guidance embedding, packed latents) or
    SD1.5 (a cross-attention UNet with DDIM, 32 px through the VAE)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusion3Pipeline

    from spatialscore.heads import learned

    def tiny_clip_tokenizer():
        tokenizer = learned.tiny_clip_tokenizer()
        tokenizer.model_max_length = 77
        return tokenizer

    torch.manual_seed(0)
    if arch == "shapes_flow":
        return shapes_flow_pipeline(image_size=32, patch_size=8, layers=1, heads=2, head_dim=16, text_dim=32,
                                    text_layers=1)
    if arch == "shapes_latent":
        return shapes_flow_pipeline(image_size=32, patch_size=2, layers=1, heads=2, head_dim=16, text_dim=32,
                                    text_layers=1, latent_factor=4, ae_width=8)
    if arch == "sd3":
        tokenizer = tiny_clip_tokenizer()
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(),
            text_encoder=_tiny_clip(tokenizer, True), tokenizer=tokenizer,
            text_encoder_2=_tiny_clip(tokenizer, True), tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)
        return pipe
    if arch == "flux":
        tokenizer = tiny_clip_tokenizer()
        t5_tokenizer, t5 = _tiny_t5()
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
        pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(), text_encoder=_tiny_clip(tokenizer, False),
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
        pipe.default_sample_size = 16  # 32 px images (a real FLUX defaults to 1024)
        return pipe
    if arch == "sd15":
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        tokenizer = tiny_clip_tokenizer()
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=_tiny_clip(tokenizer, False), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    raise SpatialScoreError(f"model.tiny: no tiny {arch!r} pipeline (shapes_flow, shapes_latent, sd3, flux, sd15)")


FLOW_PIPELINES = ("ShapesFlowPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
UNET_PIPELINES = ("StableDiffusionPipeline",)


def check_pipeline_kind(path: str | Path, field: str, kinds: tuple[str, ...], algorithm: str) -> str:
    """The class a pipeline directory holds, if it is one of `kinds`; else an error naming the field (no weights
    are read)."""
    try:
        name = pipeline_class_name(path)
    except SpatialScoreError as err:
        raise SpatialScoreError(f"{field}: {err}") from None
    if name not in kinds:
        raise SpatialScoreError(f"{field}: {path} holds a {name}; {algorithm} trains {', '.join(kinds)}")
    return name


def load_pipeline_dir(path: str | Path, field: str, kinds: tuple[str, ...], algorithm: str,
                      dtype: torch.dtype = torch.float32):
    """A local pipeline directory (never downloaded) whose class is one of `kinds`, in `dtype` (the zoo stores fp16),
    or an error naming the field."""
    name = check_pipeline_kind(path, field, kinds, algorithm)
    if name == "ShapesFlowPipeline":
        return ShapesFlowPipeline.from_pretrained(str(path), dtype=dtype)
    import diffusers

    kwargs = {"safety_checker": None, "requires_safety_checker": False} if name == "StableDiffusionPipeline" else {}
    return getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, dtype=dtype, **kwargs)


def load_flow_pipeline(path: str | Path, field: str):
    return load_pipeline_dir(path, field, FLOW_PIPELINES, "Flow-GRPO")
