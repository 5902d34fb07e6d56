"""cfjax: counterfactual token generation with a JAX/Flax NNX Llama port."""

from cfjax.config import LlamaConfig, RopeScaling, preset
from cfjax.lm import LM, forward
from cfjax.weights import load

__all__ = ["LM", "LlamaConfig", "RopeScaling", "forward", "load", "preset"]
