"""Counterfactual and interventional generation from a factual `Trace`.

Counterfactual: the same noise under an intervention. Forced steps (kept factual tokens and the
edited span) run through the same decode step as the factual run; sampling resumes at step `m`
with factual noise index `j + (r - m)`. With the prompt and model unchanged, the factual KV cache
is reused, so steps before the edit are not recomputed.

Interventional: the same edit with fresh, independent noise (the paper's baseline).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.causal.abduction import observed_steps
from cfjax.causal.factual import draft_for, text_of
from cfjax.causal.interventions import Intervention, Plan, plan
from cfjax.causal.trace import Trace
from cfjax.core import engine, speculative
from cfjax.core.lm import LM
from cfjax.core.request import as_key, check_request, count, row_keys
from cfjax.core.store import Stored


def factual_noise_index(trace: Trace, step: int) -> int:
    """The noise index the factual trace used (or would use) at response step `step`."""
    idx = trace.noise_index
    if step < len(idx):
        return idx[step]
    return step + (idx[-1] - (len(idx) - 1) if idx else 0)


def _noise_map(trace: Trace, p: Plan, steps: int, fresh: bool) -> np.ndarray:
    m, r = p.resume_at, p.aligned_to
    out = np.arange(steps, dtype=np.int32)
    if not fresh:
        # A kept token records the noise index it was generated with in the factual trace, so a
        # counterfactual of this counterfactual aligns to the same noise as one of the factual.
        for j, src in enumerate(p.forced_from[:m]):
            if src is not None:
                out[j] = factual_noise_index(trace, src)
        for j in range(m, steps):
            out[j] = factual_noise_index(trace, j + r - m)
    return out


def _resume(
    lm: LM, traces: list[Trace], plans: list[Plan], bucket: int, length: int, chunk: int
) -> engine.Resume | None:
    """Continue every row from its factual run's stored cache, if all of them are still kept.

    Only with the prompt and params unchanged, and a cache of the same layout: then the steps
    before the first edit are the factual ones, already in the cache.
    """
    if any(p.prompt_changed or p.params is not lm.params for p in plans):
        return None
    hits = [
        lm.caches.get(p.params, t.prompt_tokens, t.tokens)
        for t, p in zip(traces, plans, strict=True)
    ]
    if any(
        h is None
        or (h.stored.bucket, h.stored.chunk, h.stored.cache.length) != (bucket, chunk, length)
        for h in hits
    ):
        return None
    # Kept tokens report their log-probs under the counterfactual's sampler: a row whose
    # sampler changed rescores them, from step 0 (only its prompt's cache is reused).
    first = min(
        p.edit_start if p.sampler == t.sampler else 0 for t, p in zip(traces, plans, strict=True)
    )
    # One `take` per layer array per run of rows from one stored batch: a new array, as the
    # decode donates its cache and the stored one must survive.
    parts, starts = [], []
    for _, group in itertools.groupby(hits, key=lambda h: id(h.stored)):
        group = list(group)
        rows = np.asarray([h.row for h in group])
        stored = group[0].stored
        parts.append(jax.tree_util.tree_map(lambda x, r=rows: jnp.take(x, r, axis=0), stored.cache))
        starts.append(stored.start[rows])
    cache = (
        parts[0]
        if len(parts) == 1
        else jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
    )
    last = [t.tokens[first - 1] if first > 0 else t.prompt_tokens[-1] for t in traces]
    return engine.Resume(cache, np.concatenate(starts), bucket, first, last)


def _run_group(
    lm: LM,
    traces: list[Trace],
    plans: list[Plan],
    keys: list[jax.Array],
    fresh: bool,
    reuse_cache: bool,
    chunk: int,
    caps: list[int | None],
    draft: speculative.Draft | None,
) -> list[Trace]:
    """Run rows that share a mechanism and params as one batch (samplers may differ)."""
    params = plans[0].params
    # Each row keeps its own length limit (the batch runs to the longest and rows are cut), so a
    # batched row equals its one-by-one result. A cap shortens a row (never below its forced
    # prefix); decoding is causal, so a capped row is a prefix of the uncapped one. A forced
    # prefix that reaches the budget ends the row: no token is sampled past the factual's budget,
    # so a null edit of a capped response's last token reproduces it exactly.
    limits = [
        max(t.max_new_tokens if c is None else min(c, t.max_new_tokens), p.resume_at)
        for t, p, c in zip(traces, plans, caps, strict=True)
    ]
    steps = max(limits)
    # The cache keeps the factual run's size, so that a capped batch still resumes from it.
    cache_steps = max(steps, *(t.max_new_tokens for t in traces))
    prompts = [p.prompt_tokens for p in plans]
    check_request(lm, prompts, steps)
    forced = np.full((len(plans), steps), engine.NOT_FORCED, np.int32)
    for b, p in enumerate(plans):
        forced[b, : p.resume_at] = p.forced
    noise = np.stack([_noise_map(t, p, steps, fresh) for t, p in zip(traces, plans, strict=True)])
    stop_tokens = traces[0].stop_tokens
    bucket = engine.bucket_length(max(len(p) for p in prompts))
    length = engine.cache_length(bucket, cache_steps, chunk, engine.spare_for(draft))
    observed = None
    if not fresh:  # abducted rows draw their noise from their observation's posterior
        for t, p in zip(traces, plans, strict=True):
            if t.posterior is not None and p.sampler.mechanism != "gumbel":
                raise ValueError(
                    "an abducted trace's noise is per token id: replay it with the 'gumbel' "
                    f"mechanism, not {p.sampler.mechanism!r}"
                )
        observed = observed_steps(lm, traces, cache_steps=cache_steps, chunk=chunk)
    resume = _resume(lm, traces, plans, bucket, length, chunk) if reuse_cache else None
    first = 0 if resume is None else resume.step
    request = engine.Request(
        prompts,
        jnp.stack(keys),
        [p.sampler for p in plans],
        steps,
        forced,
        noise,
        observed=observed,
        cache_steps=cache_steps,
    )
    out = engine.run(
        lm.config, params, request, stop_tokens=stop_tokens, chunk=chunk, resume=resume,
        draft=draft,
    )  # fmt: skip
    results = []
    for b, (t, p) in enumerate(zip(traces, plans, strict=True)):
        tokens = (list(t.tokens[:first]) + out.tokens[b])[: limits[b]]
        logprobs = (list(t.logprobs[:first]) + out.logprobs[b])[: limits[b]]
        results.append(
            Trace(
                model_id=p.model_id,
                prompt_tokens=p.prompt_tokens,
                tokens=tokens,
                key=keys[b],
                sampler=p.sampler,
                max_new_tokens=limits[b],
                noise_index=noise[b, : len(tokens)].tolist(),
                logprobs=logprobs,
                text=text_of(lm, tokens, stop_tokens),
                prompt=p.prompt,
                system=p.system,
                chat=p.chat,
                stop_tokens=stop_tokens,
                interventions=p.records,
                alignment={
                    "edit_start": p.edit_start,
                    "resume_at": p.resume_at,
                    "aligned_to": p.aligned_to,
                    "fresh_noise": fresh,
                },
                posterior=None if fresh else t.posterior,
            )
        )
    if params is lm.params:  # so that a counterfactual of a counterfactual reuses this cache
        rows = [(r.prompt_tokens, r.tokens) for r in results]
        lm.caches.put(Stored(out.cache, out.start, out.bucket, chunk, params), rows)
    return results


def _caps(max_new_tokens: int | Sequence[int] | None, rows: int) -> list[int | None]:
    if max_new_tokens is None:
        return [None] * rows
    caps = (
        [max_new_tokens] * rows
        if isinstance(max_new_tokens, (int, np.integer))
        else list(max_new_tokens)
    )
    if len(caps) != rows:
        raise ValueError(f"{len(caps)} max_new_tokens values for {rows} rows")
    return [count(c, "max_new_tokens") for c in caps]


def _batch(
    lm: LM,
    traces: list[Trace],
    interventions: list[Any],
    keys: list[jax.Array],
    fresh: bool,
    resume_at: int | None,
    reuse_cache: bool,
    chunk: int | None,
    max_new_tokens: int | Sequence[int] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> list[Trace]:
    if not traces:
        raise ValueError("no rows: give at least one trace and intervention")
    caps = _caps(max_new_tokens, len(traces))
    engine_draft = draft_for(lm, draft, lookahead)
    if chunk is None:  # the factual run's chunk, so that its stored cache can be reused
        hit = lm.caches.get(lm.params, traces[0].prompt_tokens, traces[0].tokens)
        chunk = hit.stored.chunk if hit is not None else engine.DEFAULT_CHUNK
    plans = [plan(lm, t, iv, resume_at) for t, iv in zip(traces, interventions, strict=True)]
    results: list[Trace | None] = [None] * len(plans)
    # Rows batch together when they share the static mechanism and the params; sampler values
    # are data, so a grid of temperatures, top-k and top-p values is one batch.
    group_of = lambda i: (plans[i].sampler.mechanism, id(plans[i].params))  # noqa: E731
    order = sorted(range(len(plans)), key=group_of)
    for _, members in itertools.groupby(order, key=group_of):
        idx = list(members)
        out = _run_group(
            lm,
            [traces[i] for i in idx],
            [plans[i] for i in idx],
            [keys[i] for i in idx],
            fresh,
            reuse_cache,
            chunk,
            [caps[i] for i in idx],
            engine_draft,
        )
        for i, r in zip(idx, out, strict=True):
            results[i] = r
    return results  # type: ignore[return-value]


def counterfactual(
    lm: LM,
    trace: Trace,
    intervention: Intervention | list[Intervention],
    *,
    resume_at: int | None = None,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Trace:
    """What the model would have written under `intervention`, with the factual noise.

    `max_new_tokens` stops the counterfactual earlier than the factual's budget (its tokens are
    then a prefix of the full counterfactual's). `draft` / `lookahead`: speculative decoding,
    as in `generate` (the same tokens; the factual's stored cache is reused when it was made
    with the same lookahead)."""
    return _batch(
        lm, [trace], [intervention], [trace.key], False, resume_at, reuse_cache, chunk,
        max_new_tokens, draft, lookahead,
    )[0]  # fmt: skip


def interventional(
    lm: LM,
    trace: Trace,
    intervention: Intervention | list[Intervention],
    *,
    key: Any,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Trace:
    """The same intervention with fresh noise drawn from `key` (the interventional baseline)."""
    fresh = as_key(key)
    return _batch(
        lm, [trace], [intervention], [fresh], True, None, reuse_cache, chunk, max_new_tokens,
        draft, lookahead,
    )[0]  # fmt: skip


def counterfactuals(
    lm: LM,
    trace: Trace | Sequence[Trace],
    interventions: Sequence[Intervention | list[Intervention]],
    *,
    resume_at: int | None = None,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | Sequence[int] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> list[Trace]:
    """Many counterfactuals as one batch: N interventions of one trace, or one per trace.

    Each row keeps its own key, so the results equal one-by-one `counterfactual` calls.
    `max_new_tokens` (one cap, or one per row) stops rows early, and `draft` / `lookahead`
    decode speculatively, as in `counterfactual`.
    """
    traces = [trace] * len(interventions) if isinstance(trace, Trace) else list(trace)
    if len(traces) != len(interventions):
        raise ValueError(f"{len(traces)} traces but {len(interventions)} interventions")
    keys = [t.key for t in traces]
    return _batch(
        lm, traces, list(interventions), keys, False, resume_at, reuse_cache, chunk,
        max_new_tokens, draft, lookahead,
    )  # fmt: skip


def interventionals(
    lm: LM,
    traces: Sequence[Trace],
    interventions: Sequence[Intervention | list[Intervention]],
    *,
    keys: Any,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | Sequence[int] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> list[Trace]:
    """Many interventional runs as one batch: row b applies `interventions[b]` to `traces[b]`
    with fresh noise from `keys[b]` (a `[B]` key array, or one key split into B);
    `max_new_tokens`, `draft` and `lookahead` as in `counterfactuals`."""
    traces = list(traces)
    if len(traces) != len(interventions):
        raise ValueError(f"{len(traces)} traces but {len(interventions)} interventions")
    if not traces:
        raise ValueError("no rows: give at least one trace and intervention")
    fresh = list(row_keys(keys, len(traces)))
    return _batch(
        lm, traces, list(interventions), fresh, True, None, reuse_cache, chunk, max_new_tokens,
        draft, lookahead,
    )  # fmt: skip
