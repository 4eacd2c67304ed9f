"""Recipes that chain transforms, fine-tuning and before/after measurement."""

from slimtorch.pipeline.compress import CompressResult, compress_run, measure_model

__all__ = ["CompressResult", "compress_run", "measure_model"]
