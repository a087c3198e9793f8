"""Reward-model architectures and their builders (shapes-world Relation Network, CLIP-style dual encoder,
Qwen2.5-VL with LoRA); `base.py` holds the shared interface, the Gaussian head and safetensors save/load."""
