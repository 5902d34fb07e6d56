"""Posterior (hindsight) Gumbel noise: the noise of text the model was observed to produce.

Abduction (DESIGN.md §2) asks which noise could have made the gumbel mechanism emit an observed
token, and draws it from its posterior. Exponential-race form, float32-safe: with
``p = softmax(z_masked)``, ``t ~ Exp(1)`` and ``E_j ~ Exp(1)`` (both clamped to ``finfo.tiny``),
``g_j = -log(E_j + p_j t)`` for j ≠ k and ``g_k = -log t - log p_k``; tokens outside the
support keep their prior noise (they took no part in the race).

`Observed` carries the observed steps into the decode loop: one `[S, V]` array of masked logits
per distinct observation, shared by every posterior sample of it, and per row only a key. The
noise of a row's step is drawn inside the step that uses it, so a posterior sample costs a key
and no `[S, V]` noise array of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cfjax.core import invariant, scm
from cfjax.core.checks import as_key

# When rounding leaves another token within this relative margin of the observed one, the
# observed token's noise is raised to lead by it, so that a replay whose logits round a few ulps
# differently still reproduces the observation. Natural margins this small have probability
# about 2^-16 per step, so the law moves by at most that much in total variation.
_MARGIN = 2.0**-16


def race(zm: jax.Array, token: jax.Array | int, key: jax.Array, prior_noise: jax.Array):
    """f32[V] noise from its posterior given ``argmax(zm + g) == token``, for ONE step.

    `zm` f32[V] are the masked tempered logits the token was chosen from (-inf outside the
    support), `key` the abduction key of this step, `prior_noise` the step's prior noise (kept
    by tokens outside the support). `token` must be inside the support (else the result is NaN).
    """
    zm = jnp.asarray(zm, jnp.float32)
    prior_noise = jnp.asarray(prior_noise, jnp.float32)
    token = jnp.asarray(token, jnp.int32)
    logp = invariant.log_softmax(zm)
    key_t, key_e = jax.random.split(as_key(key))
    tiny = jnp.finfo(jnp.float32).tiny
    t = jnp.maximum(jax.random.exponential(key_t, (), jnp.float32), tiny)
    e = jnp.maximum(jax.random.exponential(key_e, zm.shape, jnp.float32), tiny)
    is_token = jnp.arange(zm.shape[0]) == token
    # log p_k from log_softmax stays finite when p_k underflows in float32.
    g = jnp.where(
        is_token, -jnp.log(t) - logp[token], -jnp.log(e + invariant.rounded(jnp.exp(logp) * t))
    )
    g = jnp.where(jnp.isfinite(zm), g, prior_noise)
    # In exact arithmetic the observed token wins; make sure it does in float32 too (_MARGIN).
    # (A token alone in the support has no rival: `other` is -inf and nothing changes.)
    other = invariant.tree_max(jnp.where(is_token, -jnp.inf, zm + g))
    zk, gk = zm[token], g[token]
    size = jnp.where(jnp.isfinite(other), jnp.abs(other), 0.0)
    scale = jnp.maximum(jnp.maximum(size, jnp.abs(zk)), 1.0)
    margin = invariant.rounded(scale * _MARGIN)  # no fused multiply-add (see `invariant`)
    lead = (other - zk) + margin
    gk = jnp.where(zk + gk - other > margin, gk, jnp.maximum(gk, lead))
    g = jnp.where(is_token, gk, g)
    return jnp.where(jnp.isfinite(zk), g, jnp.nan)


def posterior_noise(
    logits: jax.Array,
    token: jax.Array | int,
    key: jax.Array,
    sampler: scm.Sampler,
    prior_noise: jax.Array,
) -> jax.Array:
    """f32[V] Gumbel noise drawn from its posterior given that `sampler` chose `token`.

    `logits` f32[V] are the model's, `key` the abduction key (independent of the generation
    key). Greedy ignores the noise, so observing its token says nothing: the prior comes back.
    If `token` is outside the sampler's support the result is all NaN: check with `scm.support`.
    """
    if sampler.mechanism != "gumbel":
        raise ValueError(
            f"posterior noise is defined for the 'gumbel' mechanism, not {sampler.mechanism!r}"
        )
    if sampler.greedy is True:
        return jnp.asarray(prior_noise, jnp.float32)
    return race(scm.sampler_logits(logits, sampler), token, key, prior_noise)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Observed:
    """Observed steps for the rows of a batch whose noise is abducted.

    `z` f32 `[O, S, V]`: the masked tempered logits of each observation's steps (the abduction
    sampler's), `tokens` int32 `[O, S]` and `length` int32 `[O]` its tokens; per row, `row`
    int32 `[B]` names its observation (-1: none, prior noise) and `key` `[B]` its abduction key.
    """

    z: jax.Array
    tokens: jax.Array
    length: jax.Array
    row: jax.Array
    key: jax.Array


def step_noise(observed: Observed, keys: jax.Array, index: jax.Array) -> jax.Array:
    """f32[B, V]: the noise of noise index `index` `[B]` for each row of a batch.

    A row's observed steps (0 <= index < its observation's length) get posterior noise drawn
    with `fold_in(abduction key, index)`; every other step, and every token outside the
    observed step's support, the prior noise `noise(key, index)`.
    """
    vocab = observed.z.shape[-1]
    prior = jax.vmap(lambda k, i: scm.noise(k, i, vocab))(keys, index)
    o = jnp.maximum(observed.row, 0)
    s = jnp.clip(index, 0, observed.z.shape[1] - 1)
    use = (observed.row >= 0) & (index >= 0) & (index < observed.length[o])
    step_keys = jax.vmap(jax.random.fold_in)(observed.key, index)
    post = jax.vmap(race)(observed.z[o, s], observed.tokens[o, s], step_keys, prior)
    return jnp.where(use[:, None], post, prior)
