"""Counterfactuals of conversations: an intervention addressed to a turn (`AtTurn`), and the
replay of every later turn with its factual noise.

Turns before the addressed one are kept as they were. The addressed turn is the counterfactual
of its trace under the intervention: `EditPrompt(prompt=...)` edits that turn's user message,
`EditPrompt(system=...)` the system message (turn 0 only: it precedes every turn), response
edits change that turn's answer, and `ChangeSampler`, `ChangeModel` and `Steer` hold from that
turn on. Every later turn answers its user message as scripted, after the counterfactual
history, with its factual noise: its trace's counterfactual under the new context (a turn whose
context did not change reproduces its factual answer exactly). Turns run turn by turn, every
conversation of a batch in one engine batch per turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from cfjax.causal.conversation import Conversation, history_after, turn_key
from cfjax.causal.interventions import (
    ChangeModel,
    ChangeSampler,
    EditPrompt,
    Intervention,
    Steer,
)
from cfjax.causal.rows import run_rows
from cfjax.causal.trace import Trace
from cfjax.core.checks import integer
from cfjax.runtime.lm import LM
from cfjax.runtime.request import prompt_tokens

# Interventions that hold from their turn to the end of the conversation.
_CARRIED = (ChangeSampler, ChangeModel, Steer)


@dataclasses.dataclass(frozen=True, eq=False)
class AtTurn(Intervention):
    """`interventions` applied at assistant turn `turn` (0-based) of a `Conversation`."""

    turn: int
    interventions: Any

    def __post_init__(self):
        object.__setattr__(self, "turn", integer(self.turn, "AtTurn turn", 0))
        ivs = self.interventions
        ivs = [ivs] if isinstance(ivs, Intervention) else list(ivs)
        if not ivs:
            raise ValueError("AtTurn: give at least one intervention")
        for iv in ivs:
            if isinstance(iv, AtTurn) or not isinstance(iv, Intervention):
                raise TypeError(f"AtTurn: not an intervention on a turn: {iv!r:.80}")
            if isinstance(iv, EditPrompt) and iv.tokens is not None:
                raise ValueError("AtTurn: a conversation's turns are text; edit a message with EditPrompt(prompt=...)")  # fmt: skip
            if isinstance(iv, EditPrompt) and iv.system is not None and self.turn != 0:
                raise ValueError("AtTurn: the system message precedes every turn; address EditPrompt(system=...) to turn 0")  # fmt: skip
        object.__setattr__(self, "interventions", tuple(ivs))

    def record(self) -> dict:
        return {"type": "AtTurn", "turn": self.turn,
                "interventions": [iv.record() for iv in self.interventions]}  # fmt: skip

    def edit(self, lm, trace, p):
        raise ValueError("AtTurn addresses a turn of a conversation; this trace is a single answer")  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class _Context(Intervention):
    """A turn's context in the counterfactual conversation: its user message, the system
    message and the messages before it (identity when they are the factual ones)."""

    prompt: str
    system: str | None
    history: list[dict]

    def record(self) -> dict:
        return {"type": "Context"}

    def edit(self, lm, trace, p):
        p.prompt, p.system, p.history = self.prompt, self.system, self.history or None
        new = prompt_tokens(lm, self.prompt, chat=True, system=self.system, history=self.history)
        p.prompt_changed = p.prompt_changed or new != p.prompt_tokens
        p.prompt_tokens = new


def _by_turn(conv: Conversation, intervention: Any) -> dict[int, list[Intervention]]:
    if not isinstance(intervention, (Intervention, list, tuple)):
        raise TypeError(f"not an intervention: {intervention!r} (give AtTurn(turn, intervention) or a list of them)")  # fmt: skip
    ivs = [intervention] if isinstance(intervention, Intervention) else list(intervention)
    if not ivs:
        raise ValueError("no intervention given: pass AtTurn(turn, intervention) or a list of them")  # fmt: skip
    out: dict[int, list[Intervention]] = {}
    for iv in ivs:
        if not isinstance(iv, AtTurn):
            raise ValueError(f"a conversation's intervention says which turn it changes: wrap it as AtTurn(turn, {type(iv).__name__}(...))")  # fmt: skip
        if iv.turn >= len(conv.turns):
            raise ValueError(f"AtTurn turn {iv.turn}: the conversation has turns 0 to {len(conv.turns) - 1}")  # fmt: skip
        out.setdefault(iv.turn, []).extend(iv.interventions)
    return out


def _turn_rows(conv: Conversation, by_turn: dict[int, list[Intervention]], k: int,
               before: list[Trace]) -> list[Intervention]:  # fmt: skip
    """The interventions on factual turn `k`, given the counterfactual turns `before` it."""
    system = conv.system
    carried: list[Intervention] = []
    here: list[Intervention] = []
    for turn, ivs in by_turn.items():
        for iv in ivs:
            if turn == k:
                here.append(iv)
            elif turn < k and isinstance(iv, EditPrompt) and iv.system is not None:
                system = iv.system
            elif turn < k and isinstance(iv, _CARRIED):
                carried.append(iv)
    history = history_after(before[-1]) if before else []
    return [_Context(conv.turns[k].prompt, system, history), *carried, *here]  # type: ignore[arg-type]


def replay_conversations(
    lm: LM,
    convs: list[Conversation],
    interventions: Sequence[Any],
    *,
    fresh_keys: list[jax.Array] | None,
    reuse_cache: bool,
    chunk: int | None,
    max_new_tokens: int | Sequence[int] | None,
    draft: LM | None,
    lookahead: int,
) -> list[Conversation]:
    """Row b: `interventions[b]` (AtTurn, or a list of them) on `convs[b]`, with its factual
    noise, or with fresh noise from `fresh_keys[b]` from the first changed turn on."""
    by_turn = [_by_turn(c, iv) for c, iv in zip(convs, interventions, strict=True)]
    first = [min(t) for t in by_turn]
    out: list[list[Trace]] = [list(c.turns[:f]) for c, f in zip(convs, first, strict=True)]
    for k in range(min(first), max(len(c.turns) for c in convs)):
        rows = [b for b, c in enumerate(convs) if first[b] <= k < len(c.turns)]
        traces = [convs[b].turns[k] for b in rows]
        plans = [_turn_rows(convs[b], by_turn[b], k, out[b]) for b in rows]
        keys = [t.key if fresh_keys is None else turn_key(fresh_keys[b], k) for b, t in zip(rows, traces, strict=True)]  # fmt: skip
        caps = max_new_tokens if max_new_tokens is None or isinstance(max_new_tokens, int) else [max_new_tokens[b] for b in rows]  # fmt: skip
        made = run_rows(lm, traces, plans, keys, fresh_keys is not None, None, reuse_cache, chunk, caps, draft, lookahead)  # fmt: skip
        for b, t in zip(rows, made, strict=True):
            out[b].append(t)
    return [
        Conversation(
            c.key if fresh_keys is None else fresh_keys[b],
            out[b],
            [*c.interventions, *(AtTurn(k, ivs).record() for k, ivs in sorted(by_turn[b].items()))],
        )
        for b, c in enumerate(convs)
    ]
