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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cfjax.core import invariant
from cfjax.core.checks import as_key
from cfjax.core.truncation import mask_logits

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

    Written as a max, then the lowest index that attains it: two elementwise halvings
    (`invariant`) that XLA vectorises and keeps out of the noise's fusion, and that no backend
    hands to a library fusion with its own `log` for the noise. `jnp.argmax` lowers to one
    (value, index) reduction that runs element by element, and fused with the Gumbel noise it
    cost more than the whole sampling step (3x at batch 64).
    """
    m = invariant.tree_max(x)[..., None]
    ids = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return invariant.tree_min(jnp.where((x == m) | jnp.isnan(x), ids, x.shape[-1]))


def noise(key: jax.Array, step: jax.Array | int, vocab_size: int) -> jax.Array:
    """Gumbel noise f32[V] of response step `step`, one per token id; a function of (key, step)."""
    return jax.random.gumbel(jax.random.fold_in(as_key(key), step), (vocab_size,), jnp.float32)


def uniform_noise(key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The single U[0, 1) f32 scalar of the inverse-cdf mechanism at `step`, same fold_in key."""
    return jax.random.uniform(jax.random.fold_in(as_key(key), step), (), jnp.float32)


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
    # Logits times 1/τ, not logits / τ: XLA rewrites a division by a broadcast scalar into that
    # product in some programs and not in others (a batch's other samplers decided it), so only
    # the product, rounded (`invariant.rounded`), is the same in every batch.
    if isinstance(t, float):
        return mask_logits(invariant.rounded(z * (np.float32(1) / np.float32(t))), k, p)
    greedy = jnp.asarray(t) == 0
    t = jnp.maximum(jnp.asarray(t, jnp.float32), jnp.float32(MIN_TEMPERATURE))
    t = jnp.where(greedy, jnp.float32(1), t)
    k = None if k is None else jnp.where(greedy, z.shape[-1], k)
    p = None if p is None else jnp.where(greedy, jnp.float32(1), p)
    return mask_logits(invariant.rounded(z * (1 / t)), k, p)


def _point_mass(logits: jax.Array) -> jax.Array:
    return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=bool)


def log_probs(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """f32[..., V]: log-probabilities of the sampler's distribution (τ = 0: a point mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    greedy = _is_greedy(sampler)
    point = lambda: jnp.where(_point_mass(logits), 0.0, -jnp.inf).astype(jnp.float32)
    if greedy is True:
        return point()
    lp = invariant.log_softmax(sampler_logits(logits, sampler))
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


def choose(logits: jax.Array, key: jax.Array, step: jax.Array | int, sampler: Sampler, noise_value: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:  # fmt: skip
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
    top = invariant.tree_max(scores)
    logprob = (scores[token] - top) - jnp.log(invariant.tree_sum(jnp.exp(scores - top)))
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
        probs = invariant.softmax(zm)
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
