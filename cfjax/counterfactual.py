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

from cfjax import decode
from cfjax.generate import as_key, check_request
from cfjax.interventions import Intervention, Plan, plan
from cfjax.lm import LM
from cfjax.trace import Trace


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


def _can_reuse(traces: Sequence[Trace], plans: Sequence[Plan], length: int, chunk: int) -> bool:
    rts = [t.runtime for t in traces]
    return (
        all(rt is not None for rt in rts)
        and not any(p.prompt_changed or p.model_changed for p in plans)
        # A cache filled by other params (same model_id, edited weights) would be stale.
        and all(rt.params is p.params for rt, p in zip(rts, plans, strict=True))
        and all(p.sampler == t.sampler for p, t in zip(plans, traces, strict=True))
        and len({rt.prep.bucket for rt in rts}) == 1
        and all(rt.chunk == chunk and rt.cache.length == length for rt in rts)
    )


def _run_group(
    lm: LM,
    traces: list[Trace],
    plans: list[Plan],
    keys: jax.Array,
    fresh: bool,
    reuse_cache: bool,
    chunk: int,
) -> list[Trace]:
    """Run rows that share sampler and params as one batch."""
    sampler, params = plans[0].sampler, plans[0].params
    # Each row keeps its own length limit (the batch runs to the longest and rows are cut), so a
    # batched row equals its one-by-one result.
    limits = [max(t.max_new_tokens, p.resume_at + 1) for t, p in zip(traces, plans, strict=True)]
    steps = max(limits)
    check_request(lm, [p.prompt_tokens for p in plans], steps)
    forced = np.full((len(plans), steps), decode.NOT_FORCED, np.int32)
    for b, p in enumerate(plans):
        forced[b, : p.resume_at] = p.forced
    noise = np.stack([_noise_map(t, p, steps, fresh) for t, p in zip(traces, plans, strict=True)])
    stop_tokens = traces[0].stop_tokens
    prep = decode.prepare([p.prompt_tokens for p in plans])
    length = decode.cache_length(prep.bucket, steps, chunk)

    first = 0
    if reuse_cache and _can_reuse(traces, plans, length, chunk):
        first = min(p.edit_start for p in plans)
        last = [t.tokens[first - 1] if first > 0 else t.prompt_tokens[-1] for t in traces]
        carry, start = decode.resume([t.runtime for t in traces], first, last)
        prep = traces[0].runtime.prep
    else:
        carry = decode.prefill(lm.config, params, prep, length)
        start = prep.start
    out = decode.decode(
        lm.config,
        params,
        carry,
        start=jnp.asarray(start),
        keys=keys,
        sampler=sampler,
        stop_tokens=stop_tokens,
        steps=steps,
        forced=forced,
        noise_index=noise,
        first_step=first,
        chunk=chunk,
    )
    runtime = decode.Runtime(out.carry.cache, _prep_for(prep, start), chunk, params)
    results = []
    for b, (t, p) in enumerate(zip(traces, plans, strict=True)):
        tokens = (list(t.tokens[:first]) + out.tokens[b])[: limits[b]]
        logprobs = (list(t.logprobs[:first]) + out.logprobs[b])[: limits[b]]
        text = ""
        if lm.tokenizer is not None:
            body = tokens[:-1] if tokens and tokens[-1] in stop_tokens else tokens
            text = lm.tokenizer.decode(body)
        results.append(
            Trace(
                model_id=p.model_id,
                prompt_tokens=p.prompt_tokens,
                tokens=tokens,
                key=keys[b],
                sampler=sampler,
                max_new_tokens=limits[b],
                noise_index=noise[b, : len(tokens)].tolist(),
                logprobs=logprobs,
                text=text,
                prompt=t.prompt,
                system=t.system,
                chat=t.chat,
                stop_tokens=stop_tokens,
                interventions=p.records,
                alignment={
                    "edit_start": p.edit_start,
                    "resume_at": p.resume_at,
                    "aligned_to": p.aligned_to,
                    "fresh_noise": fresh,
                },
                runtime=runtime.row(b) if not p.model_changed else None,
            )
        )
    return results


def _prep_for(prep: decode.Prepared, start: np.ndarray) -> decode.Prepared:
    return decode.Prepared(prep.prefix, prep.last, np.asarray(start), prep.bucket)


def _batch(
    lm: LM,
    traces: list[Trace],
    interventions: list[Any],
    keys: list[jax.Array],
    fresh: bool,
    resume_at: int | None,
    reuse_cache: bool,
    chunk: int | None,
) -> list[Trace]:
    if chunk is None:  # the factual run's chunk, so that its stored cache can be reused
        runtime = traces[0].runtime
        chunk = runtime.chunk if runtime is not None else decode.DEFAULT_CHUNK
    plans = [plan(lm, t, iv, resume_at) for t, iv in zip(traces, interventions, strict=True)]
    results: list[Trace | None] = [None] * len(plans)
    # Rows batch together when they share the static sampler and the params.
    group_of = lambda i: (plans[i].sampler, id(plans[i].params))  # noqa: E731
    order = sorted(range(len(plans)), key=lambda i: (str(group_of(i)[0]), group_of(i)[1]))
    for _, members in itertools.groupby(order, key=group_of):
        idx = list(members)
        out = _run_group(
            lm,
            [traces[i] for i in idx],
            [plans[i] for i in idx],
            jnp.stack([keys[i] for i in idx]),
            fresh,
            reuse_cache,
            chunk,
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
) -> Trace:
    """What the model would have written under `intervention`, with the factual noise."""
    return _batch(lm, [trace], [intervention], [trace.key], False, resume_at, reuse_cache, chunk)[0]


def interventional(
    lm: LM,
    trace: Trace,
    intervention: Intervention | list[Intervention],
    *,
    key: Any,
    reuse_cache: bool = True,
    chunk: int | None = None,
) -> Trace:
    """The same intervention with fresh noise drawn from `key` (the interventional baseline)."""
    fresh = as_key(key)
    return _batch(lm, [trace], [intervention], [fresh], True, None, reuse_cache, chunk)[0]


def counterfactuals(
    lm: LM,
    trace: Trace | Sequence[Trace],
    interventions: Sequence[Intervention | list[Intervention]],
    *,
    resume_at: int | None = None,
    reuse_cache: bool = True,
    chunk: int | None = None,
) -> list[Trace]:
    """Many counterfactuals as one batch: N interventions of one trace, or one per trace.

    Each row keeps its own key, so the results equal one-by-one `counterfactual` calls.
    """
    traces = [trace] * len(interventions) if isinstance(trace, Trace) else list(trace)
    if len(traces) != len(interventions):
        raise ValueError(f"{len(traces)} traces but {len(interventions)} interventions")
    keys = [t.key for t in traces]
    return _batch(lm, traces, list(interventions), keys, False, resume_at, reuse_cache, chunk)
