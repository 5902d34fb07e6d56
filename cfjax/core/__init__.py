"""The functional core: config, the network, the KV cache, the sampling SCM and the decode kernel.

Pure functions over pytrees; nothing here imports the rest of cfjax or holds host state.
`sample` is the unit: one row, usable under `jax.jit` and `jax.vmap` (keys, sampler values,
prompts, forced tokens, noise, params) and inside a user's own jitted code.
"""

from cfjax.core.config import LlamaConfig, RopeScaling, preset
from cfjax.core.decode import Sampled, sample
from cfjax.core.kernel import bucket_length
from cfjax.core.scm import Sampler
from cfjax.core.speculative import Draft
from cfjax.core.steering import steer

__all__ = [
    "Draft",
    "LlamaConfig",
    "RopeScaling",
    "Sampled",
    "Sampler",
    "bucket_length",
    "preset",
    "sample",
    "steer",
]
