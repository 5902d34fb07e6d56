"""The host above the core: the `LM` handle, the cache stores, request helpers and the driver
that runs the core's decode kernel chunk by chunk. `cfjax.causal` builds on it."""

from cfjax.runtime.lm import LM, forward, quantize

__all__ = ["LM", "forward", "quantize"]
