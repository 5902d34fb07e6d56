"""Rows of counterfactual or interventional runs, each a factual `Trace` under interventions,
decoded as batches (one per mechanism and params).

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
from cfjax.causal.factual import draft_for
from cfjax.causal.interventions import plan
from cfjax.causal.plan import Plan
from cfjax.causal.trace import Prompt, Trace, new_trace
from cfjax.core import speculative
from cfjax.core.checks import count
from cfjax.core.kernel import NOT_FORCED
from cfjax.runtime import driver, prefix
from cfjax.runtime.lm import LM
from cfjax.runtime.request import check_request


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


def _resume(lm: LM, traces: list[Trace], plans: list[Plan]) -> driver.Resume | None:
    """Continue every row from its factual run's stored cache, if all of them are still kept.

    Only with the prompt and params unchanged: then the steps before the first edit are the
    factual ones, already in the cache.
    """
    if any(p.prompt_changed or p.params is not lm.params for p in plans):
        return None
    # Kept tokens report their log-probs under the counterfactual's sampler: a row whose
    # sampler changed rescores them, from step 0 (only its prompt's cache is reused).
    first = min(p.edit_start if p.sampler == t.sampler else 0 for t, p in zip(traces, plans, strict=True))  # fmt: skip
    last = [t.tokens[first - 1] if first > 0 else t.prompt_tokens[-1] for t in traces]
    return lm.caches.resume(lm.params, [(t.prompt_tokens, t.tokens) for t in traces], first, last)


def _reference(lm: LM, traces: list[Trace], plans: list[Plan], stored: bool) -> prefix.Reference | None:  # fmt: skip
    """Edited prompts of one trace share their unedited prefix with its prompt: the prefill
    fills it once, or (`stored`) takes it from the factual run's stored cache while kept."""
    if len({tuple(t.prompt_tokens) for t in traces}) != 1 or not any(p.prompt_changed for p in plans):  # fmt: skip
        return None
    t = traces[0]
    hit = lm.caches.get(plans[0].params, t.prompt_tokens, t.tokens) if stored else None
    if hit is None:
        return prefix.Reference(list(t.prompt_tokens))
    row = jax.tree_util.tree_map(lambda x: x[hit.row : hit.row + 1], hit.stored.cache)
    return prefix.Reference(list(t.prompt_tokens), row, int(hit.stored.start[hit.row]))


def _request(lm: LM, traces: list[Trace], plans: list[Plan], keys, fresh: bool, caps) -> tuple[driver.Request, list[int]]:  # fmt: skip
    """The batch to decode, and each row's length limit.

    Each row keeps its own limit (the batch runs to the longest and rows are cut), so a batched
    row equals its one-by-one result. A cap shortens a row (never below its forced prefix);
    decoding is causal, so a capped row is a prefix of the uncapped one. A forced prefix that
    reaches the budget ends the row: no token is sampled past the factual's budget, so a null
    edit of a capped response's last token reproduces it exactly.
    """
    limits = [
        max(t.max_new_tokens if c is None else min(c, t.max_new_tokens), p.resume_at)
        for t, p, c in zip(traces, plans, caps, strict=True)
    ]
    steps = max(limits)
    prompts = [p.prompt_tokens for p in plans]
    check_request(lm, prompts, steps)
    forced = np.full((len(plans), steps), NOT_FORCED, np.int32)
    for b, p in enumerate(plans):
        forced[b, : p.resume_at] = p.forced
    noise_index = np.stack([_noise_map(t, p, steps, fresh) for t, p in zip(traces, plans, strict=True)])  # fmt: skip
    # The cache keeps the factual run's size, so that a capped batch still resumes from it.
    cache_steps = max(steps, *(t.max_new_tokens for t in traces))
    request = driver.Request(prompts, jnp.stack(keys), [p.sampler for p in plans], steps, forced,
                             noise_index, cache_steps=cache_steps)  # fmt: skip
    return request, limits


def _run_group(lm: LM, traces: list[Trace], plans: list[Plan], keys: list[jax.Array], fresh: bool,
               reuse_cache: bool, chunk: int | None, caps: list[int | None],
               draft: speculative.Draft | None) -> list[Trace]:  # fmt: skip
    """Run rows that share a mechanism and params as one batch (samplers may differ)."""
    params = plans[0].params
    request, limits = _request(lm, traces, plans, keys, fresh, caps)
    if not fresh:  # abducted rows draw their noise from their observation's posterior
        for t, p in zip(traces, plans, strict=True):
            if t.posterior is not None and p.sampler.mechanism != "gumbel":
                raise ValueError(
                    "an abducted trace's noise is per token id: replay it with the 'gumbel' "
                    f"mechanism, not {p.sampler.mechanism!r}"
                )
        request.observed = observed_steps(lm, traces, cache_steps=request.cache_steps, chunk=chunk)
    resume = _resume(lm, traces, plans) if reuse_cache else None
    if resume is None:
        request.reference = _reference(lm, traces, plans, reuse_cache)
    out = driver.run(lm.config, params, request, stop_tokens=traces[0].stop_tokens, chunk=chunk,
                     resume=resume, draft=draft, pad_rows=lm.pad_batch)  # fmt: skip
    results = []
    for b, (t, p) in enumerate(zip(traces, plans, strict=True)):
        tokens = (list(t.tokens[: out.first]) + out.tokens[b])[: limits[b]]
        logprobs = (list(t.logprobs[: out.first]) + out.logprobs[b])[: limits[b]]
        alignment = {"edit_start": p.edit_start, "resume_at": p.resume_at,
                     "aligned_to": p.aligned_to, "fresh_noise": fresh}  # fmt: skip
        results.append(new_trace(
            lm, Prompt(p.prompt_tokens, p.prompt, p.system, p.chat, p.history), tokens, logprobs,
            key=keys[b], sampler=p.sampler, max_new_tokens=limits[b],
            stop_tokens=traces[0].stop_tokens, model_id=p.model_id,
            noise_index=request.noise_index[b, : len(tokens)], interventions=p.records,
            alignment=alignment, posterior=None if fresh else t.posterior,
        ))  # fmt: skip
    if params is lm.params:  # so that a counterfactual of a counterfactual reuses this cache
        lm.caches.keep(params, out, [(r.prompt_tokens, r.tokens) for r in results])
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


def run_rows(
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
    """Row b: `interventions[b]` on `traces[b]`, with noise key `keys[b]` (the trace's own for
    counterfactuals, a fresh one with `fresh`); rows of one mechanism and params run as one
    batch."""
    caps = _caps(max_new_tokens, len(traces))
    spec_draft = draft_for(lm, draft, lookahead)
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
            spec_draft,
        )
        for i, r in zip(idx, out, strict=True):
            results[i] = r
    return results  # type: ignore[return-value]
