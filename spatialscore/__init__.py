"""spatialscore: RLHF for spatial reward models."""

__version__ = "0.1.0"
