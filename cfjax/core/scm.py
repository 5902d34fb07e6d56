"""The causal model of sampling: step-keyed noise, sampler masks, mechanisms.

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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cfjax.core.checks import as_key

MECHANISMS = ("gumbel", "inverse-cdf", "gumbel-rank")
# The smallest positive temperature: logits / τ stays far from float32 overflow (|logits| up to
# ~1e30 would be needed), and below it sampling is greedy to float32 precision anyway. A concrete
# τ in (0, MIN_TEMPERATURE) is refused; a traced one is raised to it (its limit, greedy, either way).
MIN_TEMPERATURE = 1e-6


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_values(name: str, value: Any, ok, rule: str) -> None:
    """Raise for a concrete value (a number or an array of them) that breaks `rule`."""
    if not _concrete(value):
        return
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or not np.all(ok(arr)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a token is drawn: temperature, top-k, top-p and the noise mechanism.

    A pytree: `temperature`, `top_k` and `top_p` are its leaves (data: traced under jit, one
    compiled program for every value, and `jax.vmap` over a grid of them works); the mechanism
    and which truncations are active (`None` or not) are its static structure. Concrete values
    are validated and Python numbers normalised, so a concrete sampler is also hashable and can
    be a static argument or a dict key; traced values are taken as they are.
    """

    temperature: Any = 1.0
    top_k: Any = None
    top_p: Any = None
    mechanism: str = "gumbel"

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            # Normalise numeric types so equal samplers hash equally and serialise as JSON.
            object.__setattr__(self, "temperature", float(t))
        _check_values(
            "temperature",
            t,
            lambda a: np.isfinite(a) & ((a == 0) | (a >= MIN_TEMPERATURE)),
            f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g} (below it logits / τ "
            "overflow float32; the limit is greedy: use 0)",
        )
        if k is not None:
            if isinstance(k, float) or (
                _concrete(k) and not np.issubdtype(np.asarray(k).dtype, np.integer)
            ):
                raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
            _check_values("top_k", k, lambda a: a >= 1, "an integer >= 1 or None")
            if isinstance(k, (int, np.integer)):
                object.__setattr__(self, "top_k", int(k))
        if p is not None:
            _check_values("top_p", p, lambda a: (a > 0) & (a <= 1), "in (0, 1] or None")
            if isinstance(p, (int, float, np.number)):
                object.__setattr__(self, "top_p", float(p))
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"unknown mechanism {self.mechanism!r}; valid mechanisms: {', '.join(MECHANISMS)}"
            )

    @property
    def greedy(self) -> bool:
        """True when temperature is 0 (concrete samplers only): the argmax, noise ignored."""
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the four fields (concrete samplers only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sampler:
        """Inverse of `to_dict`; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Sampler fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


def _sampler_unflatten(mechanism: str, leaves) -> Sampler:
    # Bypasses __init__: jax rebuilds samplers with tracers, batching specs or placeholders.
    s = object.__new__(Sampler)
    for name, value in zip(("temperature", "top_k", "top_p"), leaves, strict=True):
        object.__setattr__(s, name, value)
    object.__setattr__(s, "mechanism", mechanism)
    return s


jax.tree_util.register_pytree_node(
    Sampler,
    lambda s: ((s.temperature, s.top_k, s.top_p), s.mechanism),
    _sampler_unflatten,
)


def as_arrays(sampler: Sampler) -> Sampler:
    """The same sampler with array leaves: f32 temperature, int32 top_k, f32 top_p.

    Python numbers would enter a jitted function as weakly typed values, arrays as strong ones:
    one form for every caller keeps one compiled program.
    """
    t, k, p = sampler.temperature, sampler.top_k, sampler.top_p
    leaves = (
        jnp.asarray(t, jnp.float32),
        None if k is None else jnp.asarray(k, jnp.int32),
        None if p is None else jnp.asarray(p, jnp.float32),
    )
    return _sampler_unflatten(sampler.mechanism, leaves)


def stack(samplers: Sequence[Sampler], vocab_size: int) -> Sampler:
    """One sampler with `[B]` array leaves for a batch of rows sharing a mechanism.

    A truncation is active for the batch when any row has it; the other rows get its neutral
    value (k = V keeps every token, p = 1 is no nucleus), which masks exactly nothing.
    """
    mechanisms = {s.mechanism for s in samplers}
    if len(mechanisms) != 1:
        raise ValueError(f"rows of one batch must share a mechanism, got {sorted(mechanisms)}")
    temperature = np.asarray([s.temperature for s in samplers], np.float32)
    top_k = top_p = None
    if any(s.top_k is not None for s in samplers):
        top_k = np.asarray(
            [vocab_size if s.top_k is None else min(s.top_k, vocab_size) for s in samplers],
            np.int32,
        )
    if any(s.top_p is not None for s in samplers):
        top_p = np.asarray([1.0 if s.top_p is None else s.top_p for s in samplers], np.float32)
    return Sampler(temperature, top_k, top_p, mechanisms.pop())


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


def noise(key: jax.Array, step: jax.Array | int, vocab_size: int) -> jax.Array:
    """Gumbel noise f32[V] of response step `step`, one per token id; a function of (key, step)."""
    return jax.random.gumbel(jax.random.fold_in(as_key(key), step), (vocab_size,), jnp.float32)


def uniform_noise(key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The single U[0, 1) f32 scalar of the inverse-cdf mechanism at `step`, same fold_in key."""
    return jax.random.uniform(jax.random.fold_in(as_key(key), step), (), jnp.float32)


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


def _static_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _keep_1d(z: jax.Array, top_k: Any, top_p: Any) -> jax.Array:
    """bool[V]: tokens kept by top-k then top-p on one row of tempered logits.

    `top_k` / `top_p` are None (inactive), Python numbers, or traced scalars. A static k up to
    `_TOP_K_DIRECT` takes `lax.top_k`; a traced k (any value, k >= V keeps all) the bisection.
    A traced p of 1 keeps every token, exactly as an inactive nucleus does.
    """
    v = z.shape[-1]
    nucleus = top_p is not None
    if top_k is not None and _static_int(top_k) and top_k <= _TOP_K_DIRECT:
        # lax.top_k breaks ties by lower index first: the module's ordering rule.
        vals, idx = lax.top_k(jnp.where(z == 0, jnp.float32(0), z), top_k)
        keep = jnp.ones((top_k,), bool)
        if nucleus:
            # softmax over the top-k set == softmax of the top-k-masked z. The paper's rule,
            # elementwise on the sorted probabilities: drop when `probs_sum - probs_sort > p`.
            probs = jax.nn.softmax(vals)
            keep = ~(jnp.cumsum(probs) - probs > top_p) | (top_p >= 1.0)
        return jnp.zeros((v,), bool).at[idx].set(keep)
    keys = _order_key(z)
    keep = jnp.ones((v,), bool)
    if top_k is not None:
        keep = _prefix_keep(keys, jnp.ones((v,), jnp.int32), jnp.asarray(top_k) - 1)
    if nucleus:
        # Tokens cut by top-k have probability 0, so they move no other token's mass.
        probs = jax.nn.softmax(jnp.where(keep, z, -jnp.inf))
        keep = keep & (_prefix_keep(keys, probs, top_p) | (top_p >= 1.0))
    return keep


def _keep(z: jax.Array, top_k: Any, top_p: Any) -> jax.Array:
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
        return _keep_rows(z, top_k, p)
    row = lambda r: _keep_1d(r, top_k, top_p)
    return jnp.vectorize(row, signature="(v)->(v)")(z)


@functools.partial(jax.jit, static_argnames=("top_k",))
def _keep_rows(z: jax.Array, top_k: int | None, top_p: jax.Array | None) -> jax.Array:
    """jit of `_keep_1d` over any leading axes, for a static k."""
    row = lambda r: _keep_1d(r, top_k, top_p)
    return jnp.vectorize(row, signature="(v)->(v)")(z)


def mask_logits(z: jax.Array, top_k: Any, top_p: Any) -> jax.Array:
    """f32[..., V]: `z` (logits / τ) with -inf outside the top-k, then outside the top-p nucleus."""
    z = jnp.asarray(z, jnp.float32)
    return jnp.where(_keep(z, top_k, top_p), z, -jnp.inf)


def _is_greedy(sampler: Sampler) -> jax.Array | bool:
    """τ == 0: a Python bool for a concrete temperature, a traced bool otherwise."""
    t = sampler.temperature
    return t == 0.0 if isinstance(t, float) else jnp.asarray(t) == 0


def sampler_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """The tempered, masked float32 logits the sampler draws from (-inf outside its support).

    A traced greedy row (τ = 0) gets τ = 1 and no truncation: its masked logits are the model's
    own, whose argmax is the greedy token and whose log-softmax is the log-prob it reports.
    """
    z = jnp.asarray(logits, jnp.float32)
    t, k, p = sampler.temperature, sampler.top_k, sampler.top_p
    if isinstance(t, float):
        return mask_logits(z / jnp.float32(t), k, p)
    greedy = jnp.asarray(t) == 0
    t = jnp.maximum(jnp.asarray(t, jnp.float32), jnp.float32(MIN_TEMPERATURE))
    t = jnp.where(greedy, jnp.float32(1), t)
    k = None if k is None else jnp.where(greedy, z.shape[-1], k)
    p = None if p is None else jnp.where(greedy, jnp.float32(1), p)
    return mask_logits(z / t, k, p)


def _point_mass(logits: jax.Array) -> jax.Array:
    return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=bool)


