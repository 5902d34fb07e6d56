"""The decoding engine: bucketed prefill, then a jitted loop over steps on the KV cache.

The loop runs in chunks of up to `chunk` steps, each one call of a jitted `lax.while_loop` (a
scan that can stop early: at the last step asked for, or once every row is done), so a short
run or a late counterfactual computes only its own steps with the one compiled program.

Every token that is chosen (sampled or forced) comes out of the same single-token decode step:
the prefill only fills the cache with `prompt[:-1]`, and step 0 feeds the last prompt token.
So a factual run, a counterfactual that forces an edited prefix, and a run that resumes from a
stored cache all compute each step's logits with identical shapes and rounding.

Slot layout of one row (prompt of length P, bucket length L, left-padded):
  [pad ... pad | prompt[0] ... prompt[P-2]] [prompt[P-1] | resp[0] | resp[1] | ...]
   0            start = L - (P - 1)        L-1   L        L+1       L+2
Step i writes its input token at slot L + i and chooses response token i.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import model, scm
from cfjax.cache import KVCache, init_cache
from cfjax.config import LlamaConfig

MIN_BUCKET = 32
DEFAULT_CHUNK = 64
NOT_FORCED = -1


def bucket_length(n: int) -> int:
    """Prefill length for `n` cached prompt tokens: a power of two >= MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Carry:
    """Loop state of the scan: the token to feed, the cache, its slot, which rows are done."""

    last: jax.Array  # [B] int32, fed at slot `index`
    cache: KVCache
    index: jax.Array  # [] int32
    done: jax.Array  # [B] bool


@dataclasses.dataclass
class Prepared:
    """A batch laid out for decoding: left-padded prompts, their starts and the bucket."""

    prefix: np.ndarray  # [B, L] int32: prompt[:-1], left-padded
    last: np.ndarray  # [B] int32: prompt[-1]
    start: np.ndarray  # [B] int32
    bucket: int


def prepare(prompts: Sequence[Sequence[int]], bucket: int | None = None) -> Prepared:
    """Left-pad `prompt[:-1]` of each row into one bucket; the last token is decoded."""
    if not prompts:
        raise ValueError("no prompt given")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt of row {b} is empty: give at least one token")
    longest = max(len(p) for p in prompts) - 1
    bucket = bucket or bucket_length(longest)
    if longest > bucket:
        raise ValueError(f"prompt of {longest + 1} tokens does not fit bucket {bucket}")
    prefix = np.zeros((len(prompts), bucket), np.int32)
    start = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        n = len(p) - 1
        start[b] = bucket - n
        prefix[b, bucket - n :] = p[:-1]
    last = np.asarray([p[-1] for p in prompts], np.int32)
    return Prepared(prefix, last, start, bucket)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill(config: LlamaConfig, params: dict, prefix, start, cache: KVCache) -> KVCache:
    # Only the cache is returned, so XLA drops the unused LM head of the prompt positions.
    return model.apply(config, params, prefix, start, cache, 0)[1]


def prefill(
    config: LlamaConfig,
    params: dict,
    prep: Prepared,
    cache_length: int,
    cache_dtype=None,
) -> Carry:
    """Fill a fresh cache with the prompts; the carry is ready for response step 0."""
    cache_dtype = cache_dtype or params["embed"]["embedding"].dtype
    # Positions are checked against max_seq_len by the callers (`generate.check_request`), which
    # know the prompt and step counts; the cache itself has pad slots and is rounded up to whole
    # chunks, so its length says nothing about positions. `decode` checks that the steps fit.
    if cache_length <= prep.bucket:
        raise ValueError(
            f"a cache of {cache_length} slots cannot hold a prompt bucket of {prep.bucket} "
            "slots plus the response"
        )
    cache = init_cache(config, len(prep.last), cache_length, cache_dtype)
    cache = _prefill(config, params, jnp.asarray(prep.prefix), jnp.asarray(prep.start), cache)
    return Carry(
        last=jnp.asarray(prep.last),
        cache=cache,
        index=jnp.asarray(prep.bucket, jnp.int32),
        done=jnp.zeros((len(prep.last),), bool),
    )


