"""Exact speculative decoding under the Gumbel-Max SCM: a draft proposes, the target decides.

A round at step i: the draft model chooses `k` tokens d_0..d_{k-1} with the *same* noise and
sampler as the target (steps i..i+k-1); the target then scores its last token and the k
proposals in one pass of k + 1 tokens, which reads its weights once, and makes its own choice y_j
at each of the k + 1 steps. Proposals are kept while d_j == y_j; at the first disagreement the
target's y_j is taken instead (and when all k agree, the target's y_k comes free). Every token
emitted is the target's own choice given the target's own prefix, so the tokens are those of
plain decoding: counterfactuals stay counterfactuals, forced tokens stay forced.

In floating point the pass over k + 1 tokens rounds a logit differently from the one-token
step (different matmul kernels and reductions: up to ~1e-4 on SmolLM2's logits), so a choice
at a near-tie could in principle differ from plain decoding. XLA:CPU gives no shape-independent
rounding to build on (its row reductions and matmuls change kernels with the number of rows),
so this is measured, not prevented: `benchmarks/decode.py` counts flips against plain decoding
(none so far), and the tests check equality on every sampler.

Rows of a batch advance together by the fewest tokens any unfinished row accepted, so the cache
keeps one write slot per batch (see `cache`); a row that accepted more re-proposes the rest.
Under `vmap` (`core.sample`) each row is a batch of one and advances on its own.

The draft keeps its own KV cache over the same slots. Its first call of a round feeds two tokens
(the one before the target's last token, then the last token), which rewrites the one slot a
fully accepted round left unfilled; the target writes k + 1 slots a round, so a speculative
run's cache has `lookahead` spare slots past its last step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cfjax.core import model, posterior, scm
from cfjax.core.cache import KVCache, init_cache
from cfjax.core.config import LlamaConfig

DEFAULT_LOOKAHEAD = 4


@dataclasses.dataclass(frozen=True)
class Draft:
    """A draft model for speculative decoding: its config, params, and how many tokens it
    proposes per round (`lookahead`)."""

    config: LlamaConfig
    params: dict
    lookahead: int = DEFAULT_LOOKAHEAD

    def __post_init__(self):
        if not isinstance(self.lookahead, int) or not 1 <= self.lookahead <= 16:
            raise ValueError(f"lookahead must be an int in [1, 16], got {self.lookahead!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftCarry:
    """The draft's state between rounds: its cache and the token at the slot before the
    target's write slot (which the draft re-feeds first)."""

    cache: KVCache
    before: jax.Array  # [B] int32


def start(config, params, prefix, start_slot, length: int, fed, n_fed) -> DraftCarry:
    """The draft's cache over the prompt prefix `[B, P]` (as `engine.layout` gives it) and the
    first `n_fed` tokens of `fed` `[B, W]`: the tokens fed at slots P, P + 1, ... before a resume
    step (the last prompt token, then the response so far; W = n_fed = 0 for a fresh run).
    Slots past them get padding, which the rounds overwrite before any query can see it."""
    cache = init_cache(config, prefix.shape[0], length, model.compute_dtype(params))
    cache = model.apply(config, params, prefix, start_slot, cache, 0, prompt=True)[1]
    if not fed.shape[1]:
        return DraftCarry(cache, prefix[:, -1])
    cache = model.apply(config, params, fed, start_slot, cache, prefix.shape[1])[1]
    before = jnp.take_along_axis(fed, jnp.broadcast_to(n_fed - 1, (fed.shape[0], 1)), 1)[:, 0]
    return DraftCarry(cache, before)


def _choose(rows, logits, forced, noise_index, noise):
    """Every row's choice (token, logprob) at one step from its f32 logits `[B, V]`."""
    if rows.observed is not None:
        noise = posterior.step_noise(rows.observed, rows.key, noise_index)
    return jax.vmap(scm.choose_or_force)(logits, rows.key, noise_index, rows.sampler, noise, forced)


