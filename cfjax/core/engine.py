"""The engine: prompt layout, prefill, one step function, the decode loop, and `sample`.

Every route runs the same `step`: `sample` (one row, pure: jit, vmap and a user's own jitted code
all work) and `run` (the host entry behind `generate`, `counterfactual(s)` and `interventional`:
a batch, chunked so that it can stream, stop early and resume from a stored cache).

Every token that is chosen (sampled or forced) comes out of the same single-token decode step:
the prefill only fills the cache with `prompt[:-1]`, and step 0 feeds the last prompt token.
So a factual run, a counterfactual that forces an edited prefix, and a run that resumes from a
stored cache all compute each step's logits with identical shapes and rounding. (With a draft,
`speculative` scores several steps per pass instead: the same tokens, see there.)

Slot layout of one row (prompt of length n in a buffer of P = bucket slots, left-padded):
  [pad ... pad | prompt[0] ... prompt[n-2]] [prompt[n-1] | resp[0] | resp[1] | ...]
   0            start = P - (n - 1)        P-1   P        P+1       P+2
Step i writes its input token at slot P + i and chooses response token i. The cache has
`cache_length(P, steps)` slots, a function of the two static sizes alone, so `sample` on a prompt
padded to `bucket_length(n)` runs exactly the program shapes `generate` runs. The one exception:
a batch of `GROW_MIN_BATCH` rows or more on the CPU starts with the slots of its first chunk
and grows the cache (one copy) before each chunk (see `grows`); its stored cache still has
every slot, and a run resumed from it computes every step with the factual run's shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cfjax.core import model, posterior, scm, spec, speculative
from cfjax.core.cache import KEY_SLOT_AXIS, VALUE_SLOT_AXIS, KVCache, init_cache
from cfjax.core.config import LlamaConfig
from cfjax.core.request import as_key, check_tokens, count

MIN_BUCKET = 32
DEFAULT_CHUNK = 64
NOT_FORCED = -1
# From this many rows on, a run on the CPU grows its cache a chunk at a time (see `_run`).
GROW_MIN_BATCH = 16


def bucket_length(n: int) -> int:
    """Prompt buffer for an `n`-token prompt: a power of two >= max(n, MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def cache_length(bucket: int, steps: int, chunk: int = DEFAULT_CHUNK, spare: int = 0) -> int:
    """Slots for a prompt bucket plus `steps` response steps (and `spare` more), rounded up to
    whole chunks.

    Step i writes slot `bucket + i`, so `bucket + steps` slots suffice; rounding up lets nearby
    lengths share one compiled program. Every decode step attends over all slots (masked past
    the current one), so each spare slot costs attention time at every step.
    """
    return bucket + math.ceil((steps + spare) / chunk) * chunk


# --- the traced pieces ---------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Carry:
    """Loop state: the token to feed, the cache, its slot, which rows are done."""

    last: jax.Array  # [B] int32, fed at slot `index`
    cache: KVCache
    index: jax.Array  # [] int32, shared by the rows
    done: jax.Array  # [B] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """What stays fixed per row during a decode: its key, first real slot and sampler values,
    and for rows that replay observed text, the steps their noise is abducted from."""

    key: jax.Array  # [B] typed keys
    start: jax.Array  # [B] int32
    sampler: scm.Sampler  # leaves [B]
    observed: posterior.Observed | None = None


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


def prefill(config, params, prompt, prompt_length, length: int) -> tuple[Carry, jax.Array]:
    """Fill a fresh cache of `length` slots (in the params' dtype) with the prompts; the carry
    is ready for step 0."""
    prefix, last, start = layout(prompt, prompt_length)
    cache = init_cache(config, prompt.shape[0], length, model.compute_dtype(params))
    cache = spec.constrain_cache(cache, config)  # under a mesh: sharded by the rules
    # Only the cache is kept, so XLA drops the unused LM head of the prompt positions.
    cache = model.apply(config, params, prefix, start, cache, 0, prompt=True)[1]
    cache = spec.constrain_cache(cache, config)
    index = jnp.asarray(prompt.shape[1], jnp.int32)
    return Carry(last, cache, index, jnp.zeros(last.shape, bool)), start


def step(config, stop_tokens, params, rows: Rows, carry: Carry, xs, keep_logits=False):
    """One response step for every row: logits of `carry.last`, then choose or force a token.

    The outputs are (token, logprob, valid) per row, and with `keep_logits` the f32 logits too.
    """
    forced, noise_index, noise, cos_sin = xs
    logits, cache = model.apply(
        config, params, carry.last[:, None], rows.start, carry.cache, carry.index, cos_sin
    )
    if rows.observed is not None:
        noise = posterior.step_noise(rows.observed, rows.key, noise_index)
    token, logprob = jax.vmap(scm.choose_or_force)(
        logits[:, 0], rows.key, noise_index, rows.sampler, noise, forced
    )
    valid = ~carry.done
    token = jnp.where(valid, token, 0)
    logprob = jnp.where(valid, logprob, 0.0)
    done = carry.done | jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32)) & valid
    out = (token, logprob, valid) + ((logits[:, 0].astype(jnp.float32),) if keep_logits else ())
    return Carry(token, cache, carry.index + 1, done), out


def loop(
    config, stop_tokens, params, rows, carry, forced, noise_index, noise, n, early_exit,
    keep_logits=False,
):  # fmt: skip
    """Up to `n` steps (<= the width of `forced` `[B, W]`) in one `lax.while_loop`.

    With `early_exit` the loop also ends once every row is done (the host path). `sample` runs
    without it: its condition then depends on the step count alone, which `vmap` leaves
    unbatched (a batched condition would make every step select the whole cache).
    Steps not run come back as not valid.
    """
    run_step = functools.partial(step, config, stop_tokens, params, rows, keep_logits=keep_logits)
    batch, width = forced.shape
    outputs = (
        jnp.zeros((width, batch), jnp.int32),
        jnp.zeros((width, batch), jnp.float32),
        jnp.zeros((width, batch), bool),
    ) + ((jnp.zeros((width, batch, config.vocab_size), jnp.float32),) if keep_logits else ())
    # RoPE of every step the loop may run (slot `index + i`), before the loop: see `rotation`.
    slots = carry.index + jnp.arange(width, dtype=jnp.int32)
    positions = model.positions(slots[:, None], rows.start[None, :])[..., None]  # [W, B, 1]
    cos, sin = model.rotation(positions, model.rope_frequencies(config))

    def more(state):
        i, carry, _ = state
        return (i < n) & ~jnp.all(carry.done) if early_exit else i < n

    def one(state):
        i, carry, outputs = state
        g = None if noise is None else noise[:, i]
        carry, row = run_step(carry, (forced[:, i], noise_index[:, i], g, (cos[i], sin[i])))
        return i + 1, carry, tuple(o.at[i].set(r) for o, r in zip(outputs, row, strict=True))

    _, carry, outputs = jax.lax.while_loop(more, one, (jnp.int32(0), carry, outputs))
    return carry, outputs


def _stop_tuple(stop_tokens: Sequence[int]) -> tuple[int, ...]:
    """Stop tokens as a sorted tuple (a static jit argument); (-1,) matches no token."""
    return tuple(sorted(int(t) for t in stop_tokens)) or (-1,)


# --- core.sample: one row, pure ------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """One row's result: `tokens` int32 `[N]`, `logprobs` float32 `[N]`, `length` int32 `[]`.

    `length` counts the tokens produced, a final stop token included; entries past it are 0.
    """

    tokens: jax.Array
    logprobs: jax.Array
    length: jax.Array


def sample(
    config: LlamaConfig,
    params: dict,
    prompt: jax.Array,
    prompt_length: jax.Array | int,
    key: jax.Array,
    sampler: scm.Sampler,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    forced: jax.Array | None = None,
    noise_index: jax.Array | None = None,
    noise: jax.Array | None = None,
    draft: speculative.Draft | None = None,
) -> Sampled:
    """Sample one response: a pure function of its inputs, usable under `jit` and `vmap`.

    `prompt` int32 `[P]` holds `prompt_length` real tokens (the rest is ignored); `key` is a
    typed key or raw key data; `sampler` a `Sampler` whose values may be traced. Optional:
    `forced` int32 `[N]` (token to force, or -1 to sample), `noise_index` int32 `[N]` (the noise
    index of each step, default 0..N-1) and `noise` float32 `[N, V]` (Gumbel noise replacing the
    key-derived noise). Static: `config`, `max_new_tokens`, `stop_tokens` and the sampler's
    structure. Padding the prompt to `bucket_length(prompt_length)` gives the program shapes of
    `cfjax.generate`, whose tokens it equals. `draft` (a `speculative.Draft`, its params traced)
    decodes by speculative rounds: the same tokens, fewer passes over the weights.

    Concrete values are checked (token ids in the vocabulary, `prompt_length` within the buffer,
    forced ids -1 or in the vocabulary, noise indices >= 0). Traced values cannot be checked
    here: under `jit`/`vmap` wrap the call in `checkify.checkify(f, errors=checkify.index_checks)`
    (`jax.experimental.checkify`), which reports an id outside the vocabulary by its index.
    """
    n = count(max_new_tokens)
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be int32 [P] (one row; vmap for more), got {prompt.shape}")
    for name, x, shape in (
        ("forced", forced, (n,)),
        ("noise_index", noise_index, (n,)),
        ("noise", noise, (n, config.vocab_size)),
    ):
        if x is not None and tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(jnp.shape(x))}")
    forced = jnp.full((n,), NOT_FORCED, jnp.int32) if forced is None else forced
    noise_index = jnp.arange(n, dtype=jnp.int32) if noise_index is None else noise_index
    _check_concrete(config.vocab_size, prompt, prompt_length, forced, noise_index)
    stops = _stop_tuple(stop_tokens)
    sampler = scm.as_arrays(sampler)
    statics = None if draft is None else (draft.config, draft.lookahead)
    return _sample(config, stops, statics, params, None if draft is None else draft.params,
                   prompt, prompt_length, as_key(key), sampler,
                   jnp.asarray(forced, jnp.int32), jnp.asarray(noise_index, jnp.int32),
                   None if noise is None else jnp.asarray(noise, jnp.float32))  # fmt: skip


def _check_concrete(vocab: int, prompt, prompt_length, forced, noise_index) -> None:
    """`sample`'s checks of the values that are not traced (see its docstring)."""
    concrete = lambda x: not isinstance(x, jax.core.Tracer)  # noqa: E731
    if concrete(prompt_length):
        length = np.asarray(prompt_length)
        if length.ndim or not np.issubdtype(length.dtype, np.integer):
            raise TypeError(f"prompt_length must be an integer, got {prompt_length!r}")
        if not 1 <= int(length) <= prompt.shape[0]:
            raise ValueError(f"prompt_length {int(length)} is outside [1, {prompt.shape[0]}]")
        if concrete(prompt):
            check_tokens(prompt[: int(length)], vocab, "prompt")
    if concrete(forced):
        ids = np.asarray(forced)
        bad = np.flatnonzero((ids < NOT_FORCED) | (ids >= vocab))
        if len(bad):
            raise ValueError(f"forced: token id {int(ids[bad[0]])} at step {int(bad[0])} is neither {NOT_FORCED} (sample) nor in the vocabulary [0, {vocab})")  # fmt: skip
    if concrete(noise_index) and np.any(np.asarray(noise_index) < 0):
        raise ValueError("noise_index must hold indices >= 0")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(config, stop_tokens, draft_static, params, draft_params, prompt, prompt_length, key,
            sampler, forced, index, noise):  # fmt: skip
    batch1 = lambda x: None if x is None else jnp.asarray(x)[None]
    n = forced.shape[0]
    draft = None if draft_static is None else speculative.Draft(draft_static[0], draft_params, draft_static[1])  # fmt: skip
    length = cache_length(prompt.shape[0], n, spare=spare_for(draft))
    carry, start = prefill(config, params, prompt[None], batch1(prompt_length), length)
    rows = Rows(key[None], start, jax.tree_util.tree_map(batch1, sampler))
    xs = (forced[None], index[None], batch1(noise), n)
    if draft is None:
        _, (tokens, logprobs, valid) = loop(config, stop_tokens, params, rows, carry, *xs, False)
    else:
        prefix = layout(prompt[None], batch1(prompt_length))[0]
        draft_carry = speculative.start(draft.config, draft.params, prefix, start, length,
                                        jnp.zeros((1, 0), jnp.int32), 0)  # fmt: skip
        _, _, (tokens, logprobs, valid), _ = speculative.loop(
            config, stop_tokens, params, rows, carry, *xs, False, False, draft, draft_carry
        )
    return Sampled(tokens[:, 0], logprobs[:, 0], jnp.sum(valid[:, 0], dtype=jnp.int32))


# --- the host entry: a batch, chunked --------------------------------------------------------


_prefill = jax.jit(prefill, static_argnums=(0, 4))


@functools.partial(jax.jit, static_argnums=(0, 1, 9), donate_argnums=(4,))
def _run_chunk(config, stop_tokens, params, rows, carry, forced, noise_index, noise, n, logits):
    """Up to `n` steps (a traced count <= the chunk width), ending early once all rows are done.

    One compiled program serves a short last chunk, a run resumed mid-chunk and a batch whose
    rows all stopped, without running (or compiling for) steps nobody needs.
    """
    return loop(
        config, stop_tokens, params, rows, carry, forced, noise_index, noise, n, True, logits
    )


@dataclasses.dataclass
class Request:
    """A batch to decode: prompts, one key and sampler per row, the steps and what to force."""

    prompts: list[list[int]]
    keys: jax.Array  # [B] typed keys
    samplers: list[scm.Sampler]
    steps: int
    forced: np.ndarray | None = None  # [B, <= steps] int32, NOT_FORCED = sample
    noise_index: np.ndarray | None = None  # [B, <= steps] int32, default: the step
    noise: Any = None  # [B, steps, V] float32 explicit Gumbel noise
    observed: posterior.Observed | None = None  # rows whose noise is abducted (not with noise)
    keep_logits: bool = False  # return every step's f32 logits (to score observed text)
    cache_steps: int | None = None  # size the cache for this many steps (default `steps`)


@dataclasses.dataclass
class Resume:
    """Continue from a stored cache at response step `step` instead of prefilling."""

    cache: KVCache  # [B, ...], a copy the decode may donate
    start: np.ndarray  # [B]
    bucket: int
    step: int
    last: list[int]  # the token each row feeds at `step`


@dataclasses.dataclass
class Decoded:
    """Result of `run`: per-row tokens and log-probs of steps `[first, steps)`, the final cache."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    cache: KVCache  # holds every step's keys/values (for cache reuse)
    start: np.ndarray
    bucket: int
    index: int  # the slot the next step would write
    logits: np.ndarray | None = None  # [B, steps - first, V] f32, with `Request.keep_logits`
    rounds: int | None = None  # speculative rounds run (with a draft)


def run(
    config: LlamaConfig,
    params: dict,
    request: Request,
    *,
    stop_tokens: Sequence[int],
    chunk: int = DEFAULT_CHUNK,
    resume: Resume | None = None,
    on_chunk: Callable[[list[list[int]]], None] | None = None,
    draft: speculative.Draft | None = None,
) -> Decoded:
    """Decode a batch: prefill (or resume), then jitted chunks of up to `chunk` steps.

    Chunking never changes a token: noise is keyed by step, and every chunk runs the same
    compiled step. Stops early once every row has emitted a stop token. `on_chunk(rows)` gets
    the tokens so far after each chunk. Params sharded over a mesh run under it (the rows are
    placed on it and the cache pinned to the rules of `spec`). With a `draft`, the chunks run
    by speculative rounds (see `speculative`): the same tokens, fewer passes over the weights.
    """
    mesh = spec.mesh_of(params)
    if mesh is None:
        return _run(config, params, request, stop_tokens, chunk, resume, on_chunk, None, draft)
    if draft is not None:
        raise ValueError("speculative decoding (draft=) runs on one device: give unsharded params")
    with jax.set_mesh(mesh):
        return _run(config, params, request, stop_tokens, chunk, resume, on_chunk, mesh, None)


def _run(
    config: LlamaConfig,
    params: dict,
    request: Request,
    stop_tokens: Sequence[int],
    chunk: int,
    resume: Resume | None,
    on_chunk: Callable[[list[list[int]]], None] | None,
    mesh: Any,
    draft: speculative.Draft | None,
) -> Decoded:
    batch, steps = len(request.prompts), request.steps
    bucket = bucket_length(max(len(p) for p in request.prompts))
    if request.cache_steps is not None and request.cache_steps < steps:
        raise ValueError(f"cache_steps {request.cache_steps} is below the {steps} steps to run")
    length = cache_length(bucket, request.cache_steps or steps, chunk, spare_for(draft))
    first = 0 if resume is None else resume.step
    grow = grows(batch, mesh, draft)
    starts = _chunk_starts(first, steps, chunk, grow)
    # The slots the chunk from step `s` attends over: all of them, or when the cache grows,
    # those its last step can reach (a function of the step alone, so a resumed run computes
    # each step with the shapes the factual run had).
    slots = lambda s: min(length, bucket + (s // chunk + 1) * chunk) if grow else length  # noqa: E731
    prompt = np.zeros((batch, bucket), np.int32)
    for b, p in enumerate(request.prompts):
        prompt[b, : len(p)] = p
    lengths = np.asarray([len(p) for p in request.prompts], np.int32)
    if resume is None:
        carry, start = _prefill(config, params, prompt, lengths, slots(first))
    else:
        if (resume.bucket, resume.cache.length) != (bucket, length):
            raise ValueError(
                f"a stored cache of {resume.bucket} + {resume.cache.length - resume.bucket} slots "
                f"cannot serve {bucket} + {length - bucket}"
            )
        start = jnp.asarray(resume.start)
        carry = Carry(
            jnp.asarray(resume.last, jnp.int32),
            resume.cache,
            jnp.asarray(bucket + first, jnp.int32),
            jnp.zeros((batch,), bool),
        )
        if grow:  # the stored cache holds every slot; this run starts with the first chunk's
            carry = _resize(carry, slots(first))
    width = starts[-1] + chunk if starts else first
    forced = np.full((batch, width), NOT_FORCED, np.int32)
    noise_index = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width)).copy()
    if request.forced is not None:
        forced[:, : request.forced.shape[1]] = request.forced
    if request.noise_index is not None:
        noise_index[:, : request.noise_index.shape[1]] = request.noise_index
    noise = request.noise
    if noise is not None and request.observed is not None:
        raise ValueError("give explicit noise or observed steps to abduct it from, not both")
    if noise is not None:  # pad to whole chunks; padded steps are never run
        noise = jnp.pad(jnp.asarray(noise, jnp.float32), ((0, 0), (0, width - steps), (0, 0)))
    stops = _stop_tuple(stop_tokens)
    rows = Rows(
        request.keys, start, scm.stack(request.samplers, config.vocab_size), request.observed
    )
    rows = jax.tree_util.tree_map(jnp.asarray, rows)
    # jit keys its cache on whether arrays are committed to a device: commit the inputs now so
    # the first chunk and the later ones (which get jit outputs) share one compilation.
    if mesh is None:
        rows, carry = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), (rows, carry))  # fmt: skip
    else:  # everything but the (sharded) cache replicated over the params' mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        put = lambda x: spec.put(x, replicated)  # noqa: E731
        rows = jax.tree_util.tree_map(put, rows)
        carry = Carry(put(carry.last), carry.cache, put(carry.index), put(carry.done))
    if draft is not None:
        draft_carry = _start_draft(draft, prompt, lengths, length, forced, first, chunk)
        rounds = 0
    out: list[tuple[np.ndarray, ...]] = []
    for s, end in zip(starts, [*starts[1:], steps], strict=True):
        if carry.cache.length < slots(s):
            carry = _resize(carry, slots(s))
        xs = (
            jnp.asarray(forced[:, s : s + chunk]), jnp.asarray(noise_index[:, s : s + chunk]),
            None if noise is None else noise[:, s : s + chunk],
            jnp.asarray(end - s, jnp.int32), request.keep_logits,
        )  # fmt: skip
        if draft is None:
            carry, chunk_out = _run_chunk(config, stops, params, rows, carry, *xs)
        else:
            carry, draft_carry, chunk_out, chunk_rounds = speculative.run_chunk(
                config, stops, params, rows, carry, *xs,
                (draft.config, draft.lookahead), draft.params, draft_carry,
            )  # fmt: skip
            rounds += int(chunk_rounds)
        # Only the chunk's own steps: a resumed run's first chunk ends before its width.
        out.append(tuple(np.swapaxes(spec.fetch(x), 0, 1)[:, : end - s] for x in chunk_out))
        if on_chunk is not None:
            on_chunk(_rows([o[0] for o in out], [o[2] for o in out], steps - first))
        if bool(np.all(spec.fetch(carry.done))):
            break
    if carry.cache.length < length:  # a stored cache serves any later run: every slot
        carry = _resize(carry, length)
    valid = [o[2] for o in out]
    tokens = _rows([o[0] for o in out], valid, steps - first)
    logprobs = _rows([o[1] for o in out], valid, steps - first)
    logits = None
    if request.keep_logits:  # steps not run (all rows stopped) are cut, as in `tokens`
        run_steps = max(len(t) for t in tokens)
        logits = np.concatenate([o[3] for o in out], axis=1)[:, :run_steps]
    return Decoded(
        tokens,
        [[float(x) for x in r] for r in logprobs],
        carry.cache,
        spec.fetch(start),
        bucket,
        int(spec.fetch(carry.index)),
        logits,
        rounds if draft is not None else None,
    )


def grows(batch: int, mesh: Any, draft: speculative.Draft | None) -> bool:
    """Whether a run grows its cache a chunk at a time instead of attending over every slot
    from the first step: for batches of `GROW_MIN_BATCH` rows or more on the CPU, unsharded,
    without a draft.

    Each decode step attends over the whole cache (masked past the current slot), and on
    XLA:CPU that pass costs in proportion to the slots (a shorter slice of the cache is copied,
    which costs more; see benchmarks/RESULTS.md). SmolLM2, batch 64, 256 steps: 225 -> 204 ms a
    step, the same tokens in every row. The price is one compiled chunk program per cache length
    (4 instead of 1 for 256 steps), worth it only where the attention is a large part of a step;
    at batch 1 a step is the weights' matmuls, and on a GPU it is unmeasured.
    """
    plain = mesh is None and draft is None  # (sharded caches and a draft's: not built)
    return batch >= GROW_MIN_BATCH and plain and jax.default_backend() == "cpu"


def _chunk_starts(first: int, steps: int, chunk: int, aligned: bool) -> list[int]:
    """The first step of each chunk of steps `[first, steps)`: every `chunk` steps from
    `first`, or when `aligned` (a growing cache) at the multiples of `chunk`, the first chunk
    of a resumed run ending at the next one."""
    if not aligned:
        return list(range(first, steps, chunk))
    return [first, *range((first // chunk + 1) * chunk, steps, chunk)] if first < steps else []


@functools.partial(jax.jit, static_argnums=(1,))  # (a new shape: no buffer to donate into)
def _resize(carry: Carry, length: int) -> Carry:
    """The carry with its cache cut or zero-padded to `length` slots (the slots kept hold
    the same keys and values; new ones are masked until a step writes them)."""

    def fit(x, axis):
        if x.shape[axis] >= length:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)

    k = [fit(x, KEY_SLOT_AXIS) for x in carry.cache.k]
    v = [fit(x, VALUE_SLOT_AXIS) for x in carry.cache.v]
    return dataclasses.replace(carry, cache=KVCache(k, v))


def spare_for(draft: speculative.Draft | None) -> int:
    """Cache slots a run needs past its last step: a speculative round writes `lookahead`
    slots ahead of its first."""
    return 0 if draft is None else draft.lookahead


def _start_draft(draft, prompt, lengths, length, forced, first, chunk) -> speculative.DraftCarry:
    """The draft's cache for a run that starts (or resumes) at step `first`: the prompt, then
    the tokens fed before it (the last prompt token and the response's forced steps), padded to
    whole chunks so that resumes at nearby steps share one program."""
    prefix, last, start = layout(jnp.asarray(prompt), jnp.asarray(lengths))
    width = math.ceil(first / chunk) * chunk
    fed = np.zeros((prompt.shape[0], width), np.int32)
    if first:
        if (forced[:, : first - 1] < 0).any():
            raise ValueError("a resumed speculative run needs the response before its resume step")
        fed[:, 0] = np.asarray(last)
        fed[:, 1:first] = forced[:, : first - 1]
    return speculative.start_jit(
        draft.config, draft.params, prefix, start, length, jnp.asarray(fed), jnp.int32(first)
    )


def _rows(parts: list[np.ndarray], valid: list[np.ndarray], limit: int) -> list[list]:
    values = np.concatenate(parts, axis=1)[:, :limit]
    mask = np.concatenate(valid, axis=1)[:, :limit]
    return [values[b][mask[b]].tolist() for b in range(values.shape[0])]