def _step(config, sampler, stop_tokens, params, keys, start, carry: Carry, xs):
    """One response step: logits of `carry.last`, then choose (or force) the next token."""
    forced, noise_index, cos_sin = xs
    logits, cache = model.apply(
        config, params, carry.last[:, None], start, carry.cache, carry.index, cos_sin
    )
    logits = logits[:, 0]
    chosen, logprob = jax.vmap(scm.choose, in_axes=(0, 0, 0, None))(
        logits, keys, noise_index, sampler
    )
    is_forced = forced != NOT_FORCED
    token = jnp.where(is_forced, forced, chosen)

    # Same quantity as `scm.choose` reports for a chosen token: the sampler's log-prob, or for
    # greedy (a point mass) the model's own log-prob, so forcing a token to itself changes nothing.
    all_lp = (
        jax.nn.log_softmax(logits, axis=-1)
        if sampler.greedy
        else jax.vmap(scm.log_probs, in_axes=(0, None))(logits, sampler)
    )
    forced_lp = jnp.take_along_axis(all_lp, jnp.maximum(forced, 0)[:, None], axis=1)[:, 0]
    logprob = jnp.where(is_forced, forced_lp, logprob)
    valid = ~carry.done
    token = jnp.where(valid, token, 0)
    done = carry.done | jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32)) & valid
    new = Carry(last=token, cache=cache, index=carry.index + 1, done=done)
    return new, (token, logprob, valid)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(6,))
def _run_chunk(config, sampler, stop_tokens, params, keys, start, carry, forced, noise_index, n):
    """Up to `n` steps (a traced count <= the chunk width), ending early once every row is done.

    A while loop rather than a fixed-length scan: one compiled program serves a short last
    chunk, a run resumed mid-chunk and a batch whose rows all stopped, without running (or
    compiling for) steps nobody needs. Steps not run come back as not valid.
    """
    step = functools.partial(_step, config, sampler, stop_tokens, params, keys, start)
    batch, width = forced.shape
    outputs = (
        jnp.zeros((width, batch), jnp.int32),
        jnp.zeros((width, batch), jnp.float32),
        jnp.zeros((width, batch), bool),
    )

    def more(state):
        i, carry, _ = state
        return (i < n) & ~jnp.all(carry.done)

    # RoPE of every step the chunk may run (slot `index + i`), before the loop: see `rotation`.
    slots = carry.index + jnp.arange(width, dtype=jnp.int32)
    positions = model.positions(slots[:, None], start[None, :])[..., None]  # [W, B, 1]
    cos, sin = model.rotation(positions, model.rope_frequencies(config))

    def one(state):
        i, carry, outputs = state
        carry, row = step(carry, (forced[:, i], noise_index[:, i], (cos[i], sin[i])))
        return i + 1, carry, tuple(o.at[i].set(r) for o, r in zip(outputs, row, strict=True))

    _, carry, outputs = jax.lax.while_loop(more, one, (jnp.int32(0), carry, outputs))
    return carry, outputs


