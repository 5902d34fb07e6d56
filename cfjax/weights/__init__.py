"""Weights: Meta .pth, HF safetensors and GGUF readers, the orbax checkpoint, load and convert."""

from cfjax.weights.loader import KNOWN_MODELS, convert, list_models, load, model_location, save

__all__ = ["KNOWN_MODELS", "convert", "list_models", "load", "model_location", "save"]
