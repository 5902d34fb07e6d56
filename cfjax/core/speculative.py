"""Exact speculative decoding under the Gumbel-Max SCM: a draft proposes, the target decides.

A round at step i: the draft model chooses `k` tokens d_0..d_{k-1} with the *same* noise and
sampler as the target (steps i..i+k-1); the target then scores its last token and the k
proposals in one pass of k + 1 tokens, which reads its weights once, and makes its own choice y_j
at each of the k + 1 steps. Proposals are kept while d_j == y_j; at the first disagreement the
target's y_j is taken instead (and when all k agree, the target's y_k comes free). Every token
emitted is the target's own choice given the target's own prefix, so the tokens are those of
plain decoding: counterfactuals stay counterfactuals, forced tokens stay forced.

In floating point this also needs the pass over k + 1 tokens to round every logit as the
one-token step does, and it does by construction: the model's sums and matmuls are
batch-invariant (`invariant`), so the pass's extra positions are more rows of the same tiles and
the same fixed-order sums. On the CPU the tokens and log-probs are plain decoding's bit for bit
(`test_speculative_is_plain_bit_for_bit`, float32 and bfloat16); on accelerators
`benchmarks/gpu_check.sh` counts flips (`speculative_flips`).

Rows of a batch advance together by the fewest tokens any unfinished row accepted, so the cache
keeps one write slot per batch (see `cache`); a row that accepted more re-proposes the rest.
Under `vmap` (`core.sample`) each row is a batch of one and advances on its own.

The draft keeps its own KV cache over the same slots. Each of its steps feeds two tokens (the
first step: the one before the target's last token, then the last token, which rewrites the one
slot a fully accepted round left unfilled), so that all its steps are one loop body; the target
writes k + 1 slots a round, so a speculative run's cache has `lookahead` spare slots past its
last step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cfjax.core import model
from cfjax.core.cache import init_cache
from cfjax.core.config import LlamaConfig
from cfjax.core.kernel import DraftSpec, DraftState, Options, Outputs, Rows, State, choose

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

    @property
    def spec(self) -> DraftSpec:
        """The static half (config, lookahead) for the kernel's `Options`."""
        return DraftSpec(self.config, self.lookahead)


def start(config, params, prefix, start_slot, length: int, fed, n_fed) -> DraftState:
    """The draft's cache over the prompt prefix `[B, P]` (as `kernel.layout` gives it) and the
    first `n_fed` tokens of `fed` `[B, W]`: the tokens fed at slots P, P + 1, ... before a resume
    step (the last prompt token, then the response so far; W = n_fed = 0 for a fresh run).
    Slots past them get padding, which the rounds overwrite before any query can see it."""
    cache = init_cache(config, prefix.shape[0], length, model.compute_dtype(params))
    cache = model.apply(config, params, prefix, start_slot, cache, 0, prompt=True)[1]
    if not fed.shape[1]:
        return DraftState(cache, prefix[:, -1])
    cache = model.apply(config, params, fed, start_slot, cache, prefix.shape[1])[1]
    before = jnp.take_along_axis(fed, jnp.broadcast_to(n_fed - 1, (fed.shape[0], 1)), 1)[:, 0]
    return DraftState(cache, before)


def pad_rows(rows: Rows, k: int) -> Rows:
    """A round reads the inputs of up to k + 1 steps past its first: pad them (never emitted)."""

    def pad(x, value):
        return jnp.pad(x, ((0, 0), (0, k + 1)) + ((0, 0),) * (x.ndim - 2), constant_values=value)

    index = rows.noise_index
    more = index[:, -1:] + 1 + jnp.arange(k + 1, dtype=jnp.int32)[None]
    return dataclasses.replace(
        rows, forced=pad(rows.forced, -1), noise_index=jnp.concatenate([index, more], axis=1),
        noise=None if rows.noise is None else pad(rows.noise, 0.0),
    )  # fmt: skip


def _at(x, i, j):
    return jax.lax.dynamic_index_in_dim(x, i + j, axis=1, keepdims=False)


