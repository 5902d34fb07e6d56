"""Conversations: the assistant turns of a chat, each a `Trace` with its own noise.

Assistant turn `k` (0 for the first answer) samples its step `i` with the noise of
`jax.random.fold_in(jax.random.fold_in(key, k), i)`: its trace's key is `fold_in(key, k)`, so
an edit in one turn keeps every later turn's noise aligned by (turn, step) even when lengths
change. Turn `k`'s prompt renders the chat template over the system message, the earlier user
and assistant messages (the assistant's as the text it wrote) and user message `k`; its trace
records the earlier messages as `history`. A one-turn conversation is the `Trace` that
`generate` makes with the key `fold_in(key, 0)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from cfjax.causal.factual import _samplers, sample_rows
from cfjax.causal.trace import Prompt, Trace, key_from_list, key_to_list, read_json, write_json
from cfjax.core import speculative
from cfjax.core.checks import count
from cfjax.core.kernel import DEFAULT_CHUNK
from cfjax.core.scm import Sampler
from cfjax.runtime.lm import LM
from cfjax.runtime.request import row_keys


def turn_key(key: jax.Array, turn: int) -> jax.Array:
    """The noise key of assistant turn `turn`."""
    return jax.random.fold_in(key, turn)


@dataclasses.dataclass
class Conversation:
    """The assistant turns of a chat (`turns[k]`: the trace of answer k) and the key they
    derive from. Counterfactuals of it carry `interventions`: what was changed at which turn."""

    key: jax.Array
    turns: list[Trace]
    interventions: list[dict] = dataclasses.field(default_factory=list)

    @property
    def system(self) -> str | None:
        return self.turns[0].system

    @property
    def user_messages(self) -> list[str]:
        return [t.prompt for t in self.turns]  # type: ignore[misc]

    @property
    def messages(self) -> list[dict]:
        """The whole chat: system (if any), then user and assistant messages in turn."""
        last = self.turns[-1]
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + history_after(last)

    def to_dict(self) -> dict:
        """The last turn's trace fields (so a reader of traces sees the final answer, with the
        whole chat as its prompt), plus `turns`, `conversation_key` and
        `conversation_interventions`."""
        return {
            **self.turns[-1].to_dict(),
            "conversation_key": key_to_list(self.key),
            "conversation_interventions": self.interventions,
            "turns": [t.to_dict() for t in self.turns],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Conversation:
        if not isinstance(d, dict) or "turns" not in d:
            raise ValueError("not a cfjax conversation: no field turns")
        turns = d["turns"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("conversation field turns must be a non-empty list of traces")
        out = []
        for k, t in enumerate(turns):
            try:
                out.append(Trace.from_dict(t))
            except ValueError as e:
                raise ValueError(f"conversation turn {k}: {e}") from None
        check_turns(out)
        ivs = d.get("conversation_interventions", [])
        if not isinstance(ivs, list) or not all(isinstance(x, dict) for x in ivs):
            raise ValueError("conversation field conversation_interventions must be a list of objects")  # fmt: skip
        try:
            key = key_from_list(d.get("conversation_key"))
        except ValueError as e:
            raise ValueError(f"conversation field conversation_key: {e}") from None
        return cls(key, out, ivs)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise; also write to `path` if given."""
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Conversation:
        """Parse a file written by `to_json` (a path) or JSON text."""
        return read_json(text_or_path, "conversation", cls.from_dict)


def load(text_or_path: str | Path) -> Trace | Conversation:
    """A trace or a conversation file (one with `turns`), whichever it holds."""
    parse = lambda d: Conversation.from_dict(d) if isinstance(d, dict) and "turns" in d else Trace.from_dict(d)  # noqa: E731  # fmt: skip
    return read_json(text_or_path, "trace", parse)


def history_after(turn: Trace) -> list[dict]:
    """The user and assistant messages up to and including `turn`'s answer."""
    return [*(turn.history or []), {"role": "user", "content": turn.prompt},
            {"role": "assistant", "content": turn.text}]  # fmt: skip


def check_turns(turns: list[Trace]) -> None:
    """Every turn is a chat turn whose history is the turns before it (a hand-edited file must
    not replay as another conversation)."""
    for k, t in enumerate(turns):
        if not t.chat or t.prompt is None:
            raise ValueError(f"conversation turn {k} is not a chat turn made from a text message")
        if t.system != turns[0].system:
            raise ValueError(f"conversation turn {k} has another system message than turn 0")
        expected = history_after(turns[k - 1]) if k else []
        if (t.history or []) != expected:
            raise ValueError(f"conversation turn {k}: its history is not the turns before it")


def scripts(messages: Sequence[str] | Sequence[Sequence[str]]) -> tuple[list[list[str]], bool]:
    """The user messages of each conversation, and whether a batch was given."""
    if isinstance(messages, str) or not len(messages):
        raise ValueError("messages: give the user messages as a list of strings (one per turn)")
    batch = isinstance(messages[0], (list, tuple))
    rows = [list(m) if isinstance(m, (list, tuple)) else [m] for m in messages] if batch else [list(messages)]  # fmt: skip
    for b, row in enumerate(rows):
        if not row or not all(isinstance(m, str) and m.strip() for m in row):
            raise ValueError(f"messages of conversation {b}: give one non-empty text per user turn")  # fmt: skip
    return rows, batch


def converse(
    lm: LM,
    messages: Sequence[str] | Sequence[Sequence[str]],
    *,
    key: Any = 0,
    sampler: Sampler | Sequence[Sampler] | None = None,
    max_new_tokens: int = 128,
    system: str | None = None,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Conversation | list[Conversation]:
    """Answer a script of user messages turn by turn: turn k answers `messages[k]` after the
    earlier messages and answers. A list of scripts is a batch (one `Conversation` each, every
    turn one engine batch; `key` as in `generate`, one key per conversation).

    `sampler`: one for every turn, or one per turn. `max_new_tokens`: the budget of each turn.
    """
    max_new_tokens = count(max_new_tokens)
    rows, batch = scripts(messages)
    keys = row_keys(key, len(rows))
    turns = max(len(r) for r in rows)
    samplers = _samplers(sampler, turns, each="turn")
    out: list[list[Trace]] = [[] for _ in rows]
    for k in range(turns):
        active = [b for b, r in enumerate(rows) if k < len(r)]
        prompts = [
            Prompt.of(
                lm,
                rows[b][k],
                chat=True,
                system=system,
                history=history_after(out[b][-1]) if k else None,
            )  # fmt: skip
            for b in active
        ]
        made = sample_rows(
            lm, prompts, jax.numpy.stack([turn_key(keys[b], k) for b in active]),
            [samplers[k]] * len(active), max_new_tokens, stop_tokens=stop_tokens, chunk=chunk,
            draft=draft, lookahead=lookahead,
        )  # fmt: skip
        for b, t in zip(active, made, strict=True):
            out[b].append(t)
    convs = [Conversation(keys[b], out[b]) for b in range(len(rows))]
    return convs if batch else convs[0]
