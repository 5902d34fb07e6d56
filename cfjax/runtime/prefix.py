"""Prefix reuse: a batch of prompts that share their first tokens with a reference prompt (the
edited prompts of an attribution sweep and the factual's prompt) prefills only what differs.

The prefill computes prompts anchored at slot 0, where a slot's keys and values are a function
of the tokens up to it alone, bit for bit (`kernel.fill`). So the reference is filled once (one
row; or taken from a stored cache that holds it), each row's cache starts as the reference's
first c slots (c: the tokens the row shares with it), and the rows fill the rest in segments,
each row from its own slot on. The rows go in groups of `ROWS` (the rows with the most slots to
fill first, so that a group's rows need about as many segments), each group with its own cache,
filled in place a segment per call (a call computes at least `invariant.FIXED_ROWS` token rows,
the prefill's least matmul tile); the groups' caches are put back in row order once, at the
end. The result is the plain prefill's cache bit for bit, so a row's tokens are those of its
one-by-one run; what changes is the work: a sweep that edits each word of a 40-word prompt
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

SEGMENT = invariant.BLOCK // 2  # fewest slots a row fills per call
ROWS = 16  # rows a call fills: one compiled program
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
    """(rows, slots per row) of the calls that fill a group taken from `batch` rows: up to
    `ROWS` rows, each filling `SEGMENT` slots or more, so that a call has at least one whole
    matmul tile of token rows (fewer would be padded to it)."""
    size = min(ROWS, 1 << max(batch - 1, 0).bit_length())
    return size, max(SEGMENT, invariant.FIXED_ROWS // size)


def groups(shared: np.ndarray, lengths: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """The groups of the fill, in order: per group (its rows, the slots a row fills a call, its
    calls). Row b fills slots [shared[b], n_b - 1), a segment a call, from its own slot on; the
    rows with the most slots to fill go first, `ROWS` to a group; the rest make one group of
    `call_shape(rest)`, padded by repeating its first row. So there are at most two compiled
    programs, and padding adds fewer rows than half a group."""
    order = np.argsort(-(lengths - 1 - shared), kind="stable")
    out = []
    while len(order):
        size, segment = call_shape(len(order))
        rows, order = order[:size], order[size:]
        rows = np.concatenate([rows, np.full(size - len(rows), rows[0])]).astype(np.int32)
        out.append((rows, segment, -(-int((lengths - 1 - shared)[rows].max()) // segment)))
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
def _fill(config: LlamaConfig, params, cache: KVCache, tokens, first) -> KVCache:
    """One call: a group's rows fill a segment of slots each (`tokens [R, segment]`), row i from
    slot `first[i]`, in the group's cache (`kernel.fill`)."""
    return kernel.fill(config, params, tokens, first, cache)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _assemble(config: LlamaConfig, caches: list[KVCache], order, lengths, bucket: int, length: int):  # fmt: skip
    """The groups' caches as one in row order (`order`: each row's place among the groups'
    rows), moved into the decode's layout (`kernel.roll_in`)."""
    cache = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[order], *caches)
    return kernel.roll_in(config, cache, lengths, bucket, length)


_shift = jax.jit(kernel.shift, static_argnums=(4,))


def prefill(config: LlamaConfig, params, prompts: Sequence[Sequence[int]], prompt: np.ndarray,
            lengths: np.ndarray, reference: Reference, length: int, window: int):  # fmt: skip
    """`kernel.prefill`'s (state, start) for the right-padded `prompt` `[B, P]`, reusing the
    prefix each row shares with the reference; None where that would not save enough work
    (`WORTH`), so the caller prefills as usual."""
    lengths = np.asarray(lengths, np.int32)
    tokens = list(reference.tokens)
    shared = shared_lengths(prompts, tokens)
    plan = groups(shared, lengths)
    slots = window + max(segment for _, segment, _ in plan)  # room for every call's segment
    own = 0 if reference.cache is not None else kernel.prefill_window(len(tokens), kernel.bucket_length(len(tokens)))  # fmt: skip
    if own + sum(len(rows) * segment * calls for rows, segment, calls in plan) > WORTH * len(prompts) * window:  # fmt: skip
        return None
    if reference.cache is not None:  # the kept cache, moved back to start at slot 0
        anchored = _shift(reference.cache, jnp.asarray([reference.start]), jnp.asarray([0]), jnp.asarray([len(tokens) - 1]), slots)  # fmt: skip
    else:
        ref = np.zeros((1, own), np.int32)
        ref[0, : len(tokens) - 1] = tokens[:-1]
        anchored = _reference(config, params, jnp.asarray(ref))
    padded_tokens = np.pad(np.asarray(kernel.anchored(jnp.asarray(prompt), jnp.asarray(lengths))), ((0, 0), (0, slots)))  # fmt: skip
    caches = []
    for rows, segment, calls in plan:
        cache = _seed(anchored, jnp.asarray(shared[rows]), slots)
        for k in range(calls):
            first = shared[rows] + k * segment
            part = padded_tokens[rows[:, None], first[:, None] + np.arange(segment)[None, :]]
            cache = _fill(config, params, cache, jnp.asarray(part), jnp.asarray(first))
        caches.append(cache)
    placed = np.concatenate([rows for rows, _, _ in plan])  # every row once, then padding
    order = np.argsort(placed[: len(prompts)]).astype(np.int32)  # row b's place among them
    cache, start = _assemble(config, caches, jnp.asarray(order), jnp.asarray(lengths), prompt.shape[1], length)  # fmt: skip
    return kernel.initial_state(jnp.asarray(prompt), jnp.asarray(lengths), cache), start
