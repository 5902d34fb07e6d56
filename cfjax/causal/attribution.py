"""Counterfactual attribution: which words of the prompt (or tokens of the response) made the
answer what it is.

For every unit, the counterfactual answer with that unit removed or replaced, under the
factual noise, all units as one engine batch (chunks of `batch_size` rows) whose prefill fills
only what follows the prefix each edited prompt shares with the factual one (`runtime.prefix`);
its distance from the factual answer is the unit's effect and not luck's. Beside it, the same
edit with fresh noise (`interventional_distance`) shows how far answers move by noise alone.

Prompt units are character spans of the user message: words (`\\w+` runs, and runs of
punctuation) or the message's own tokens; an edit re-renders the prompt through its chat
template (`EditPrompt`). Response units are token positions: the paper's interventions at
every position at once (`ReplaceTokens`, `AutoIntervention`), measured on the tokens after it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from cfjax.causal.interventions import AutoIntervention, EditPrompt, Intervention, ReplaceTokens
from cfjax.causal.plan import other_token
from cfjax.causal.replay import counterfactuals, interventionals
from cfjax.causal.trace import Trace
from cfjax.core import scm
from cfjax.core.checks import as_key, count, integer, share
from cfjax.core.kernel import bucket_length
from cfjax.runtime.lm import LM, forward
from cfjax.runtime.request import padded

WORD = re.compile(r"\w+|[^\w\s]+")


@dataclasses.dataclass(frozen=True)
class Auto:
    """Replace each unit by a different token drawn from the model's top-p set at the unit's
    (first) token, with the attribution's own randomness (`seed`): the paper's automatic
    intervention."""

    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self):
        share(self.top_p, "Auto top_p")
        integer(self.seed, "Auto seed", 0, 1 << 32)


@dataclasses.dataclass
class UnitEffect:
    """The effect of one unit: its counterfactual (and interventional) answer and distances."""

    unit: int  # index among the units
    span: tuple[int, int]  # characters of the user message, or the response token position
    text: str  # the unit as written
    replacement: str  # what stood there instead ("" = removed)
    distance: float  # normalised token Levenshtein distance, factual vs counterfactual answer
    kept_share: float  # share of the factual answer's tokens kept (aligned) in the counterfactual
    interventional_distance: float | None  # the same edit with fresh noise (None: not run)
    contains: bool | None  # whether `contains` appears in the counterfactual answer
    trace: Trace  # the counterfactual
    interventional: Trace | None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["span"] = list(self.span)
        d["trace"] = self.trace.to_dict()
        d["interventional"] = None if self.interventional is None else self.interventional.to_dict()
        return d


def distances(factual: Sequence[int], other: Sequence[int]) -> tuple[float, float]:
    """(Levenshtein distance over tokens / the longer length, share of `factual`'s tokens that an
    optimal alignment keeps); (0, 1) for two empty answers."""
    from rapidfuzz.distance import Levenshtein

    factual, other = list(factual), list(other)
    distance = Levenshtein.normalized_distance(factual, other)
    if not factual:
        return distance, 1.0 if not other else 0.0
    kept = sum(o.src_end - o.src_start for o in Levenshtein.opcodes(factual, other) if o.tag == "equal")  # fmt: skip
    return distance, kept / len(factual)


def _body(t: Trace, start: int = 0) -> list[int]:
    """The answer's tokens from `start`, without a final stop token."""
    return t.tokens[start : len(t.tokens) - 1 if t.stopped else len(t.tokens)]


def prompt_units(lm: LM, message: str, unit: str) -> list[tuple[int, int]]:
    """Character spans of the message's words (`unit="word"`) or of its tokens (`"token"`)."""
    if unit == "word":
        return [m.span() for m in WORD.finditer(message)]
    from cfjax.tokenizer import token_char_spans

    # A token's span without its leading whitespace (a word-initial piece's space), so that a
    # replacement keeps the words apart; whitespace-only tokens are no unit.
    spans = token_char_spans(lm.tokenizer, lm.tokenizer.encode(message))
    lead = lambda a, b: len(message[a:b]) - len(message[a:b].lstrip())  # noqa: E731
    return [(a + lead(a, b), b) for a, b in spans if message[a:b].strip()]


