"""KV cache: one preallocated key/value array pair per layer, written in place.

The cache is a plain pytree, so it can be donated to `jax.jit` (XLA then updates it in place)
and carried through the decode loop. Slots are absolute positions in the padded sequence: prompts
are left-padded, so row `b`'s first real token sits at slot `start[b]` and every row writes
its next token at the same slot index, which keeps the update a single `dynamic_update_slice`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cfjax.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, each `[B, n_kv_heads, S, head_dim]`.

    Head-major, so the decode step's attention contracts each head's `[S, head_dim]` block in
    place: a slot-major cache would be transposed (copied whole) by every layer at every step.
    """

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def length(self) -> int:
        """Number of slots S."""
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        """Number of rows B."""
        return self.k[0].shape[0]


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """Zeroed cache for `batch` rows of `length` slots."""
    shape = (batch, config.n_kv_heads, length, config.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(config.n_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(config.n_layers)],
    )


def write(layer_cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write `new` `[B, KV, T, D]` at slots `[index, index + T)` of one layer's cache."""
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(
        layer_cache,
        new.astype(layer_cache.dtype),
        (zero, zero, jnp.asarray(index, jnp.int32), zero),
    )