@dataclasses.dataclass
class Decoded:
    """Result of `decode`: per-row response tokens (padding removed) and their log-probs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    carry: Carry  # final state; its cache holds every step's keys/values (for cache reuse)


def decode(
    config: LlamaConfig,
    params: dict,
    carry: Carry,
    *,
    start: jax.Array,
    keys: jax.Array,
    sampler: scm.Sampler,
    stop_tokens: Sequence[int],
    steps: int,
    forced: np.ndarray | None = None,
    noise_index: np.ndarray | None = None,
    first_step: int = 0,
    chunk: int = DEFAULT_CHUNK,
    on_chunk: Callable[[list[list[int]]], None] | None = None,
) -> Decoded:
    """Run response steps `[first_step, steps)` in jitted chunks of up to `chunk` steps.

    `forced` `[B, steps]` holds a token to force at a step or NOT_FORCED; `noise_index`
    `[B, steps]` the noise index each step uses (default: the step itself). Chunking never
    changes a token: noise is keyed by step, and every chunk runs the same compiled step.
    Stops early once every row has emitted a stop token.
    """
    batch = carry.last.shape[0]
    # `dynamic_update_slice` clamps a write past the cache's end instead of failing, which would
    # silently overwrite the last slot: refuse a run that does not fit.
    last_slot = int(carry.index) + (steps - first_step) - 1
    if last_slot >= carry.cache.length:
        raise ValueError(
            f"{steps - first_step} steps from slot {int(carry.index)} need {last_slot + 1} cache "
            f"slots, the cache has {carry.cache.length}"
        )
    width = first_step + math.ceil((steps - first_step) / chunk) * chunk
    forced_all = np.full((batch, width), NOT_FORCED, np.int32)
    noise_all = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width)).copy()
    if forced is not None:
        forced_all[:, : forced.shape[1]] = forced
    if noise_index is not None:
        noise_all[:, : noise_index.shape[1]] = noise_index
    stop_tokens = tuple(sorted(int(t) for t in stop_tokens)) or (-1,)
    # jit keys its cache on whether arrays are committed to a device: commit the carry now so
    # the first chunk and the later ones (which get jit outputs) share one compilation.
    carry = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), carry)
    out_tokens: list[np.ndarray] = []
    out_lp: list[np.ndarray] = []
    out_valid: list[np.ndarray] = []
    for s in range(first_step, steps, chunk):
        carry, (tok, lp, valid) = _run_chunk(
            config,
            sampler,
            stop_tokens,
            params,
            keys,
            start,
            carry,
            jnp.asarray(forced_all[:, s : s + chunk]),
            jnp.asarray(noise_all[:, s : s + chunk]),
            jnp.asarray(min(chunk, steps - s), jnp.int32),
        )
        out_tokens.append(np.asarray(tok).T)
        out_lp.append(np.asarray(lp).T)
        out_valid.append(np.asarray(valid).T)
        if on_chunk is not None:
            on_chunk(_rows(out_tokens, out_valid, steps - first_step))
        if bool(np.all(np.asarray(carry.done))):
            break
    tokens = _rows(out_tokens, out_valid, steps - first_step)
    lps = _rows(out_lp, out_valid, steps - first_step)
    return Decoded(tokens, [[float(x) for x in r] for r in lps], carry)


def _rows(parts: list[np.ndarray], valid: list[np.ndarray], limit: int) -> list[list]:
    values = np.concatenate(parts, axis=1)[:, :limit]
    mask = np.concatenate(valid, axis=1)[:, :limit]
    return [values[b][mask[b]].tolist() for b in range(values.shape[0])]


def cache_length(bucket: int, steps: int, chunk: int = DEFAULT_CHUNK) -> int:
    """Slots for a prompt bucket plus `steps` response steps, rounded up to whole chunks.

    Step i writes slot `bucket + i` and a chunk never runs past the last step asked for, so
    `bucket + steps` slots suffice, also for a run resumed mid-chunk; rounding up lets nearby
    lengths share one compiled program. Every decode step attends over all slots (masked past
    the current one), so each spare slot costs attention time at every step.
    """
    return bucket + math.ceil(steps / chunk) * chunk


@dataclasses.dataclass
class Runtime:
    """The final cache of a run, kept beside its trace so a counterfactual can resume from it.

    The cache is position-indexed and attention never looks past the current slot, so the final
    cache already holds, in its first `bucket + s + 1` slots, the exact state after step s.
    """

    cache: KVCache
    prep: Prepared
    chunk: int
    params: Any = dataclasses.field(repr=False)  # the params that filled the cache
    row_index: int = 0

    def row(self, b: int) -> Runtime:
        """The same runtime seen from row `b` of its batch."""
        return dataclasses.replace(self, row_index=b)


def resume(
    runtimes: Sequence[Runtime], step: int, last_tokens: Sequence[int]
) -> tuple[Carry, np.ndarray]:
    """One carry that continues each runtime's row at response step `step`, and the rows'
    starts; `last_tokens[b]` is the token row b feeds at that step (its response token
    `step - 1`, or its last prompt token at step 0).

    Rows of one cache (e.g. many counterfactuals of one trace) are gathered with one `take` per
    layer array, a new array: the decode donates its cache, and the stored one must survive.
    """
    parts, starts = [], []
    for _, group in itertools.groupby(runtimes, key=lambda rt: id(rt.cache)):
        group = list(group)
        rows = np.asarray([rt.row_index for rt in group])
        parts.append(
            jax.tree_util.tree_map(lambda x, rows=rows: jnp.take(x, rows, axis=0), group[0].cache)
        )
        starts.append(group[0].prep.start[rows])
    cache = (
        parts[0]
        if len(parts) == 1
        else jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
    )
    carry = Carry(
        last=jnp.asarray(last_tokens, jnp.int32),
        cache=cache,
        index=jnp.asarray(runtimes[0].prep.bucket + step, jnp.int32),
        done=jnp.zeros((len(runtimes),), bool),
    )
    return carry, np.concatenate(starts)
