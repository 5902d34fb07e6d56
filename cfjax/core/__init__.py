"""The functional core: config, the network, the KV cache, the sampling SCM and the engine.

Pure functions over pytrees; nothing here imports the rest of cfjax. `sample` is the unit:
one row, usable under `jax.jit` and `jax.vmap` (keys, sampler values, prompts, forced tokens,
noise, params) and inside a user's own jitted code.
"""

from cfjax.core.config import LlamaConfig, RopeScaling, preset
from cfjax.core.engine import Sampled, bucket_length, sample
from cfjax.core.lm import LM, forward, quantize
from cfjax.core.scm import Sampler
from cfjax.core.speculative import Draft
from cfjax.core.steering import steer

__all__ = [
    "Draft",
    "LM",
    "LlamaConfig",
    "RopeScaling",
    "Sampled",
    "Sampler",
    "bucket_length",
    "forward",
    "preset",
    "quantize",
    "sample",
    "steer",
]
