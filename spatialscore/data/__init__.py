"""Data: the shapes world (scenes, renderer, prompts, perturbations, oracle), formats, loaders and validation."""
