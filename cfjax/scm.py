"""The causal model of sampling: step-keyed noise, sampler masks, mechanisms, posterior noise.

Every generated token is a deterministic function of the logits and of exogenous noise that is
itself a pure function of ``(key, step)`` (DESIGN.md §2). Replaying the noise on changed logits is
what makes a counterfactual. This module knows nothing of the model: it maps one row of float32
logits (plus noise) to a token.

Ordering rule used by every mask (documented once, here): tokens are ranked by ``z`` descending
with ties broken by the lower token id first (a stable sort; -0.0 ties with +0.0). The top-k set
is the first ``k`` ranks; then a rank is dropped when the probability mass strictly before it (of
the renormalised top-k distribution) exceeds ``p``: the paper's ``probs_sum - probs_sort > p``.
So tied tokens straddling a top-k or top-p edge keep the lower ids, and mass exactly equal to
``p`` before a token keeps it. The kept set is a function of ``z`` alone. Float32 sums may be
taken in another order than a sequential cumsum, so a token whose mass-before is within rounding
of ``p`` can fall either side (as it can between the paper's code on two devices).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

MECHANISMS = ("gumbel", "inverse-cdf", "gumbel-rank")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a token is drawn: temperature, top-k, top-p and the noise mechanism (jit-static)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    mechanism: str = "gumbel"

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        # Normalise numeric types so equal samplers hash equally and serialise as plain JSON.
        object.__setattr__(self, "temperature", float(t))
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
            object.__setattr__(self, "top_k", int(k))
        p = self.top_p
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")
            object.__setattr__(self, "top_p", float(p))
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"unknown mechanism {self.mechanism!r}; valid mechanisms: {', '.join(MECHANISMS)}"
            )

    @property
    def greedy(self) -> bool:
        """True when temperature is 0: the token is the argmax and the noise is ignored."""
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the four fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sampler:
        """Inverse of `to_dict`; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Sampler fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


def argmax(x: jax.Array) -> jax.Array:
    """int32 index of the first maximum along the last axis: `jnp.argmax`, NaN counting as max.

    Written as a max, then the lowest index that attains it: two plain reductions that XLA:CPU
    vectorises and keeps out of the noise's fusion. `jnp.argmax` lowers to one (value, index)
    reduction that runs element by element, and fused with the Gumbel noise it cost more than
    the whole sampling step (3x at batch 64).
    """
    m = jnp.max(x, axis=-1, keepdims=True)
    ids = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where((x == m) | jnp.isnan(x), ids, x.shape[-1]), axis=-1)


def _as_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key; raw uint32 key data (e.g. from a JSON trace) is wrapped."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def noise(key: jax.Array, step: jax.Array | int, vocab_size: int) -> jax.Array:
    """Gumbel noise f32[V] of response step `step`, one per token id; a function of (key, step)."""
    return jax.random.gumbel(jax.random.fold_in(_as_key(key), step), (vocab_size,), jnp.float32)