def _choose_at(rows: Rows, logits, i, j):
    noise = None if rows.noise is None else _at(rows.noise, i, j)
    return choose(rows, logits, _at(rows.forced, i, j), _at(rows.noise_index, i, j), noise)


def _propose(draft: DraftSpec, draft_params, rows: Rows, state: State, i):
    """The draft's k tokens for steps i..i+k-1 `[B, k]`, and its cache.

    Step j feeds two tokens, the one before its input and its input (the first: the token
    before the target's last and the last, which rewrites the slot a fully accepted round left
    unfilled), so that every step is one loop body and the round's program holds the draft's
    layers once: XLA's compile grows with the program, and a separate two-token first step
    beside one-token steps held them twice. The second token costs little where a step streams
    the draft's weights (small batches), more where its dots are compute-bound (measured in
    benchmarks/RESULTS.md). The target's tokens never depend on the draft's."""
    dc = state.draft
    # fed[:, j:j + 2] is step j's input: [before, last, d_0, ..., d_{k-1}].
    fed = jnp.pad(jnp.stack([dc.before, state.last], axis=1), ((0, 0), (0, draft.lookahead)))

    def step(j, carry):
        fed, cache = carry
        two = jax.lax.dynamic_slice_in_dim(fed, j, 2, axis=1)
        logits, cache = model.apply(draft.config, draft_params, two, rows.start, cache, state.index - 1 + j)  # fmt: skip
        token = _choose_at(rows, logits[:, 1], i, j)[0]
        return jax.lax.dynamic_update_index_in_dim(fed, token, j + 2, axis=1), cache

    fed, cache = jax.lax.fori_loop(0, draft.lookahead, step, (fed, dc.cache))
    return fed[:, 2:], cache


def round_(config, options: Options, params, draft_params, rows: Rows, n, i, state: State, outputs: Outputs):  # fmt: skip
    """One speculative round from call step `i`: the draft proposes k tokens, the target scores
    its last token and them in one pass and keeps its own choices up to the first disagreement.
    Returns the steps advanced, the new state and the outputs with the round's block written."""
    k = options.draft.lookahead
    proposed, dcache = _propose(options.draft, draft_params, rows, state, i)
    fed = jnp.concatenate([state.last[:, None], proposed], axis=1)  # [B, k + 1]
    logits, cache = model.apply(config, params, fed, rows.start, state.cache, state.index)
    chosen = [_choose_at(rows, logits[:, j], i, j) for j in range(k + 1)]
    tokens = jnp.stack([c[0] for c in chosen], axis=1)  # [B, k + 1]
    logprobs = jnp.stack([c[1] for c in chosen], axis=1)
    # Row b keeps the target's tokens up to its first disagreement with the draft, its first
    # stop token, or the steps left; the batch advances by the fewest of its unfinished rows.
    agree = jnp.cumprod(tokens[:, :k] == proposed, axis=1, dtype=jnp.int32).sum(1)
    is_stop = jnp.isin(tokens, jnp.asarray(options.stop_tokens, jnp.int32))
    first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), k)
    keep = jnp.minimum(jnp.minimum(agree, first_stop) + 1, n - i)
    advance = jnp.maximum(jnp.min(jnp.where(state.done, k + 1, keep)), 1)
    emitted = (jnp.arange(k + 1)[None, :] < advance) & ~state.done[:, None]  # [B, k + 1]
    tokens = jnp.where(emitted, tokens, 0)
    logprobs = jnp.where(emitted, logprobs, 0.0)
    done = state.done | jnp.any(is_stop & emitted, axis=1)
    block = Outputs(tokens.T, logprobs.T, emitted.T,
                    jnp.swapaxes(logits, 0, 1) if options.keep_logits else None)  # fmt: skip
    outputs = jax.tree_util.tree_map(
        lambda o, b: jax.lax.dynamic_update_slice_in_dim(o, b, i, axis=0), outputs, block
    )
    # The next round's first token, at the new slot, and the token at the slot before it.
    draft = DraftState(dcache, _at(fed, advance - 1, 0))
    state = State(_at(tokens, advance - 1, 0), cache, state.index + advance, done, draft)
    return advance, state, outputs
