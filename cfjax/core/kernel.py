"""The decode kernel's pieces: its options, its pytrees, the prompt layout, the prefill, and the
one function that chooses (or forces) a token from a step's logits.

Every token that is chosen comes out of the same single-token decode step (`step`): the prefill
only fills the cache with `prompt[:-1]`, and step 0 feeds the last prompt token. So a factual
run, a counterfactual that forces an edited prefix, and a run that resumes from a stored cache
compute each step's logits with identical shapes and rounding. (With a draft, `speculative`
scores several steps per pass instead: the same tokens, see there.)

Slot layout of one row (prompt of length n in a buffer of P = bucket slots, left-padded):
  [pad ... pad | prompt[0] ... prompt[n-2]] [prompt[n-1] | resp[0] | resp[1] | ...]
   0            start = P - (n - 1)        P-1   P        P+1       P+2
Step i writes its input token at slot P + i and chooses response token i. The cache has
`cache_length(P, steps)` slots, a function of the two static sizes alone, so `core.sample` on a
prompt padded to `bucket_length(n)` runs exactly the program shapes `cfjax.generate` runs.

The prefill computes the prompts anchored at slot 0 (`fill`), where a slot's keys and values
depend on the tokens up to it alone, and then moves each row into this layout (`roll_in`): so
prompts that share a prefix share its keys and values bit for bit, which lets a batch of edited
prompts reuse the unedited prefix (`runtime.prefix`). The host driver's prefill computes only
the first quarters of the bucket that hold a prompt (`prefill_window`); `core.sample`, whose
prompt lengths may be traced, prefills the whole bucket: the same keys and values in every real
slot.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from cfjax.core import invariant, model, posterior, scm, spec
from cfjax.core.cache import KEY_SLOT_AXIS, VALUE_SLOT_AXIS, KVCache, init_cache
from cfjax.core.config import LlamaConfig

MIN_BUCKET = 32
DEFAULT_CHUNK = 64
NOT_FORCED = -1


def bucket_length(n: int) -> int:
    """Prompt buffer for an `n`-token prompt: the first quarters (whole blocks of 32 slots at
    least) of the power of two >= max(n, MIN_BUCKET) that hold it.

    Every decode step attends over every slot of the cache, so a 600-token prompt in 1,024
    slots would pay for 424 slots of padding at every step; in 768 it pays for 168. A slot's
    place within its block of 32 is the same in either (a bucket is a multiple of the block),
    and the blocks left out are padding in every row, which adds exact zeros: the same bits.
    Quarters bound the programs to two per power of two (a bucket holds prompts longer than
    half of it)."""
    size = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    step = max(MIN_BUCKET, size // 4)
    return min(size, -(-n // step) * step)


def cache_length(bucket: int, steps: int, chunk: int = DEFAULT_CHUNK, spare: int = 0) -> int:
    """Slots for a prompt bucket plus `steps` response steps (and `spare` more), rounded up to
    whole chunks.

    Step i writes slot `bucket + i`, so `bucket + steps` slots suffice; rounding up lets nearby
    lengths share one compiled program. Every decode step attends over all slots (masked past
    the current one), so each spare slot costs attention time at every step.
    """
    return bucket + math.ceil((steps + spare) / chunk) * chunk


def stop_tuple(stop_tokens) -> tuple[int, ...]:
    """Stop tokens as a sorted tuple (static); (-1,) matches no token."""
    return tuple(sorted(int(t) for t in stop_tokens)) or (-1,)


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """The static half of a draft model: its config and the tokens it proposes per round."""

    config: LlamaConfig
    lookahead: int


@dataclasses.dataclass(frozen=True)
class Options:
    """How the kernel decodes (static: one compiled program per value).

    `early_exit`: also stop once every row is done (the host driver; `core.sample` runs without
    it, so that its loop condition depends on the step count alone, which `vmap` leaves
    unbatched). `keep_logits`: return every step's f32 logits (to score observed text).
    `draft`: decode by speculative rounds of this draft (its params are an argument).
    """

    stop_tokens: tuple[int, ...] = (-1,)
    early_exit: bool = False
    keep_logits: bool = False
    draft: DraftSpec | None = None

    @property
    def spare(self) -> int:
        """Cache slots needed past the last step: a round writes `lookahead` slots ahead."""
        return 0 if self.draft is None else self.draft.lookahead


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """What stays fixed per row during a decode: key, first real slot, sampler values, and per
    step (`[B, W]`, W the steps the call may run): the token to force (`NOT_FORCED`: sample),
    the noise index, optional explicit noise `[B, W, V]`, and for rows that replay observed
    text, the observation their noise is abducted from."""

    key: jax.Array  # [B] typed keys
    start: jax.Array  # [B] int32
    sampler: scm.Sampler  # leaves [B]
    forced: jax.Array  # [B, W] int32
    noise_index: jax.Array  # [B, W] int32
    noise: jax.Array | None = None  # [B, W, V] float32
    observed: posterior.Observed | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftState:
    """The draft's state between rounds: its cache and the token at the slot before the
    target's write slot (which the draft re-feeds first)."""

    cache: KVCache
    before: jax.Array  # [B] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
    """Decode state carried between steps (and between a host driver's chunks): the token to
    feed, the cache, the slot it is written at (shared by the rows), which rows are done, and
    with a draft, the draft's state."""

    last: jax.Array  # [B] int32, fed at slot `index`
    cache: KVCache
    index: jax.Array  # [] int32
    done: jax.Array  # [B] bool
    draft: DraftState | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Outputs:
    """Per step and row (`[W, B]`): the token, its log-prob, whether the step ran for the row;
    with `keep_logits` the f32 logits `[W, B, V]`."""

    tokens: jax.Array
    logprobs: jax.Array
    valid: jax.Array
    logits: jax.Array | None = None

    @classmethod
    def empty(cls, width: int, batch: int, vocab: int | None) -> Outputs:
        """Zeros for `width` steps (logits when `vocab` is given)."""
        logits = None if vocab is None else jnp.zeros((width, batch, vocab), jnp.float32)
        return cls(jnp.zeros((width, batch), jnp.int32), jnp.zeros((width, batch), jnp.float32),
                   jnp.zeros((width, batch), bool), logits)  # fmt: skip


