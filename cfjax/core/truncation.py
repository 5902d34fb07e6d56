"""Truncation masks of the samplers: top-k, then the top-p nucleus, on tempered logits.

Ranks are by value, ties to the lower token id (the paper's ordering rule), found without a
sort where the vocabulary is large (a bisection over the float order), so that a traced k or p
costs no program per value.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cfjax.core import invariant

# Up to this k, top-k uses lax.top_k (fast for small k) and the nucleus the paper's cumsum over
# the k sorted values; beyond it (or top-p alone) both use the sort-free bisection below.
TOP_K_DIRECT = 1024


def _order_key(z: jax.Array) -> jax.Array:
    """uint32 keys whose unsigned order is the float order of `z` (signed zeros made equal)."""
    z = jnp.where(z == 0, jnp.float32(0), z)
    b = lax.bitcast_convert_type(z, jnp.uint32)
    # Negative floats: flip every bit (a larger magnitude is smaller); others: set the sign bit.
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _prefix_keep(keys: jax.Array, w: jax.Array, limit: jax.Array | float) -> jax.Array:
    """bool[V]: keep each rank whose weight strictly before it is <= `limit`.

    Ranks are `keys` descending, ties to the lower id. The weight before a rank never decreases
    along the ranking, so the kept ranks are a prefix, and its edge key is found by a 32-step
    bisection over the uint32 key space: O(32 V) with no sort (XLA's CPU sort of a 128k
    vocabulary costs ~30 ms a row). Top-p is w = probs, limit = p; top-k is w = 1, limit = k - 1.
    """

    def weight_above(kappa):
        return invariant.tree_sum(jnp.where(keys > kappa, w, jnp.zeros_like(w)))

    def set_bit(i, x):
        cand = x | lax.shift_right_logical(jnp.uint32(0x80000000), i.astype(jnp.uint32))
        return jnp.where(weight_above(cand) > limit, cand, x)

    # x = the largest key with more than `limit` above it; the edge tie group sits at x + 1
    # (it cannot wrap: nothing lies above the largest key and limit >= 0).
    edge = lax.fori_loop(0, 32, set_bit, jnp.uint32(0)) + jnp.uint32(1)
    tie = keys == edge
    nth = jnp.cumsum(tie.astype(jnp.int32)) - 1  # place within the tie group, by token id
    # Tied tokens have equal weight.
    w_edge = invariant.tree_max(jnp.where(tie, w, jnp.zeros_like(w)))
    return (keys > edge) | (tie & (weight_above(edge) + nth * w_edge <= limit))


def _static_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _keep_1d(z: jax.Array, top_k: Any, top_p: Any, direct: int) -> jax.Array:
    """bool[V]: tokens kept by top-k then top-p on one row of tempered logits.

    `top_k` / `top_p` are None (inactive), Python numbers, or traced scalars. A static k up to
    `direct` takes `lax.top_k`; a traced k (any value, k >= V keeps all) the bisection.
    A traced p of 1 keeps every token, exactly as an inactive nucleus does.
    """
    v = z.shape[-1]
    nucleus = top_p is not None
    if top_k is not None and _static_int(top_k) and top_k <= direct:
        # lax.top_k breaks ties by lower index first: the module's ordering rule.
        vals, idx = lax.top_k(jnp.where(z == 0, jnp.float32(0), z), top_k)
        keep = jnp.ones((top_k,), bool)
        if nucleus:
            # softmax over the top-k set == softmax of the top-k-masked z. The paper's rule,
            # elementwise on the sorted probabilities: drop when `probs_sum - probs_sort > p`.
            probs = invariant.softmax(vals)
            keep = ~(jnp.cumsum(probs) - probs > top_p) | (top_p >= 1.0)
        return jnp.zeros((v,), bool).at[idx].set(keep)
    keys = _order_key(z)
    keep = jnp.ones((v,), bool)
    if top_k is not None:
        keep = _prefix_keep(keys, jnp.ones((v,), jnp.int32), jnp.asarray(top_k) - 1)
    if nucleus:
        # Tokens cut by top-k have probability 0, so they move no other token's mass.
        probs = invariant.softmax(jnp.where(keep, z, -jnp.inf))
        keep = keep & (_prefix_keep(keys, probs, top_p) | (top_p >= 1.0))
    return keep


def _keep(z: jax.Array, top_k: Any, top_p: Any, direct: int = TOP_K_DIRECT) -> jax.Array:
    """bool[..., V] keep mask; all True without truncation (p = 1 means no nucleus)."""
    if _static_int(top_k) and top_k >= z.shape[-1]:
        top_k = None
    if isinstance(top_p, float) and top_p >= 1.0:
        top_p = None
    if top_k is None and top_p is None:
        return jnp.ones(z.shape, bool)
    if _static_int(top_k) or top_k is None:
        # Concrete k: a jitted program per k; p goes in as an operand (no program per p).
        p = None if top_p is None else jnp.asarray(top_p, jnp.float32)
        return _keep_rows(z, top_k, p, direct)
    row = lambda r: _keep_1d(r, top_k, top_p, direct)  # noqa: E731
    return jnp.vectorize(row, signature="(v)->(v)")(z)


@functools.partial(jax.jit, static_argnames=("top_k", "direct"))
def _keep_rows(z: jax.Array, top_k: int | None, top_p: jax.Array | None, direct: int) -> jax.Array:
    """jit of `_keep_1d` over any leading axes, for a static k."""
    row = lambda r: _keep_1d(r, top_k, top_p, direct)  # noqa: E731
    return jnp.vectorize(row, signature="(v)->(v)")(z)


def mask_logits(z: jax.Array, top_k: Any, top_p: Any, *, direct_top_k: int = TOP_K_DIRECT) -> jax.Array:  # fmt: skip
    """f32[..., V]: `z` (logits / τ) with -inf outside the top-k, then outside the top-p nucleus.

    `direct_top_k`: the largest static k that takes `lax.top_k` (the bisection serves the rest;
    both give the same mask, which a test checks by choosing 0)."""
    z = jnp.asarray(z, jnp.float32)
    return jnp.where(_keep(z, top_k, top_p, direct_top_k), z, -jnp.inf)
