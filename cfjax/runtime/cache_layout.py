"""A run's KV cache in the shape the run needs: rows taken from stored caches, slots cut or padded.

Pure data movement (the slots kept hold the same keys and values), each a jitted call that makes
one new array the decode may donate, leaving its inputs as they were.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cfjax.core import spec
from cfjax.core.cache import KEY_SLOT_AXIS, VALUE_SLOT_AXIS, KVCache
from cfjax.core.config import LlamaConfig
from cfjax.core.kernel import State


@functools.partial(jax.jit, static_argnums=(1,))  # (a new shape: no buffer to donate into)
def resize(state: State, length: int) -> State:
    """The state with its cache cut or zero-padded to `length` slots (`fit`)."""
    return dataclasses.replace(state, cache=fit(state.cache, length))


@functools.partial(jax.jit, static_argnums=(0, 3))
def take_rows(config: LlamaConfig, caches: tuple[KVCache, ...], rows: jax.Array, length: int) -> KVCache:  # fmt: skip
    """Rows `rows` of the caches' concatenation (stored batches of one layout) as a new cache of
    `length` slots (`fit`): one copy, XLA fusing the concatenation and the cut into the take, so
    resuming rows of several stored batches reads each once and writes the run's cache once."""
    whole = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0], *caches)  # fmt: skip
    taken = jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), whole)
    return spec.constrain_cache(fit(taken, length), config)


def fit(cache: KVCache, length: int) -> KVCache:
    """The cache cut or zero-padded to `length` slots (the slots kept hold the same keys and
    values; new ones are masked until a step writes them)."""

    def cut_or_pad(x, axis):
        if x.shape[axis] >= length:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)

    return KVCache([cut_or_pad(x, KEY_SLOT_AXIS) for x in cache.k], [cut_or_pad(x, VALUE_SLOT_AXIS) for x in cache.v])  # fmt: skip
