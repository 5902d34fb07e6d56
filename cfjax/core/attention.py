"""Attention over the KV cache, batch-invariant, in one form per backend (DESIGN.md §3).

The prefill, the decode step and the speculative scoring pass all attend through
`cached_attention`, so factual, counterfactual, resumed, abducted and speculative runs round
alike on a backend; every sum is in a fixed order (`invariant`) and every dot of a shape
measured to round a row alike whatever the batch (`invariant.row_tiles`), so a row's attention
does not depend on its batch or on how many cache slots other rows needed.
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


# XLA:CPU rounds a dot's entries alike for every count of cache slots up to this many, and
# otherwise from 640 on (measured at SmolLM2's head shapes): longer caches are scored in chunks.
SCORE_SLOTS = 512
PREFILL_SLOTS = 128  # the slots of every score dot of the prefill (keys zero-padded to them)


def attention_tiles(q, keys, values, mask, scale):
    """The CPU's form, float32. The scores are dots: XLA:CPU rounds a dot's row alike for every
    row count in 2..`invariant.ROWS`, so the query rows (heads x positions) go in
    `invariant.row_tiles`, each tile scored against chunks of at most `SCORE_SLOTS` slots (a
    SmolLM2 batch-64 decode step: 335-342 -> 277-296 ms against the tree of products, which wrote a
    `[B, KV, G, T, D, S]` product out whole). The weighted values are multiply-and-sums in
    `invariant.slot_sum`'s order over the cache as it lies (a dot over slot blocks made XLA copy
    the value cache around the decode loop). Batch-variant, the products and XLA's own sums.

    The prefill (`invariant.fixed_rows`: tiles of exactly 64 rows) takes dots of one shape
    throughout: scores against the keys zero-padded to chunks of `PREFILL_SLOTS` (a 64-row
    dot's rounding moved with its slot count), and the weighted values as slot-block dots
    (`_block_dots`), whose products the decode's form would write out whole for every position.
    An attribution sweep's prefill (42 edited prompts): 5.7 -> 3.0 s."""
    f32 = jnp.float32
    b, kv, g, t, d = q.shape
    s = keys.shape[-1]
    q, keys = q.astype(f32), keys.astype(f32)
    weighted = lambda e: invariant.slot_sum(invariant.rounded(e[..., None] * values[:, :, None, None].astype(f32)), -2)  # noqa: E731  # fmt: skip
    if not invariant.enabled():  # XLA's own reduce of the products: faster than a dot here
        return _softmax_weighted(jnp.sum(q[..., None] * keys[:, :, None, None], -2), mask, scale, weighted)  # fmt: skip
    fixed, chunk = invariant.fixed_rows(), SCORE_SLOTS
    if fixed is not None:  # the prefill
        weighted = lambda e: _block_dots(e, values.astype(f32), fixed)  # noqa: E731
        chunk = PREFILL_SLOTS
        keys = jnp.pad(keys, [(0, 0)] * 3 + [(0, -s % chunk)])

    def scores_of(tile):  # [B, KV, R, D] -> [B, KV, R, S]
        parts = [jnp.einsum("bkrd,bkds->bkrs", tile, keys[..., i : i + chunk]) for i in range(0, s, chunk)]  # fmt: skip
        return jnp.concatenate(parts, -1)[..., :s]

    scores = invariant.row_tiles(scores_of, q.reshape(b, kv, g * t, d), 2, fixed)
    return _softmax_weighted(scores.reshape(b, kv, g, t, s), mask, scale, weighted)


def _block_dots(e, values, fixed: int):
    """The weighted values of the CPU's prefill: per block of `invariant.BLOCK` slots a dot of
    the weights' rows (heads x positions, in tiles of `fixed` rows) with the block's values,
    the blocks added in slot order. The prefill has many query rows: the products of the
    decode's form would be written out whole (`[B, KV, G, T, S, D]`)."""
    b, kv, g, t, s = e.shape
    blocks = invariant.slot_blocks(values, 2)  # [B, KV, N, BLOCK, D]
    rows = invariant.slot_blocks(e.reshape(b, kv, g * t, s), 3)  # [B, KV, R, N, BLOCK]

    def tile(r):  # [B, KV, R', N, BLOCK] -> [B, KV, R', D]
        return invariant.in_order(jnp.einsum("bkrnc,bkncd->bknrd", r, blocks), 2)

    return invariant.row_tiles(tile, rows, 2, fixed).reshape(b, kv, g, t, -1)


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


# A long prefill's queries go in one block per CAUSAL_MIN positions, up to CAUSAL_BLOCKS
# blocks, each attending over the slots up to its last query only (`causal_attention`). A
# block is more program to compile (~6 s more for SmolLM2 on XLA:CPU) and saves a share of an
# attention that grows as the square of the prompt: only long prompts split, and the longer
# the finer (benchmarks/RESULTS.md).
CAUSAL_BLOCKS, CAUSAL_MIN = 4, 512


def causal_attention(q, keys, values, mask, scale, first: int) -> jax.Array:
    """`cached_attention` of the queries `[B, KV, G, T, D]` of a prefill written from the static
    slot `first`: query t sees slots up to `first + t` only, so the slots from `first + T` on
    are left out (the prefill attends over its own tokens, not the whole cache), and on the CPU
    a long prefill's queries go in blocks (whole `PREFILL_SLOTS`), each attending over the slots
    up to its own last query: the slots it leaves out are masked for every query of the block,
    and would only add exact zeros to its sums (`invariant.slot_sum`, `_block_dots`; a max is
    exact in any order), so every bit is the one block's over all slots. Saves 1/4 (two blocks)
    to 3/8 (four) of the attention. A prefill's queries each see slot 0 (it is anchored there);
    a query that sees no slot (the draft's left padding, which no real query sees) gets another
    meaningless mean of the values."""
    t = q.shape[3]
    keys, values = keys[..., : first + t], values[:, :, : first + t]
    blocks = min(CAUSAL_BLOCKS, t // CAUSAL_MIN)
    if blocks < 2 or not (invariant.on_cpu() and invariant.enabled()):
        return cached_attention(q, keys, values, mask, scale)
    size = -(-t // (blocks * PREFILL_SLOTS)) * PREFILL_SLOTS
    parts = []
    for low in range(0, t, size):
        high = min(t, low + size)
        s = first + high
        parts.append(cached_attention(q[:, :, :, low:high], keys[..., :s], values[:, :, :s],
                                      mask[..., low:high, :s], scale))  # fmt: skip
    return jnp.concatenate(parts, 3)


def cached_attention(q, keys, values, mask, scale) -> jax.Array:
    """Attention of queries `[B, KV, G, T, D]` over the cache (keys `[B, KV, D, S]`, values
    `[B, KV, S, D]`, `mask` broadcastable to `[B, KV, G, T, S]`): float32 `[B, KV, G, T, D]`.

    One function for the prefill, the decode step and the speculative scoring pass, in a form
    per backend (`invariant.on_cpu`, chosen while tracing): float32 score dots in row tiles and
    multiply-and-sums on the CPU, cache-dtype dots with float32 accumulation elsewhere.
    Factual, counterfactual, resumed and abducted runs all take the same form on a backend.
    """
    form = attention_tiles if invariant.on_cpu() else attention_dots
    return form(q, keys, values, mask, scale)
