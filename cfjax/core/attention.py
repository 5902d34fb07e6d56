"""Attention over the KV cache, batch-invariant, in one form per backend (DESIGN.md §3).

The prefill, the decode step and the speculative scoring pass all attend through
`cached_attention`, so factual, counterfactual, resumed, abducted and speculative runs round
alike on a backend; every sum is in a fixed order (`invariant`), so a row's attention does not
depend on its batch or on how many cache slots other rows needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import invariant

NEG = float(np.finfo(np.float32).min)


def _softmax_weighted(scores, mask, scale, weighted_sum) -> jax.Array:
    """Softmax-weighted values: `weighted_sum(e)` times 1 / `slot_sum(e)`, e = exp(score -
    max), masked slots exactly 0. The max is exact in any order, so the sums fix every bit (a
    product by the reciprocal, which XLA would otherwise make of a division in some programs
    only)."""
    scores = jnp.where(mask, invariant.rounded(scores * scale), NEG)
    e = jnp.exp(scores - invariant.tree_max(scores)[..., None])
    return weighted_sum(e) * (1 / invariant.slot_sum(e, -1))[..., None]


def attention_sums(q, keys, values, mask, scale):
    """The CPU's form: float32 multiply-and-sums over the cache as it lies, summed in the fixed
    orders of `invariant` (each reduction over a non-minor axis: XLA:CPU fuses a product and
    its sums into one vectorised pass over each K/V block, where a dot copied the cache)."""
    f32 = jnp.float32
    scores = invariant.tree_sum(invariant.rounded(q.astype(f32)[..., None] * keys[:, :, None, None].astype(f32)), -2)  # fmt: skip
    weighted = lambda e: invariant.slot_sum(invariant.rounded(e[..., None] * values[:, :, None, None].astype(f32)), -2)  # noqa: E731  # fmt: skip
    return _softmax_weighted(scores, mask, scale, weighted)


def attention_dots(q, keys, values, mask, scale):
    """The accelerators' form: dots that read the cache in its stored dtype and accumulate in
    float32 (`preferred_element_type`), no float32 copy of the cache. Each dot contracts a
    fixed length (the head, or one block of `invariant.BLOCK` slots); blocks are summed in slot
    order, as in the CPU's form."""
    f32 = jnp.float32
    scores = jnp.einsum("bkgtd,bkds->bkgts", q.astype(keys.dtype), keys, preferred_element_type=f32)  # fmt: skip

    def weighted(e):
        if not invariant.enabled():  # one dot over every slot
            return jnp.einsum("bkgts,bksd->bkgtd", e.astype(values.dtype), values, preferred_element_type=f32)  # fmt: skip
        e = invariant.slot_blocks(e.astype(values.dtype), -1)  # [B, KV, G, T, N, BLOCK]
        blocks = invariant.slot_blocks(values, 2)  # [B, KV, N, BLOCK, D]
        partial = jnp.einsum("bkgtnc,bkncd->bkgtnd", e, blocks, preferred_element_type=f32)
        return invariant.in_order(partial, -2)

    return _softmax_weighted(scores, mask, scale, weighted)


def cached_attention(q, keys, values, mask, scale) -> jax.Array:
    """Attention of queries `[B, KV, G, T, D]` over the cache (keys `[B, KV, D, S]`, values
    `[B, KV, S, D]`, `mask` broadcastable to `[B, KV, G, T, S]`): float32 `[B, KV, G, T, D]`.

    One function for the prefill, the decode step and the speculative scoring pass, in a form
    per backend (`invariant.on_cpu`, chosen while tracing): float32 multiply-and-sums on
    the CPU, cache-dtype dots with float32 accumulation elsewhere. Factual, counterfactual,
    resumed and abducted runs all take the same form on a given backend.
    """
    form = attention_sums if invariant.on_cpu() else attention_dots
    return form(q, keys, values, mask, scale)
