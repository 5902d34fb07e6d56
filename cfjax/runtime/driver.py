"""The host driver: a batch decoded by the core's kernel chunk by chunk (streaming, early stop,
resume from a stored cache, cache growth, meshes), its rows collected as lists.

Chunking never changes a token: noise is keyed by step, and every chunk runs the same compiled
`decode.decode`. Policies are named arguments with a backend default (`grow_cache`), so that a
test can choose them on any backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cfjax.core import decode, kernel, posterior, scm, spec, speculative
from cfjax.core.cache import KVCache
from cfjax.core.checks import count
from cfjax.core.config import LlamaConfig
from cfjax.core.kernel import DEFAULT_CHUNK, NOT_FORCED, Options, Rows, State
from cfjax.runtime import ahead, cache_layout, prefix, programs
from cfjax.runtime.request import host_rows, padded, valid_entries

# From this many rows on, a run on the CPU grows its cache by default (see `grows_by_default`).
GROW_MIN_BATCH = 16
# Batches of up to this many rows run at their own size; larger ones at `padded_rows`.
EXACT_ROWS = 16

prefill = jax.jit(kernel.prefill, static_argnums=(0, 4, 5))
decode_chunk = jax.jit(decode.decode, static_argnums=(0, 1), donate_argnums=(4,))
"""One chunk: up to `n` steps (a traced count <= the chunk width), ending early once every row
is done, so one compiled program serves a short last chunk, a resumed run and a stopped batch."""
start_draft = jax.jit(speculative.start, static_argnums=(0, 4))


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
    reference: prefix.Reference | None = None  # a prompt the rows share prefixes with


@dataclasses.dataclass
class Resume:
    """Continue from a stored cache at response step `step` instead of prefilling."""

    # [N, ...]: with `rows` None, the run's own copy (the decode donates it); else a stored
    # cache, or several of one layout (stored batches), whose concatenation `rows` index.
    cache: KVCache | tuple[KVCache, ...]
    start: np.ndarray  # [B]
    bucket: int
    step: int
    last: list[int]  # the token each row feeds at `step`
    chunk: int = DEFAULT_CHUNK  # the chunk the cache was sized with
    # The rows of `cache` the run continues, `[B]` (repeats allowed): taken as one new array,
    # with the run's padding and first slots, so a stored cache is read, never copied twice.
    rows: np.ndarray | None = None


@dataclasses.dataclass
class Decoded:
    """Result of `run`: per-row tokens and log-probs of steps `[first, steps)`, the final cache
    (every slot, for reuse) and its layout, and what the run did."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    cache: KVCache
    start: np.ndarray
    bucket: int
    chunk: int
    first: int  # the step the run started at (a resume's step, else 0)
    resumed: bool  # whether it continued a stored cache (else it prefilled)
    index: int  # the slot the next step would write (the bucket + the steps run)
    logits: np.ndarray | None = None  # [B, steps - first, V] f32, with `Request.keep_logits`
    rounds: int | None = None  # speculative rounds run (with a draft)
    slots: list[int] = dataclasses.field(default_factory=list)  # cache slots of each call


def grows_by_default(batch: int, mesh: Any, draft: Any) -> bool:
    """The backend default of `run(grow_cache=)`: grow the cache a chunk at a time for batches
    of `GROW_MIN_BATCH` rows or more on the CPU, unsharded, without a draft.

    Each decode step attends over the whole cache (masked past the current slot), and on
    XLA:CPU that pass costs in proportion to the slots (a shorter slice of the cache is copied,
    which costs more; see benchmarks/RESULTS.md). SmolLM2, batch 64, 256 steps: 225 -> 204 ms a
    step, the same tokens in every row. The price is one compiled chunk program per cache length
    (4 instead of 1 for 256 steps), worth it only where the attention is a large part of a step;
    at batch 1 a step is the weights' matmuls, and on a GPU it is unmeasured.
    """
    plain = mesh is None and draft is None  # (sharded caches and a draft's: not built)
    return batch >= GROW_MIN_BATCH and plain and jax.default_backend() == "cpu"