def uniform_noise(key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The single U[0, 1) f32 scalar of the inverse-cdf mechanism at `step`, same fold_in key."""
    return jax.random.uniform(jax.random.fold_in(_as_key(key), step), (), jnp.float32)


# Up to this k, top-k uses lax.top_k (fast for small k) and the nucleus the paper's cumsum over
# the k sorted values; beyond it (or top-p alone) both use the sort-free bisection below.
_TOP_K_DIRECT = 1024


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
        return jnp.sum(jnp.where(keys > kappa, w, jnp.zeros_like(w)))

    def set_bit(i, x):
        cand = x | lax.shift_right_logical(jnp.uint32(0x80000000), i.astype(jnp.uint32))
        return jnp.where(weight_above(cand) > limit, cand, x)

    # x = the largest key with more than `limit` above it; the edge tie group sits at x + 1
    # (it cannot wrap: nothing lies above the largest key and limit >= 0).
    edge = lax.fori_loop(0, 32, set_bit, jnp.uint32(0)) + jnp.uint32(1)
    tie = keys == edge
    nth = jnp.cumsum(tie.astype(jnp.int32)) - 1  # place within the tie group, by token id
    w_edge = jnp.max(jnp.where(tie, w, jnp.zeros_like(w)))  # tied tokens have equal weight
    return (keys > edge) | (tie & (weight_above(edge) + nth * w_edge <= limit))


def _keep_1d(z: jax.Array, top_k: int | None, top_p: jax.Array | None, direct: bool) -> jax.Array:
    """bool[V]: tokens kept by top-k (k < V) then top-p (p < 1) on one row of tempered logits."""
    v = z.shape[-1]
    nucleus = top_p is not None
    if top_k is not None and direct:
        # lax.top_k breaks ties by lower index first: the module's ordering rule.
        vals, idx = lax.top_k(jnp.where(z == 0, jnp.float32(0), z), top_k)
        keep = jnp.ones((top_k,), bool)
        if nucleus:
            # softmax over the top-k set == softmax of the top-k-masked z. The paper's rule,
            # elementwise on the sorted probabilities: drop when `probs_sum - probs_sort > p`.
            probs = jax.nn.softmax(vals)
            keep = ~(jnp.cumsum(probs) - probs > top_p)
        return jnp.zeros((v,), bool).at[idx].set(keep)
    keys = _order_key(z)
    keep = jnp.ones((v,), bool)
    if top_k is not None:
        keep = _prefix_keep(keys, jnp.ones((v,), jnp.int32), top_k - 1)
    if nucleus:
        # Tokens cut by top-k have probability 0, so they move no other token's mass.
        probs = jax.nn.softmax(jnp.where(keep, z, -jnp.inf))
        keep = keep & _prefix_keep(keys, probs, top_p)
    return keep


def _keep(z: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """bool[..., V] keep mask; all True without truncation (p = 1 means no nucleus)."""
    k = top_k if top_k is not None and top_k < z.shape[-1] else None
    nucleus = top_p is not None and top_p < 1.0
    if k is None and not nucleus:
        return jnp.ones(z.shape, bool)
    direct = k is not None and k <= _TOP_K_DIRECT
    # p goes in as an operand so a new p value does not compile a new program.
    return _keep_rows(z, k, jnp.float32(top_p if nucleus else 1.0), nucleus, direct)


@functools.partial(jax.jit, static_argnames=("top_k", "nucleus", "direct"))
def _keep_rows(
    z: jax.Array, top_k: int | None, top_p: jax.Array, nucleus: bool, direct: bool
) -> jax.Array:
    """jit of `_keep_1d` over any leading axes."""
    row = lambda r: _keep_1d(r, top_k, top_p if nucleus else None, direct)
    return jnp.vectorize(row, signature="(v)->(v)")(z)


def mask_logits(z: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """f32[..., V]: `z` (logits / τ) with -inf outside the top-k, then outside the top-p nucleus."""
    z = jnp.asarray(z, jnp.float32)
    return jnp.where(_keep(z, top_k, top_p), z, -jnp.inf)


def _masked(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """Tempered, masked float32 logits of a non-greedy sampler."""
    z = jnp.asarray(logits, jnp.float32) / jnp.float32(sampler.temperature)
    return mask_logits(z, sampler.top_k, sampler.top_p)


def log_probs(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """f32[..., V]: log-probabilities of the sampler's distribution (τ = 0: a point mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    if sampler.greedy:
        hot = jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=bool)
        return jnp.where(hot, 0.0, -jnp.inf).astype(jnp.float32)
    return jax.nn.log_softmax(_masked(logits, sampler), axis=-1)


def support(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """bool[..., V]: tokens the sampler can emit (τ = 0: only the argmax)."""
    logits = jnp.asarray(logits, jnp.float32)
    if sampler.greedy:
        return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=bool)
    # Finite, not just unmasked: a token whose logit is already -inf can never be drawn.
    return jnp.isfinite(_masked(logits, sampler))