def loop(
    config, stop_tokens, params, rows, carry, forced, noise_index, noise, n, early_exit,
    keep_logits, draft: Draft, draft_carry: DraftCarry,
):  # fmt: skip
    """`engine.loop` by speculative rounds: up to `n` steps, the same outputs `[W, B]` (and
    the same carry), plus the draft's carry and the number of rounds run."""
    k = draft.lookahead
    batch, width = forced.shape
    stops = jnp.asarray(stop_tokens, jnp.int32)

    # A round reads the inputs of up to k + 1 steps past its first: pad them (never emitted).
    def pad(x, value):
        return jnp.pad(x, ((0, 0), (0, k + 1)) + ((0, 0),) * (x.ndim - 2), constant_values=value)

    forced = pad(forced, -1)
    noise_index = jnp.concatenate(
        [noise_index, noise_index[:, -1:] + 1 + jnp.arange(k + 1, dtype=jnp.int32)[None]], axis=1
    )
    noise = None if noise is None else pad(noise, 0.0)
    outputs = (
        jnp.zeros((width + k + 1, batch), jnp.int32),
        jnp.zeros((width + k + 1, batch), jnp.float32),
        jnp.zeros((width + k + 1, batch), bool),
    ) + (
        (jnp.zeros((width + k + 1, batch, config.vocab_size), jnp.float32),) if keep_logits else ()
    )
    at = lambda x, i, j: jax.lax.dynamic_index_in_dim(x, i + j, axis=1, keepdims=False)  # noqa: E731
    noise_at = lambda i, j: None if noise is None else at(noise, i, j)  # noqa: E731

    def propose(i, carry, dc):
        """The draft's k tokens for steps i..i+k-1, and its carry."""
        two = jnp.stack([dc.before, carry.last], axis=1)
        logits, cache = model.apply(draft.config, draft.params, two, rows.start, dc.cache, carry.index - 1)  # fmt: skip
        token = _choose(
            rows, logits[:, 1], at(forced, i, 0), at(noise_index, i, 0), noise_at(i, 0)
        )[0]
        proposals = [token]
        for j in range(1, k):
            logits, cache = model.apply(
                draft.config, draft.params, token[:, None], rows.start, cache, carry.index + j
            )
            token = _choose(rows, logits[:, 0], at(forced, i, j), at(noise_index, i, j), noise_at(i, j))[0]  # fmt: skip
            proposals.append(token)
        return jnp.stack(proposals, axis=1), cache  # [B, k]

    def round_(state):
        i, carry, dc, outputs, rounds = state
        proposed, dcache = propose(i, carry, dc)
        fed = jnp.concatenate([carry.last[:, None], proposed], axis=1)  # [B, k + 1]
        logits, cache = model.apply(config, params, fed, rows.start, carry.cache, carry.index)
        chosen = [_choose(rows, logits[:, j], at(forced, i, j), at(noise_index, i, j), noise_at(i, j)) for j in range(k + 1)]  # fmt: skip
        tokens = jnp.stack([c[0] for c in chosen], axis=1)  # [B, k + 1]
        logprobs = jnp.stack([c[1] for c in chosen], axis=1)
        # Row b keeps the target's tokens up to its first disagreement with the draft, its first
        # stop token, or the steps left; the batch advances by the fewest of its unfinished rows.
        agree = jnp.cumprod(tokens[:, :k] == proposed, axis=1, dtype=jnp.int32).sum(1)
        is_stop = jnp.isin(tokens, stops)
        first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), k)
        keep = jnp.minimum(jnp.minimum(agree, first_stop) + 1, n - i)
        advance = jnp.maximum(jnp.min(jnp.where(carry.done, k + 1, keep)), 1)
        emitted = (jnp.arange(k + 1)[None, :] < advance) & ~carry.done[:, None]  # [B, k + 1]
        tokens = jnp.where(emitted, tokens, 0)
        logprobs = jnp.where(emitted, logprobs, 0.0)
        done = carry.done | jnp.any(is_stop & emitted, axis=1)
        last = at(tokens, advance - 1, 0)  # the next round's first token, at the new slot
        before = at(fed, advance - 1, 0)  # the token at the slot before it
        block = (tokens.T, logprobs.T, emitted.T) + (
            (jnp.swapaxes(logits, 0, 1),) if keep_logits else ()
        )
        outputs = tuple(
            jax.lax.dynamic_update_slice_in_dim(o, b, i, axis=0)
            for o, b in zip(outputs, block, strict=True)
        )
        carry = type(carry)(last, cache, carry.index + advance, done)
        return i + advance, carry, DraftCarry(dcache, before), outputs, rounds + 1

    def more(state):
        i, carry = state[0], state[1]
        return (i < n) & ~jnp.all(carry.done) if early_exit else i < n

    i, carry, draft_carry, outputs, rounds = jax.lax.while_loop(
        more, round_, (jnp.int32(0), carry, draft_carry, outputs, jnp.int32(0))
    )
    return carry, draft_carry, tuple(o[:width] for o in outputs), rounds


@functools.partial(jax.jit, static_argnums=(0, 1, 9, 10), donate_argnums=(4, 12))
def run_chunk(config, stop_tokens, params, rows, carry, forced, noise_index, noise, n, logits,
              draft_static, draft_params, draft_carry):  # fmt: skip
    """`engine._run_chunk` by speculative rounds (the draft's config and lookahead static)."""
    draft = Draft(draft_static[0], draft_params, draft_static[1])
    return loop(config, stop_tokens, params, rows, carry, forced, noise_index, noise, n, True,
                logits, draft, draft_carry)  # fmt: skip


start_jit = jax.jit(start, static_argnums=(0, 4))