def padded_rows(batch: int) -> int:
    """The rows a batch of `batch` runs as: its own size up to `EXACT_ROWS`, then the next of
    eight sizes per power of two (18, 20, ..., 32, 36, 40, ..., 64, 72, ...).

    Every row count is its own compiled prefill and decode chunk (~8 s of XLA:CPU compile for
    SmolLM2, more for a larger model), and a study meets many: an attribution per prompt has a
    row per word. Padded, batches of 1 to 64 rows need 32 programs, not 64, for at most an
    eighth more rows; four sizes per power of two would need 20, for up to a quarter more
    (measured: benchmarks/RESULTS.md). A padded row changes no other row's bits: the engine
    is batch-invariant."""
    if batch <= EXACT_ROWS:
        return batch
    step = 1 << ((batch - 1).bit_length() - 4)
    return -(-batch // step) * step


def rows_to_run(config, batch: int, pad: bool) -> tuple[int, np.ndarray | None]:
    """(rows, the source row of each) a batch of `batch` runs as: `padded_rows(batch)` with
    `pad` and a batch-invariant model (the added rows copies of row 0), else `batch` (None)."""
    rows = padded_rows(batch) if pad and config.batch_invariant else batch
    if rows == batch:
        return batch, None
    return rows, np.concatenate([np.arange(batch), np.zeros(rows - batch, np.int64)])


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The static sizes of a run: prompt bucket, cache slots, chunk and the chunks' steps."""

    bucket: int
    length: int
    chunk: int
    first: int
    steps: int
    grow: bool
    every: int  # steps between host round trips (<= chunk)

    def calls(self) -> list[tuple[int, int]]:
        """The (first, end) steps of each call of the chunk program: the chunks, each cut into
        calls of at most `every` steps."""
        starts = self.starts()
        ends = [*starts[1:], self.steps]
        return [(t, min(t + self.every, e)) for s, e in zip(starts, ends, strict=True) for t in range(s, e, self.every)]  # fmt: skip

    def starts(self) -> list[int]:
        """The first step of each chunk: every `chunk` steps from `first`, or with a growing
        cache at the multiples of `chunk` (a resumed run's first chunk ends at the next one)."""
        if not self.grow:
            return list(range(self.first, self.steps, self.chunk))
        if self.first >= self.steps:
            return []
        return [self.first, *range((self.first // self.chunk + 1) * self.chunk, self.steps, self.chunk)]  # fmt: skip

    def slots(self, s: int) -> int:
        """The slots the chunk from step `s` attends over: all, or with a growing cache those
        its last step can reach (a function of the step alone, so a resumed run computes each
        step with the shapes the factual run had)."""
        return min(self.length, self.bucket + (s // self.chunk + 1) * self.chunk) if self.grow else self.length  # fmt: skip


def run(
    config: LlamaConfig,
    params: dict,
    request: Request,
    *,
    stop_tokens: Sequence[int],
    chunk: int | None = None,
    resume: Resume | None = None,
    on_chunk: Callable[[list[list[int]]], None] | None = None,
    draft: speculative.Draft | None = None,
    grow_cache: bool | None = None,
    report_every: int | None = None,
    pad_rows: bool = True,
) -> Decoded:
    """Decode a batch: prefill (or resume), then jitted chunks of up to `chunk` steps (default:
    the resume's chunk, else `DEFAULT_CHUNK`).

    Stops early once every row has emitted a stop token. `on_chunk(rows)` gets the tokens so
    far after each chunk. A `resume` whose cache has another layout than this run's is not
    used (the run prefills; the tokens are the same). Params sharded over a mesh run under it.
    With a `draft`, the chunks run by speculative rounds: the same tokens, fewer passes over
    the weights. `grow_cache` (default `grows_by_default`): start with the first chunk's slots
    and grow the cache before each chunk; the stored cache still has every slot.
    `report_every`: call `on_chunk` after at most this many steps (a streaming page shows tokens
    as they come): the chunk's compiled program runs on a shifted window of its inputs, so the
    shapes, the cache and the tokens are those of whole chunks. `pad_rows`: a batch-invariant
    model runs the batch as `padded_rows(batch)` rows, the added ones done from the start (the
    results hold the real rows, the returned cache all of them); `batch_invariant=False` runs
    every batch at its own size, where a padded row could change the others' rounding.
    """
    mesh = spec.mesh_of(params)
    if mesh is not None and draft is not None:
        raise ValueError("speculative decoding (draft=) runs on one device: give unsharded params")
    real = len(request.prompts)
    batch, index = rows_to_run(config, real, pad_rows)
    if index is not None:
        request, resume = _padded(request, resume, index)
    grow = grows_by_default(batch, mesh, draft) if grow_cache is None else bool(grow_cache)
    if grow and (mesh is not None or draft is not None):
        raise ValueError("grow_cache runs unsharded and without a draft")
    chunk = count(chunk, "chunk") if chunk is not None else resume.chunk if resume is not None else DEFAULT_CHUNK  # fmt: skip
    if chunk > config.max_seq_len:  # the cache is sized in whole chunks
        raise ValueError(f"chunk {chunk} is above the model's max_seq_len {config.max_seq_len}")
    if request.cache_steps is not None and request.cache_steps < request.steps:
        raise ValueError(f"cache_steps {request.cache_steps} is below the {request.steps} steps to run")  # fmt: skip
    options = Options(kernel.stop_tuple(stop_tokens), True, request.keep_logits,
                      None if draft is None else draft.spec)  # fmt: skip
    bucket = kernel.bucket_length(max(len(p) for p in request.prompts))
    length = kernel.cache_length(bucket, request.cache_steps or request.steps, chunk, options.spare)
    if resume is not None and (resume.bucket, _sources(resume)[0].length, resume.chunk) != (bucket, length, chunk):  # fmt: skip
        resume = None  # a cache of another layout cannot serve this run
    first = 0 if resume is None else resume.step
    every = chunk if report_every is None else min(chunk, count(report_every, "report_every"))
    layout = _Layout(bucket, length, chunk, first, request.steps, grow, every)
    programs.keep_room()  # before this run compiles: a long-lived process keeps room for it
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _run(config, params, request, layout, options, resume, on_chunk, mesh, draft, real)


def _padded(request: Request, resume: Resume | None, index: np.ndarray) -> tuple[Request, Resume | None]:  # fmt: skip
    """`request` (and `resume`) as the rows `index` (`rows_to_run`): each added row a copy of
    row 0's inputs with a one-token prompt, which never widens the prompt bucket and has nothing
    to prefill past a shared prefix. `_run` marks them done before the first step."""
    rows = functools.partial(host_rows, index=index)
    observed = request.observed
    if observed is not None:
        observed = dataclasses.replace(observed, row=rows(observed.row), key=rows(observed.key))
    request = dataclasses.replace(
        request, prompts=request.prompts + [[0]] * (len(index) - len(request.prompts)),
        keys=rows(request.keys), samplers=[request.samplers[b] for b in index], forced=rows(request.forced),
        noise_index=rows(request.noise_index), noise=rows(request.noise), observed=observed,
    )  # fmt: skip
    if resume is not None:  # (the cache's rows are taken once, by `_initial_state`)
        rows = np.arange(len(resume.start)) if resume.rows is None else np.asarray(resume.rows)
        resume = dataclasses.replace(resume, rows=rows[index], start=resume.start[index], last=[resume.last[b] for b in index])  # fmt: skip
    return request, resume


def _run(config, params, request: Request, layout: _Layout, options: Options, resume, on_chunk, mesh, draft, real: int) -> Decoded:  # fmt: skip
    prompt, lengths = padded(request.prompts, layout.bucket)
    calls = layout.calls()
    width = calls[-1][0] + layout.chunk if calls else layout.first
    begin = functools.partial(_begin, config, params, prompt, lengths, layout, resume, mesh, real, width)  # fmt: skip
    pending = {} if mesh is not None else _compile_ahead(config, params, options, request, layout, resume, draft, begin, prompt, lengths)  # fmt: skip
    rows, state, steps_in = begin(request)
    if draft is not None:
        state.draft = _draft_state(draft, prompt, lengths, layout, steps_in["forced"])
    rows, state = _commit(rows, state, mesh)
    out, rounds, slots = [], 0, []
    for s, end in calls:
        if state.cache.length < layout.slots(s):
            state = cache_layout.resize(state, layout.slots(s))
        slots.append(state.cache.length)
        ahead.wait(pending.pop(state.cache.length, None))
        chunk_rows = dataclasses.replace(rows, **{k: None if x is None else x[:, s : s + layout.chunk] for k, x in steps_in.items()})  # fmt: skip
        state, chunk_out, iterations = decode_chunk(config, options, params, chunk_rows, state,
                                                    jnp.asarray(end - s, jnp.int32), None if draft is None else draft.params)  # fmt: skip
        if draft is not None:  # (a host round trip: only where the rounds are reported)
            rounds += int(iterations)
        # Only the chunk's own steps: a resumed run's first chunk ends before its width.
        out.append(jax.tree_util.tree_map(lambda x, n=end - s: np.swapaxes(spec.fetch(x), 0, 1)[:, :n], chunk_out))  # fmt: skip
        if on_chunk is not None:
            on_chunk(valid_entries([o.tokens for o in out], [o.valid for o in out], layout.steps - layout.first)[:real])  # fmt: skip
        if bool(np.all(spec.fetch(state.done))):
            break
    ahead.cancel(pending)  # (programs of chunks an early stop skipped: those not begun)
    if state.cache.length < layout.length:  # a stored cache serves any later run: every slot
        state = cache_layout.resize(state, layout.length)
    n = layout.steps - layout.first
    valid = [o.valid for o in out]
    tokens = valid_entries([o.tokens for o in out], valid, n)[:real]  # the real rows (the cache: all)  # fmt: skip
    logits = None
    if options.keep_logits:  # steps not run (all rows stopped) are cut, as in `tokens`
        logits = np.concatenate([o.logits for o in out], axis=1)[:real, : max(len(t) for t in tokens)]  # fmt: skip
    return Decoded(tokens, [[float(x) for x in r] for r in valid_entries([o.logprobs for o in out], valid, n)[:real]],
                   state.cache, spec.fetch(rows.start), layout.bucket, layout.chunk, layout.first,
                   resume is not None, int(spec.fetch(state.index)), logits, rounds if draft is not None else None, slots)  # fmt: skip


def _begin(config, params, prompt, lengths, layout: _Layout, resume, mesh, real: int, width: int, request: Request, fill=prefill):  # fmt: skip
    """The run's state at its first step and its rows (not yet committed to a device), and the
    rows' per-step inputs. `fill`: the prefill (`kernel.prefilled`: its shapes only)."""
    state, start = _initial_state(config, params, request, prompt, lengths, layout, resume, mesh, fill)  # fmt: skip
    if real < len(request.prompts):  # padding rows: done before they start (no row is yet)
        state = dataclasses.replace(state, done=jnp.asarray(np.arange(len(request.prompts)) >= real))  # fmt: skip
    rows, steps_in = _rows(config, request, start, width)
    return rows, state, steps_in


def _compile_ahead(config, params, options: Options, request: Request, layout: _Layout, resume, draft, begin, prompt, lengths) -> dict:  # fmt: skip
    """Start compiling the run's chunk programs, one per cache length its calls use, beside its
    prefill (`ahead`) the first time a run of their shapes comes: {slots: future}."""
    slots = tuple(dict.fromkeys(layout.slots(s) for s, _ in layout.calls()))
    samplers = frozenset((s.mechanism, s.top_k is None, s.top_p is None) for s in request.samplers)
    shapes = (config, options, id(params), None if draft is None else id(draft.params), len(request.prompts), layout.bucket, layout.chunk,
              layout.first, slots, resume is None, request.noise is None, request.observed is None, samplers)  # fmt: skip
    if (draft is not None and layout.first) or not ahead.first_time(shapes):
        return {}  # (a resumed draft's start reads the response on the host: not abstractly)
    # The shapes (nothing runs, the prefill is not traced): a reused prefix makes the same.
    rows, state, steps_in = jax.eval_shape(lambda: begin(dataclasses.replace(request, reference=None), kernel.prefilled))  # fmt: skip
    if draft is not None:
        state.draft = jax.eval_shape(lambda: _draft_state(draft, prompt, lengths, layout, None))
    device = next(iter(jax.tree_util.tree_leaves(params)[0].devices()))  # (where the run computes)
    rows, state = ahead.committed((rows, state), device)
    chunk = {k: None if x is None else jax.ShapeDtypeStruct((x.shape[0], layout.chunk, *x.shape[2:]), x.dtype) for k, x in steps_in.items()}  # fmt: skip
    rows, count = dataclasses.replace(rows, **chunk), jax.ShapeDtypeStruct((), jnp.int32)
    resized = {n: ahead.committed(jax.eval_shape(lambda st, n=n: cache_layout.resize(st, n), state), device) for n in slots if n != state.cache.length}  # fmt: skip
    return ahead.compile_beside((n, decode_chunk.lower(config, options, params, rows, resized.get(n, state), count, None if draft is None else draft.params)) for n in slots)  # fmt: skip


def _initial_state(config, params, request: Request, prompt, lengths, layout: _Layout, resume: Resume | None, mesh, fill):  # fmt: skip
    """The state at the run's first step: a prefill (reusing the prefixes the prompts share
    with `request.reference`, where that saves work), or the resume's stored cache."""
    if resume is None:
        window = kernel.prefill_window(int(np.max(lengths)), layout.bucket)
        length = layout.slots(layout.first)
        if request.reference is not None and mesh is None:  # (sharded rows: not built)
            reused = prefix.prefill(config, params, request.prompts, prompt, lengths, request.reference, length, window)  # fmt: skip
            if reused is not None:
                return reused
        return fill(config, params, prompt, lengths, length, window)
    # The stored cache holds every slot; a growing run starts with its first chunk's.
    slots = layout.slots(layout.first)
    cache = resume.cache
    if resume.rows is not None:
        cache = cache_layout.take_rows(
            config, _sources(resume), jnp.asarray(resume.rows, jnp.int32), slots
        )
    state = State(jnp.asarray(resume.last, jnp.int32), cache,
                  jnp.asarray(layout.bucket + layout.first, jnp.int32), jnp.zeros((prompt.shape[0],), bool))  # fmt: skip
    if state.cache.length != slots:
        state = cache_layout.resize(state, slots)
    return state, jnp.asarray(resume.start)


def _rows(config, request: Request, start, width: int) -> tuple[Rows, dict]:
    """The rows' fixed values, and their per-step inputs over `width` steps (whole chunks;
    padded steps are never run)."""
    batch, steps = len(request.prompts), request.steps
    forced = np.full((batch, width), NOT_FORCED, np.int32)
    noise_index = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width)).copy()
    if request.forced is not None:
        forced[:, : request.forced.shape[1]] = request.forced
    if request.noise_index is not None:
        noise_index[:, : request.noise_index.shape[1]] = request.noise_index
    noise = request.noise
    if noise is not None and request.observed is not None:
        raise ValueError("give explicit noise or observed steps to abduct it from, not both")
    if noise is not None:
        noise = jnp.pad(jnp.asarray(noise, jnp.float32), ((0, 0), (0, width - steps), (0, 0)))
    sampler = jax.tree_util.tree_map(jnp.asarray, scm.stack(request.samplers, config.vocab_size))
    observed = jax.tree_util.tree_map(jnp.asarray, request.observed)
    rows = Rows(request.keys, jnp.asarray(start), sampler, None, None, None, observed)
    return rows, {"forced": forced, "noise_index": noise_index, "noise": noise}


def _commit(rows: Rows, state: State, mesh) -> tuple[Rows, State]:
    """Rows and state on their devices. jit keys its cache on whether arrays are committed to
    a device: committed now, the first chunk and the later ones (which get jit outputs) share
    one compilation. Under a mesh, everything but the (sharded) cache is replicated."""
    if mesh is None:
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), (rows, state))
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: spec.put(x, replicated)  # noqa: E731
    state = dataclasses.replace(state, last=put(state.last), index=put(state.index), done=put(state.done))  # fmt: skip
    return jax.tree_util.tree_map(put, rows), state


def _sources(resume: Resume) -> tuple[KVCache, ...]:
    """The stored caches a resume reads."""
    return resume.cache if isinstance(resume.cache, tuple) else (resume.cache,)


def _draft_state(draft: speculative.Draft, prompt, lengths, layout: _Layout, forced) -> kernel.DraftState:  # fmt: skip
    """The draft's cache for a run that starts (or resumes) at step `first`: the prompt, then
    the tokens fed before it (the last prompt token and the response's forced steps), padded to
    whole chunks so that resumes at nearby steps share one program."""
    first = layout.first
    prefix, last, start = kernel.layout(jnp.asarray(prompt), jnp.asarray(lengths))
    fed = np.zeros((prompt.shape[0], math.ceil(first / layout.chunk) * layout.chunk), np.int32)
    if first:
        if (forced[:, : first - 1] < 0).any():
            raise ValueError("a resumed speculative run needs the response before its resume step")
        fed[:, 0] = np.asarray(last)
        fed[:, 1:first] = forced[:, : first - 1]
    return start_draft(draft.config, draft.params, prefix, start, layout.length, jnp.asarray(fed), jnp.int32(first))  # fmt: skip