def log_probs(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """f32[..., V]: log-probabilities of the sampler's distribution (τ = 0: a point mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    greedy = _is_greedy(sampler)
    point = lambda: jnp.where(_point_mass(logits), 0.0, -jnp.inf).astype(jnp.float32)
    if greedy is True:
        return point()
    lp = jax.nn.log_softmax(sampler_logits(logits, sampler), axis=-1)
    return lp if greedy is False else jnp.where(greedy[..., None], point(), lp)


def support(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """bool[..., V]: tokens the sampler can emit (τ = 0: only the argmax)."""
    logits = jnp.asarray(logits, jnp.float32)
    greedy = _is_greedy(sampler)
    if greedy is True:
        return _point_mass(logits)
    # Finite, not just unmasked: a token whose logit is already -inf can never be drawn.
    sup = jnp.isfinite(sampler_logits(logits, sampler))
    return sup if greedy is False else jnp.where(greedy[..., None], _point_mass(logits), sup)


def _rank_order(z: jax.Array) -> jax.Array:
    """int32[V] token ids by z descending, ties to the lower id (the module's ordering rule)."""
    v = z.shape[-1]
    z = jnp.where(z == 0, jnp.float32(0), z)  # signed zeros tie, as in the masks
    return lax.sort((-z, jnp.arange(v, dtype=jnp.int32)), num_keys=1, is_stable=True)[1]


def choose(
    logits: jax.Array,
    key: jax.Array,
    step: jax.Array | int,
    sampler: Sampler,
    noise_value: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(int32 token, f32 log-prob) for ONE row f32[V] of logits at response step `step`.

    `noise_value` f32[V], if given, replaces the step's key-derived Gumbel noise (abduction).
    The log-prob is the sampler's, or for greedy (a point mass) the model's own, which is the
    informative number.
    """
    return choose_or_force(logits, key, step, sampler, noise_value)


def choose_or_force(
    logits: jax.Array,
    key: jax.Array,
    step: jax.Array | int,
    sampler: Sampler,
    noise_value: jax.Array | None = None,
    forced: jax.Array | int = -1,
) -> tuple[jax.Array, jax.Array]:
    """`choose`, or the token `forced` (when >= 0) with the log-prob `choose` would report for
    it: one formula for both, so forcing a token to itself changes nothing, not even a bit."""
    token, scores = _draw(logits, key, step, sampler, noise_value)
    forced = jnp.asarray(forced, jnp.int32)
    token = jnp.where(forced >= 0, forced, token)
    # log_softmax(scores)[token], without materialising the other V - 1 entries.
    top = jnp.max(scores)
    logprob = (scores[token] - top) - jnp.log(jnp.sum(jnp.exp(scores - top)))
    return token, logprob


def _draw(logits, key, step, sampler: Sampler, noise_value) -> tuple[jax.Array, jax.Array]:
    """(token, the f32[V] logits whose log-softmax is the reported log-prob) for one row."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 1:
        raise ValueError(f"choose takes one row f32[V] of logits, got {logits.shape}; vmap it")
    v = logits.shape[0]
    greedy = _is_greedy(sampler)
    if greedy is True:
        return argmax(logits), logits
    if noise_value is not None and sampler.mechanism == "inverse-cdf":
        raise ValueError("explicit noise is Gumbel noise: the inverse-cdf mechanism has none")
    zm = sampler_logits(logits, sampler)
    g = noise(key, step, v) if noise_value is None else jnp.asarray(noise_value, jnp.float32)
    if greedy is not False:
        # A traced greedy row: no noise, so the argmax below is the greedy token (its zm is its
        # plain logits, see _masked), in the same fused pass as every other row's draw.
        g = jnp.where(greedy, jnp.float32(0), g)
    if sampler.mechanism == "gumbel":
        # Noise indexed by token id: a token keeps its own noise when the distribution changes.
        token = argmax(zm + g)
    elif sampler.mechanism == "gumbel-rank":
        # Noise indexed by rank: ordinary (nucleus) sampling, no counterfactual stability.
        order = _rank_order(zm)
        token = order[argmax(zm[order] + g)]
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
    if greedy is not False and sampler.mechanism == "inverse-cdf":
        token = jnp.where(greedy, argmax(zm), token)
    return token, zm