def _removed(message: str, a: int, b: int) -> str:
    """The message without [a, b) and one whitespace beside it (so no double space is left)."""
    if a > 0 and message[a - 1].isspace():
        a -= 1
    elif b < len(message) and message[b].isspace():
        b += 1
    return message[:a] + message[b:]


def _auto_prompt_edits(lm: LM, trace: Trace, spans, auto: Auto) -> list[tuple[str, str] | None]:
    """For each span: (new message, the drawn token's text), the span's tokens replaced by a
    different token from the top-p set the model predicts at its first token; None when that
    set holds only the factual token."""
    from cfjax.tokenizer import token_char_spans

    tok, message = lm.tokenizer, trace.prompt
    ids = list(tok.encode(message))
    if tok.decode(ids) != message:
        raise ValueError("automatic replacement needs a user message that decodes back to itself from its tokens")  # fmt: skip
    seq = trace.prompt_tokens
    at = next((i for i in range(len(seq) - len(ids), -1, -1) if seq[i : i + len(ids)] == ids), None)
    if at is None or at == 0:
        raise ValueError("automatic replacement: the user message's tokens are not in the prompt as encoded alone")  # fmt: skip
    tokens, _ = padded([seq], min(bucket_length(len(seq)), lm.config.max_seq_len))
    logits = forward(lm, tokens)[0]
    token_spans = token_char_spans(tok, ids)
    out: list[tuple[str, str] | None] = []
    for u, (a, b) in enumerate(spans):
        covered = [i for i, (s, e) in enumerate(token_spans) if s < b and e > a]
        first, last = covered[0], covered[-1] + 1
        logp = scm.log_probs(logits[at + first - 1], scm.Sampler(1.0, top_p=auto.top_p))
        new = other_token(logp, ids[first], auto.seed, u)
        out.append(None if new is None else (tok.decode(ids[:first] + [new] + ids[last:]), tok.decode([new])))  # fmt: skip
    return out


def _prompt_rows(lm, trace, unit, replace) -> list[tuple[int, tuple[int, int], str, str, Intervention]]:  # fmt: skip
    if trace.prompt is None:
        raise ValueError("attribution over the prompt needs a trace made from a text prompt")
    if unit not in ("word", "token"):
        raise ValueError(f"unit must be 'word' or 'token', got {unit!r}")
    message = trace.prompt
    spans = prompt_units(lm, message, unit)
    autos = _auto_prompt_edits(lm, trace, spans, replace) if isinstance(replace, Auto) else None
    rows = []
    for u, (a, b) in enumerate(spans):
        text = message[a:b]
        if autos is not None:
            if autos[u] is None:
                continue
            new, replacement = autos[u]
        elif isinstance(replace, Mapping):
            if text not in replace:
                continue
            replacement = replace[text]
            new = message[:a] + replacement + message[b:]
        else:
            replacement = replace or ""
            new = (
                message[:a] + replacement + message[b:] if replacement else _removed(message, a, b)
            )
        if not new.strip():
            continue  # a one-word prompt: no prompt is left to answer
        rows.append((u, (a, b), text, replacement, EditPrompt(prompt=new)))
    return rows