def _rank_order(z: jax.Array) -> jax.Array:
    """int32[V] token ids by z descending, ties to the lower id (the module's ordering rule)."""
    v = z.shape[-1]
    z = jnp.where(z == 0, jnp.float32(0), z)  # signed zeros tie, as in the masks
    return lax.sort((-z, jnp.arange(v, dtype=jnp.int32)), num_keys=1, is_stable=True)[1]


def choose(
    logits: jax.Array, key: jax.Array, step: jax.Array | int, sampler: Sampler
) -> tuple[jax.Array, jax.Array]:
    """(int32 token, f32 log-prob) for ONE row f32[V] of logits at response step `step`."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 1:
        raise ValueError(f"choose takes one row f32[V] of logits, got {logits.shape}; vmap it")
    v = logits.shape[0]
    if sampler.greedy:
        token = argmax(logits)
        # A point mass has log-prob 0; the model's own log-prob is the informative number.
        return token, jax.nn.log_softmax(logits)[token]
    zm = _masked(logits, sampler)
    if sampler.mechanism == "gumbel":
        # Noise indexed by token id: a token keeps its own noise when the distribution changes.
        token = argmax(zm + noise(key, step, v))
    elif sampler.mechanism == "gumbel-rank":
        # Noise indexed by rank: ordinary (nucleus) sampling, no counterfactual stability.
        order = _rank_order(zm)
        token = order[argmax(zm[order] + noise(key, step, v))]
    else:  # inverse-cdf
        probs = jax.nn.softmax(zm)
        cdf = jnp.cumsum(probs)
        # Scaling u by the total keeps the draw inside [0, cdf[-1]) when rounding leaves the
        # sum below 1; requiring probs > 0 means a masked token can never be hit by rounding.
        u = uniform_noise(key, step) * cdf[-1]
        hit = (cdf > u) & (probs > 0)
        last = v - 1 - argmax((probs > 0)[::-1])
        token = jnp.where(jnp.any(hit), argmax(hit), last)
    token = token.astype(jnp.int32)
    return token, jax.nn.log_softmax(zm)[token]


def posterior_noise(
    logits: jax.Array,
    token: jax.Array | int,
    key: jax.Array,
    sampler: Sampler,
    prior_noise: jax.Array,
) -> jax.Array:
    """f32[V] Gumbel noise drawn from its posterior given that the gumbel mechanism chose `token`.

    Exponential-race form (DESIGN §2): with ``p = softmax(z_masked)``, ``t ~ Exp(1)`` and
    ``E_j ~ Exp(1)`` (both clamped to ``finfo.tiny``), ``g_j = -log(E_j + p_j t)`` for j ≠ k and
    ``g_k = -log t - log p_k``. Tokens outside the support keep ``prior_noise`` (they took no part
    in the race). `key` is the abduction key, independent of the generation key. If `token` is
    outside the support the result is all NaN: check with `support` first.
    """
    if sampler.mechanism != "gumbel":
        raise ValueError(
            f"posterior_noise is defined for the 'gumbel' mechanism, not {sampler.mechanism!r}"
        )
    prior_noise = jnp.asarray(prior_noise, jnp.float32)
    if sampler.greedy:
        return prior_noise  # greedy ignores the noise, so observing the token says nothing
    zm = _masked(logits, sampler)
    logp = jax.nn.log_softmax(zm)
    p = jnp.exp(logp)
    key_t, key_e = jax.random.split(_as_key(key))
    tiny = jnp.finfo(jnp.float32).tiny
    t = jnp.maximum(jax.random.exponential(key_t, (), jnp.float32), tiny)
    e = jnp.maximum(jax.random.exponential(key_e, zm.shape, jnp.float32), tiny)
    ids = jnp.arange(zm.shape[0])
    token = jnp.asarray(token, jnp.int32)
    # log p_k from log_softmax stays finite when p_k underflows in float32.
    g = jnp.where(ids == token, -jnp.log(t) - logp[token], -jnp.log(e + p * t))
    g = jnp.where(jnp.isfinite(zm), g, prior_noise)
    return jnp.where(jnp.isfinite(zm[token]), g, jnp.nan)
