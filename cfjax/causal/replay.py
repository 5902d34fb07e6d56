"""Counterfactual and interventional generation from a factual `Trace` or `Conversation`.

Counterfactual: the same noise under an intervention (DESIGN.md §2); interventional: the same
edit with fresh, independent noise (the paper's baseline). Single traces run as rows of one
batch (`rows.py`); conversations turn by turn, every later turn with its factual noise
(`turns.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cfjax.causal.conversation import Conversation
from cfjax.causal.interventions import Intervention
from cfjax.causal.rows import run_rows
from cfjax.causal.trace import Trace
from cfjax.causal.turns import replay_conversations
from cfjax.core import speculative
from cfjax.core.checks import as_key
from cfjax.runtime.lm import LM
from cfjax.runtime.request import row_keys


def _rows(lm, traces, interventions, keys, fresh, resume_at, reuse_cache, chunk, max_new_tokens,
          draft, lookahead) -> list:  # fmt: skip
    """Single traces as rows of a batch, or conversations turn by turn (not mixed); `keys`
    None: each trace's own key."""
    if not traces:
        raise ValueError("no rows: give at least one trace and intervention")
    _check_traces(traces)
    if keys is None:
        keys = [t.key for t in traces]
    conversations = [isinstance(t, Conversation) for t in traces]
    if not any(conversations):
        return run_rows(lm, traces, interventions, keys, fresh, resume_at, reuse_cache, chunk,
                        max_new_tokens, draft, lookahead)  # fmt: skip
    if not all(conversations):
        raise ValueError("give conversations or single traces, not both in one batch")
    if resume_at is not None:
        raise ValueError("resume_at aligns one answer's noise; a conversation's turns align by (turn, step)")  # fmt: skip
    return replay_conversations(
        lm, traces, interventions, fresh_keys=list(keys) if fresh else None,
        reuse_cache=reuse_cache, chunk=chunk, max_new_tokens=max_new_tokens, draft=draft,
        lookahead=lookahead,
    )  # fmt: skip


def _check_traces(traces: Sequence[Any]) -> None:
    for b, t in enumerate(traces):
        if not isinstance(t, (Trace, Conversation)):
            raise TypeError(f"trace {b}: a Trace or a Conversation, not a {type(t).__name__}")


def counterfactual(
    lm: LM,
    trace: Trace | Conversation,
    intervention: Intervention | list[Intervention],
    *,
    resume_at: int | None = None,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Trace | Conversation:
    """What the model would have written under `intervention`, with the factual noise.

    `max_new_tokens` stops the counterfactual earlier than the factual's budget (its tokens are
    then a prefix of the full counterfactual's). `draft` / `lookahead`: speculative decoding,
    as in `generate` (the same tokens; the factual's stored cache is reused when it was made
    with the same lookahead). A `Conversation` takes interventions addressed to a turn
    (`AtTurn`) and returns the counterfactual conversation (see `cfjax.causal.turns`)."""
    return _rows(
        lm, [trace], [intervention], None, False, resume_at, reuse_cache, chunk,
        max_new_tokens, draft, lookahead,
    )[0]  # fmt: skip


def interventional(
    lm: LM,
    trace: Trace | Conversation,
    intervention: Intervention | list[Intervention],
    *,
    key: Any,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Trace | Conversation:
    """The same intervention with fresh noise drawn from `key` (the interventional baseline).

    A conversation draws fresh noise from its first changed turn on, turn k from
    `fold_in(key, k)`."""
    fresh = as_key(key)
    return _rows(
        lm, [trace], [intervention], [fresh], True, None, reuse_cache, chunk, max_new_tokens,
        draft, lookahead,
    )[0]  # fmt: skip


def counterfactuals(
    lm: LM,
    trace: Trace | Conversation | Sequence[Trace | Conversation],
    interventions: Sequence[Intervention | list[Intervention]],
    *,
    resume_at: int | None = None,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | Sequence[int] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> list:
    """Many counterfactuals as one batch: N interventions of one trace (or conversation), or
    one per trace.

    Each row keeps its own key, so the results equal one-by-one `counterfactual` calls.
    `max_new_tokens` (one cap, or one per row) stops rows early, and `draft` / `lookahead`
    decode speculatively, as in `counterfactual`.
    """
    one = isinstance(trace, (Trace, Conversation))
    traces = [trace] * len(interventions) if one else list(trace)
    if len(traces) != len(interventions):
        raise ValueError(f"{len(traces)} traces but {len(interventions)} interventions")
    return _rows(
        lm, traces, list(interventions), None, False, resume_at, reuse_cache, chunk,
        max_new_tokens, draft, lookahead,
    )  # fmt: skip


def interventionals(
    lm: LM,
    traces: Sequence[Trace | Conversation],
    interventions: Sequence[Intervention | list[Intervention]],
    *,
    keys: Any,
    reuse_cache: bool = True,
    chunk: int | None = None,
    max_new_tokens: int | Sequence[int] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> list:
    """Many interventional runs as one batch: row b applies `interventions[b]` to `traces[b]`
    with fresh noise from `keys[b]` (a `[B]` key array, or one key split into B);
    `max_new_tokens`, `draft` and `lookahead` as in `counterfactuals`."""
    traces = list(traces)
    if len(traces) != len(interventions):
        raise ValueError(f"{len(traces)} traces but {len(interventions)} interventions")
    if not traces:
        raise ValueError("no rows: give at least one trace and intervention")
    fresh = list(row_keys(keys, len(traces)))
    return _rows(
        lm, traces, list(interventions), fresh, True, None, reuse_cache, chunk, max_new_tokens,
        draft, lookahead,
    )  # fmt: skip