def layout(prompt: jax.Array, prompt_length: jax.Array) -> tuple[jax.Array, ...]:
    """(prefix [B, P], last [B], start [B]) of right-padded prompts `[B, P]` with lengths `[B]`.

    The prefix holds `prompt[:n-1]` left-padded into the P slots; the last token is decoded.
    """
    p = prompt.shape[1]
    n = jnp.asarray(prompt_length, jnp.int32)
    start = p - (n - 1)
    src = jnp.arange(p, dtype=jnp.int32)[None, :] - start[:, None]
    gathered = jnp.take_along_axis(prompt, jnp.clip(src, 0, p - 1), axis=1)
    prefix = jnp.where(src >= 0, gathered, 0).astype(jnp.int32)
    last = jnp.take_along_axis(prompt, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    return prefix, last.astype(jnp.int32), start


def anchored(prompt: jax.Array, prompt_length: jax.Array) -> jax.Array:
    """Right-padded prompts `[B, P]` with lengths `[B]` as the prefill computes them:
    `prompt[:n-1]` from slot 0, zeros after (the last token is decoded)."""
    n = jnp.asarray(prompt_length, jnp.int32)
    slots = jnp.arange(prompt.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(slots < (n - 1)[:, None], prompt, 0).astype(jnp.int32)


def prefill_window(longest: int, bucket: int) -> int:
    """The prefill's slots for prompts of at most `longest` tokens in a `bucket`: the first
    quarters of the bucket's power of two (whole blocks of 32 slots at least, as in
    `bucket_length`) that hold every row's `prompt[:-1]`.

    The slots past the window are padding in every row, invisible to every real query; leaving
    them out changes no bit of a real slot's keys and values (the same keys attended, the same
    sums and matmul rows: `invariant`), and saves their share of a compute-bound prefill (a
    97-token prompt in a buffer of 128 slots has a window of 96; a buffer wider than its
    prompt's bucket, as `padded(..., width)` makes, the same). Quarters bound the prefill
    programs to three per buffer."""
    step = max(invariant.BLOCK, (1 << max(bucket - 1, 0).bit_length()) // 4)
    return min(bucket, -(-max(longest - 1, 1) // step) * step)


def fill(config: LlamaConfig, params, tokens: jax.Array, index, cache: KVCache) -> KVCache:
    """Prompt tokens `[B, T]` written at slots `[index, index + T)` of an anchored cache (every
    row's prompt from slot 0, so a slot is its token's position), `index` a static int or `[B]`.

    A slot's keys and values are a function of the tokens up to it alone, bit for bit: the
    attention sums group slots in blocks counted from slot 0, the invisible slots after a query
    add exact zeros, and a row's matmul rows round alike in any batch (`invariant`). So two
    prompts that share their first c tokens share their first c slots, however each was filled:
    in one call from slot 0 or in segments, alone or in a batch (`runtime.prefix` builds on it).
    Only the cache is kept, so XLA drops the LM head of the prompt positions.
    """
    zero = jnp.zeros((tokens.shape[0],), jnp.int32)
    return model.apply(config, params, tokens, zero, cache, index, prompt=True)[1]


def shift(cache: KVCache, source: jax.Array, to: jax.Array, count: jax.Array, length: int) -> KVCache:  # fmt: skip
    """A cache of `length` slots that holds row b's `count[b]` slots from `source[b]` on at the
    slots from `to[b]` on; every other slot zero.

    Each row is one window of its layer array (zero-padded by `length` slots on both sides, so
    that every window lies inside): a gather of whole slot runs, which XLA:CPU copies ~2x
    faster than the per-element gather of `take_along_axis` (an attribution sweep's 44-row
    cache: 32 against 66 ms, benchmarks/RESULTS.md)."""
    i32 = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (cache.batch,))  # noqa: E731
    offset = i32(source) - i32(to) + length
    at = jnp.arange(length, dtype=jnp.int32)[None, :] - i32(to)[:, None]  # [B, length]
    real = (at >= 0) & (at < i32(count)[:, None])
    k = [_move(x, offset, real, KEY_SLOT_AXIS, length) for x in cache.k]
    return KVCache(k, [_move(x, offset, real, VALUE_SLOT_AXIS, length) for x in cache.v])


@functools.partial(jax.jit, static_argnums=(3, 4))
def _move(x, offset, real, axis: int, length: int):
    """One layer array of `shift`: a function every layer calls (traced once, not per layer)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (length, length)
    window = lambda row, o: jax.lax.dynamic_slice_in_dim(row, o, length, axis=axis - 1)  # noqa: E731
    moved = jax.vmap(window)(jnp.pad(x, pad), offset)
    shape = [x.shape[0], 1, 1, 1]
    shape[axis] = length
    return jnp.where(real.reshape(shape), moved, jnp.zeros((), x.dtype))


def roll_in(config: LlamaConfig, cache: KVCache, prompt_length, bucket: int, length: int) -> tuple[KVCache, jax.Array]:  # fmt: skip
    """The decode's cache of `length` slots from an anchored one: row b's `prompt[:n-1]` moved to
    end at slot `bucket - 1` (left-padded: the layout of the module docstring), every other
    slot zero. Returns the cache and each row's first real slot."""
    n = jnp.asarray(prompt_length, jnp.int32)
    start = bucket - (n - 1)
    moved = shift(cache, jnp.zeros_like(n), start, n - 1, length)
    return spec.constrain_cache(moved, config), start


def prefill(config: LlamaConfig, params, prompt, prompt_length, length: int, window: int | None = None) -> tuple[State, jax.Array]:  # fmt: skip
    """Fill a fresh cache of `length` slots (in the params' dtype) with the prompts: the state
    ready for step 0, and each row's first real slot. The prompts are computed anchored at slot
    0 (`fill`), then moved into the decode's layout (`roll_in`). `window` (static, default the
    whole bucket): compute only the first `window` slots (`prefill_window`)."""
    width = prompt.shape[1] if window is None else window
    cache = init_cache(config, prompt.shape[0], width, model.compute_dtype(params))
    cache = spec.constrain_cache(cache, config)  # under a mesh: sharded by the rules
    cache = fill(config, params, anchored(prompt, prompt_length)[:, :width], 0, cache)
    cache, start = roll_in(config, spec.constrain_cache(cache, config), prompt_length, prompt.shape[1], length)  # fmt: skip
    return initial_state(prompt, prompt_length, cache), start


def prefilled(config: LlamaConfig, params, prompt, prompt_length, length: int, window: int | None = None) -> tuple[State, jax.Array]:  # fmt: skip
    """What `prefill` returns, without its forward: the same shapes and types, for tracing
    what follows a prefill (a zero cache; each row's first real slot)."""
    n = jnp.asarray(prompt_length, jnp.int32)
    cache = init_cache(config, prompt.shape[0], length, model.compute_dtype(params))
    return initial_state(prompt, n, cache), prompt.shape[1] - (n - 1)


def initial_state(prompt, prompt_length, cache: KVCache) -> State:
    """The state ready for step 0 over a filled cache: each row feeds its last prompt token at
    the bucket's end."""
    n = jnp.asarray(prompt_length, jnp.int32)
    last = jnp.take_along_axis(prompt, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0].astype(jnp.int32)  # fmt: skip
    return State(last, cache, jnp.asarray(prompt.shape[1], jnp.int32), jnp.zeros(last.shape, bool))


def choose(rows: Rows, logits: jax.Array, forced, noise_index, noise) -> tuple[jax.Array, ...]:
    """Every row's (token, logprob) at one step from its f32 logits `[B, V]`: sampled by the
    SCM with the step's noise (abducted for observed rows), or forced."""
    if rows.observed is not None:
        noise = posterior.step_noise(rows.observed, rows.key, noise_index)
    return jax.vmap(scm.choose_or_force)(logits, rows.key, noise_index, rows.sampler, noise, forced)


def step(config: LlamaConfig, options: Options, params, rows: Rows, state: State, i, cos_sin):
    """Response step `i` of the call for every row: logits of `state.last`, then choose or
    force a token. Returns the new state and the step's outputs (tokens, logprobs, valid[,
    logits]) per row."""
    logits, cache = model.apply(
        config, params, state.last[:, None], rows.start, state.cache, state.index, cos_sin
    )
    noise = None if rows.noise is None else rows.noise[:, i]
    token, logprob = choose(rows, logits[:, 0], rows.forced[:, i], rows.noise_index[:, i], noise)
    valid = ~state.done
    token = jnp.where(valid, token, 0)
    logprob = jnp.where(valid, logprob, 0.0)
    done = state.done | jnp.isin(token, jnp.asarray(options.stop_tokens, jnp.int32)) & valid
    out = (token, logprob, valid)
    if options.keep_logits:
        out += (logits[:, 0].astype(jnp.float32),)
    return dataclasses.replace(
        state, last=token, cache=cache, index=state.index + 1, done=done
    ), out