def _response_rows(lm, trace, unit, replace) -> list[tuple[int, tuple[int, int], str, str, Intervention]]:  # fmt: skip
    if unit != "token":
        raise ValueError("attribution over the response is per token: give unit='token'")
    from cfjax.causal.interventions import auto_token

    tok = lm.tokenizer
    say = (lambda ids: tok.decode(list(ids))) if tok is not None else str  # noqa: E731
    rows = []
    for i in range(len(_body(trace))):
        if isinstance(replace, Auto):
            iv: Intervention = AutoIntervention(i, replace.top_p, replace.seed)
            try:
                replacement = say([auto_token(lm, trace, iv)])
            except ValueError:  # the top-p set holds only the factual token
                continue
        elif isinstance(replace, Mapping):
            raise ValueError("attribution over the response takes one replacement text, Auto() or None")  # fmt: skip
        else:
            ids = list(tok.encode(replace)) if replace else []
            if replace and not ids:
                raise ValueError(f"replacement {replace!r} encodes to no tokens")
            iv, replacement = ReplaceTokens(i, ids, count=1), replace or ""
        rows.append((i, (i, i + 1), say([trace.tokens[i]]), replacement, iv))
    return rows


def attribute(
    lm: LM,
    trace: Trace,
    *,
    unit: str = "word",
    over: str = "prompt",
    replace: str | Mapping[str, str] | Auto | None = None,
    contains: str | None = None,
    interventional: bool = True,
    key: Any = 1,
    batch_size: int = 64,
    chunk: int | None = None,
) -> list[UnitEffect]:
    """The effect of each unit of the prompt (`over="prompt"`: words or tokens of the user
    message) or of the response (`over="response"`: each token position, on the tokens after
    it): one `UnitEffect` per unit, in order.

    `replace`: None removes the unit; a text replaces every unit by it; a mapping replaces the
    units it names (the others are skipped); `Auto()` draws another token from the top-p set.
    `contains`: report whether this text is still in each answer. `interventional`: also run
    each edit with fresh noise from `key` (unit u: `split(key, n)[u]`), the spread that noise
    alone gives. Rows run `batch_size` at a time (one engine batch each).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"attribute takes one answer's Trace, not a {type(trace).__name__}")
    if over not in ("prompt", "response"):
        raise ValueError(f"over must be 'prompt' or 'response', got {over!r}")
    if contains is not None and not isinstance(contains, str):
        raise TypeError(f"contains must be a text, got {contains!r:.60}")
    texts = replace.items() if isinstance(replace, Mapping) else [("", "")]
    if not (replace is None or isinstance(replace, (str, Auto, Mapping))) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in texts
    ):
        raise TypeError(f"replace must be None, a text, a mapping of texts or Auto(), got {replace!r:.80}")  # fmt: skip
    if lm.tokenizer is None:
        raise ValueError("attribution needs a tokenizer: this model has none")
    batch_size = count(batch_size, "batch_size")
    rows = (_prompt_rows if over == "prompt" else _response_rows)(lm, trace, unit, replace)
    if not rows:
        raise ValueError(f"no unit of the {over} to attribute (check unit= and replace=)")
    ivs = [r[4] for r in rows]
    keys = jax.random.split(as_key(key), len(rows))
    cfs, ivals = [], []
    for s in range(0, len(rows), batch_size):
        part = ivs[s : s + batch_size]
        cfs += counterfactuals(lm, trace, part, chunk=chunk)
        if interventional:
            ivals += interventionals(lm, [trace] * len(part), part, keys=keys[s : s + batch_size], chunk=chunk)  # fmt: skip
    # Over the response, the factual tokens after the unit against those after the edit.
    factual = lambda span: _body(trace, span[1] if over == "response" else 0)  # noqa: E731
    answer = lambda t: _body(t, t.alignment["resume_at"] if over == "response" else 0)  # noqa: E731
    out = []
    for i, ((u, span, text, replacement, _), cf) in enumerate(zip(rows, cfs, strict=True)):
        d, kept = distances(factual(span), answer(cf))
        ival = ivals[i] if interventional else None
        di = None if ival is None else distances(factual(span), answer(ival))[0]
        out.append(UnitEffect(u, span, text, replacement, d, kept, di,
                              None if contains is None else contains in cf.text, cf, ival))  # fmt: skip
    return out
