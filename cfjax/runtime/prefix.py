"""Prefix reuse: a batch of prompts that share their first tokens with a reference prompt (the
edited prompts of an attribution sweep and the factual's prompt) prefills only what differs.

The prefill computes prompts anchored at slot 0, where a slot's keys and values are a function
of the tokens up to it alone, bit for bit (`kernel.fill`). So the reference is filled once (one
row; or taken from a stored cache that holds it), each row's cache starts as the reference's
first c slots (c: the tokens the row shares with it), and the rows fill the rest in rounds of
segments, each row from its own slot on; a round holds only the rows that still have slots to
fill, `ROWS` to a call (one compiled program), and a call computes at least
`invariant.FIXED_ROWS` token rows (the prefill's matmul tile: a lone row's segment is 64
slots). The result is the plain prefill's cache bit for bit, so a row's tokens are those of
its one-by-one run; what changes is the work: a sweep that edits each word of a 40-word prompt
fills about a third of the slots the plain prefill fills.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import invariant, kernel, model
from cfjax.core.cache import KEY_SLOT_AXIS, VALUE_SLOT_AXIS, KVCache, init_cache
from cfjax.core.config import LlamaConfig

SEGMENT = invariant.BLOCK // 2  # fewest slots a row fills per round
ROWS = 8  # rows a call fills, in every round: one compiled program
WORTH = 0.75  # reuse when it fills at most this share of the plain prefill's slots


@dataclasses.dataclass
class Reference:
    """A prompt the rows may share prefixes with and, where one is still kept, a cache of the
    same params that holds it: one row in the decode's layout, `tokens[:-1]` from slot `start`
    (a factual run's stored cache), so that the reference is not filled again."""

    tokens: list[int]
    cache: KVCache | None = None
    start: int = 0


def shared_lengths(prompts: Sequence[Sequence[int]], reference: Sequence[int]) -> np.ndarray:
    """Per prompt, how many of the prefilled tokens (`prompt[:-1]`) equal the reference's."""
    ref = np.asarray(reference[:-1], np.int64)
    out = []
    for p in prompts:
        mine = np.asarray(p[:-1], np.int64)
        n = min(len(mine), len(ref))
        differ = np.flatnonzero(mine[:n] != ref[:n])
        out.append(int(differ[0]) if len(differ) else n)
    return np.asarray(out, np.int32)


def call_shape(batch: int) -> tuple[int, int]:
    """(rows, slots per row) of every call of the fill of a batch of `batch` rows: up to `ROWS`
    rows, each filling `SEGMENT` slots or more, so that a call has at least one whole matmul
    tile of token rows (fewer would be padded to it)."""
    size = min(ROWS, 1 << max(batch - 1, 0).bit_length())
    return size, max(SEGMENT, invariant.FIXED_ROWS // size)


def rounds(shared: np.ndarray, lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The calls of the fill, in order: per call (the rows it computes, each row's first slot).
    Row b fills slots [shared[b], n_b - 1), a segment a round (`call_shape`); a round's rows go
    together, the last call padded by repeating a row, so that every call is one compiled
    program."""
    size, segment = call_shape(len(shared))
    todo = -(-(lengths - 1 - shared) // segment)  # rounds per row
    out = []
    for k in range(int(todo.max(initial=0))):
        active = np.flatnonzero(todo > k)
        for rows in np.array_split(active, -(-len(active) // size)):
            rows = np.concatenate([rows, np.full(size - len(rows), rows[0])]).astype(np.int32)
            out.append((rows, (shared[rows] + k * segment).astype(np.int32)))
    return out


@functools.partial(jax.jit, static_argnums=(0,))
def _reference(config: LlamaConfig, params, tokens: jax.Array) -> KVCache:
    """The anchored cache of one reference row `[1, W]`."""
    cache = init_cache(config, 1, tokens.shape[1], model.compute_dtype(params))
    return kernel.fill(config, params, tokens, 0, cache)


@functools.partial(jax.jit, static_argnums=(2,))
def _seed(reference: KVCache, shared: jax.Array, slots: int) -> KVCache:
    """Each row's anchored cache of `slots` slots: the reference's first `shared[b]` slots, zeros
    after."""

    def seed(x, axis):
        x = jax.lax.slice_in_dim(x, 0, min(slots, x.shape[axis]), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, slots - x.shape[axis])
        x = jnp.pad(x, pad)
        slot = jnp.arange(slots).reshape([slots if i == axis else 1 for i in range(x.ndim)])
        keep = slot < shared.reshape(-1, 1, 1, 1)
        return jnp.where(keep, x, jnp.zeros((), x.dtype))

    return KVCache([seed(x, KEY_SLOT_AXIS) for x in reference.k], [seed(x, VALUE_SLOT_AXIS) for x in reference.v])  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _fill_rows(config: LlamaConfig, params, cache: KVCache, rows, tokens, first) -> KVCache:
    """One call: `rows` fill a segment of slots each (`tokens [R, segment]`), row i from slot
    `first[i]` (`kernel.fill`)."""
    part = kernel.fill(config, params, tokens, first, jax.tree_util.tree_map(lambda x: x[rows], cache))  # fmt: skip
    return jax.tree_util.tree_map(lambda x, p: x.at[rows].set(p), cache, part)


_roll_in = jax.jit(kernel.roll_in, static_argnums=(0, 3, 4))
_shift = jax.jit(kernel.shift, static_argnums=(4,))


def prefill(config: LlamaConfig, params, prompts: Sequence[Sequence[int]], prompt: np.ndarray,
            lengths: np.ndarray, reference: Reference, length: int, window: int):  # fmt: skip
    """`kernel.prefill`'s (state, start) for the right-padded `prompt` `[B, P]`, reusing the
    prefix each row shares with the reference; None where that would not save enough work
    (`WORTH`), so the caller prefills as usual."""
    lengths = np.asarray(lengths, np.int32)
    tokens = list(reference.tokens)
    shared = shared_lengths(prompts, tokens)
    plan = rounds(shared, lengths)
    segment = call_shape(len(prompts))[1]
    slots = window + segment  # room for every round's segment
    own = 0 if reference.cache is not None else kernel.prefill_window(len(tokens), kernel.bucket_length(len(tokens)))  # fmt: skip
    if own + sum(len(rows) for rows, _ in plan) * segment > WORTH * len(prompts) * window:
        return None
    if reference.cache is not None:  # the kept cache, moved back to start at slot 0
        anchored = _shift(reference.cache, jnp.asarray([reference.start]), jnp.asarray([0]), jnp.asarray([len(tokens) - 1]), slots)  # fmt: skip
    else:
        ref = np.zeros((1, own), np.int32)
        ref[0, : len(tokens) - 1] = tokens[:-1]
        anchored = _reference(config, params, jnp.asarray(ref))
    cache = _seed(anchored, jnp.asarray(shared), slots)
    padded_tokens = np.pad(np.asarray(kernel.anchored(jnp.asarray(prompt), jnp.asarray(lengths))), ((0, 0), (0, slots)))  # fmt: skip
    for rows, first in plan:
        part = padded_tokens[rows[:, None], first[:, None] + np.arange(segment)[None, :]]
        cache = _fill_rows(config, params, cache, jnp.asarray(rows), jnp.asarray(part), jnp.asarray(first))  # fmt: skip
    cache, start = _roll_in(config, cache, jnp.asarray(lengths), prompt.shape[1], length)
    return kernel.initial_state(jnp.asarray(prompt), jnp.asarray(lengths), cache), start
