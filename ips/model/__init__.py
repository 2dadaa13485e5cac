"""The model: encoders, cross-attention aggregator, task heads, and checkpoints of a model with its config."""

from ips.model.ips_model import IPSModel, build_model, pixel_stats

__all__ = ["IPSModel", "build_model", "pixel_stats"]
