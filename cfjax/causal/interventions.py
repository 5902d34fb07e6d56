"""Interventions, and how a list of them turns a factual trace into a counterfactual plan.

A plan says what the counterfactual world looks like: its prompt, sampler and params, and the
response prefix that is forced (factual tokens kept before the edit, then the edited span).
Sampling resumes after the forced prefix (counterfactual step `m`) with the factual noise of
step `r` (DESIGN.md §2), where `r` is by default the factual step right after the edited span.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.causal.trace import Trace
from cfjax.core import quant, scm, steering
from cfjax.core.checks import as_key, check_tokens, integer, real, token_ids
from cfjax.core.kernel import bucket_length
from cfjax.runtime.lm import LM, forward
from cfjax.runtime.request import padded, prompt_tokens


class Intervention:
    """Base class: an intervention edits a counterfactual `Plan` (`edit`) and describes itself
    for the counterfactual's record (`record`)."""

    def edit(self, lm: LM, trace: Trace, p: Plan) -> dict | None:
        """Change `p` as this intervention says (validating it against `lm` and `trace`); a
        returned dict replaces `record()` in the counterfactual's record."""
        raise NotImplementedError

    def record(self) -> dict:
        """JSON-ready description."""
        d = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not _KEEP:
                # Lists, not tuples: the record must equal itself after a JSON round trip.
                d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


@dataclasses.dataclass(frozen=True)
class ReplaceTokens(Intervention):
    """Replace `count` response tokens from `position` on by `tokens`.

    `count` defaults to `len(tokens)` (a same-length replacement); other values insert
    (`count=0`) or delete (`tokens=()`) tokens.
    """

    position: int
    tokens: tuple[int, ...]
    count: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "position", integer(self.position, "ReplaceTokens position"))
        object.__setattr__(self, "tokens", token_ids(self.tokens, "ReplaceTokens tokens"))
        if self.count is not None:
            object.__setattr__(self, "count", integer(self.count, "ReplaceTokens count"))

    def edit(self, lm, trace, p):
        n, count = len(trace.tokens), len(self.tokens) if self.count is None else self.count
        _check_position(self.position, n)
        if self.position + count > n:
            raise ValueError(f"replacing {count} tokens at position {self.position} runs past the response ({n} tokens)")  # fmt: skip
        if self.tokens or count == 0:
            check_tokens(np.asarray(self.tokens), lm.config.vocab_size, "ReplaceTokens.tokens")
        p.edits.append((self.position, self.position + count, list(self.tokens)))


@dataclasses.dataclass(frozen=True)
class ReplaceText(Intervention):
    """Replace the `occurrence`-th (1-based) `old` string of the response text by `new`."""

    old: str
    new: str
    occurrence: int = 1

    def edit(self, lm, trace, p):
        p.edits.append(_text_edit(lm, trace, self.old, self.new, self.occurrence))


@dataclasses.dataclass(frozen=True)
class InsertText(Intervention):
    """Insert `text` right after the `occurrence`-th `after` string of the response."""

    text: str
    after: str
    occurrence: int = 1

    def edit(self, lm, trace, p):
        p.edits.append(_text_edit(lm, trace, self.after, self.after + self.text, self.occurrence))


@dataclasses.dataclass(frozen=True)
class DeleteText(Intervention):
    """Delete the `occurrence`-th `text` string of the response."""

    text: str
    occurrence: int = 1

    def edit(self, lm, trace, p):
        p.edits.append(_text_edit(lm, trace, self.text, "", self.occurrence))


@dataclasses.dataclass(frozen=True)
class EditPrompt(Intervention):
    """Change the user prompt and/or system message (or give new prompt token ids)."""

    prompt: str | None = None
    system: str | None = None
    tokens: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.tokens is not None:
            if self.prompt is not None or self.system is not None:
                raise ValueError("EditPrompt: give the new prompt as text (prompt=, system=) or as token ids (tokens=), not both")  # fmt: skip
            object.__setattr__(self, "tokens", token_ids(self.tokens, "EditPrompt tokens"))
        for name in ("prompt", "system"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"EditPrompt {name} must be text, got {getattr(self, name)!r:.40}")

    def edit(self, lm, trace, p):
        if self.tokens is not None:
            new_prompt = [int(t) for t in self.tokens]
            p.prompt = p.system = None
            p.chat = False
        elif p.prompt is None:
            raise ValueError("EditPrompt with text needs a trace made from a text prompt")
        elif self.system is not None and not p.chat:
            raise ValueError(
                "EditPrompt(system=...): the trace's prompt has no chat template (made with "
                "chat=False / --no-chat), so a system message would change nothing"
            )
        else:
            p.prompt = self.prompt if self.prompt is not None else p.prompt
            p.system = self.system if self.system is not None else p.system
            new_prompt = prompt_tokens(lm, p.prompt, chat=p.chat, system=p.system)
        p.prompt_changed = p.prompt_changed or new_prompt != p.prompt_tokens
        p.prompt_tokens = new_prompt


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


_KEEP: Any = _Keep()


@dataclasses.dataclass(frozen=True)
class ChangeSampler(Intervention):
    """Change some sampler fields (the others are kept): temperature, top_k, top_p, mechanism."""

    temperature: Any = _KEEP
    top_k: Any = _KEEP
    top_p: Any = _KEEP
    mechanism: Any = _KEEP

    def apply(self, sampler: scm.Sampler) -> scm.Sampler:
        """The changed sampler."""
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not _KEEP
        }
        return dataclasses.replace(sampler, **changes)

    def edit(self, lm, trace, p):
        p.sampler = self.apply(p.sampler)


@dataclasses.dataclass(frozen=True, eq=False)
class ChangeModel(Intervention):
    """Run the counterfactual with other params of the same shapes (fine-tune, weight edit)."""

    params: Any
    name: str = "edited"

    def record(self) -> dict:
        """Params are not serialised; the name identifies the edit."""
        return {"type": "ChangeModel", "name": self.name}

    def edit(self, lm, trace, p):
        p.params = _check_params(lm, self.params)
        p.model_id = f"{trace.model_id}+{self.name}"


@dataclasses.dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add `scale * vector` to the residual stream after block `layer`: at the response steps
    (`at="response"`) or at every position, the prompt's too (`at="all"`). Scale 0 is exactly
    the unsteered model; several steerings add up."""

    layer: int
    vector: Any
    scale: float = 1.0
    at: str = "response"

    def __post_init__(self):
        integer(self.layer, "Steer layer")
        real(self.scale, "Steer scale")
        if self.at not in ("response", "all"):
            raise ValueError(f"Steer at must be 'response' or 'all', got {self.at!r}")

    def record(self) -> dict:
        vector = np.asarray(self.vector, np.float32)
        return {"type": "Steer", "layer": self.layer, "scale": float(self.scale), "at": self.at,
                "vector": [float(x) for x in vector.ravel()]}  # fmt: skip

    def edit(self, lm, trace, p):
        p.steers.append(self)  # applied after the others, on whichever params they chose


@dataclasses.dataclass(frozen=True)
class AutoIntervention(Intervention):
    """The paper's automatic intervention: at `position`, another token from the top-p set."""

    position: int
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self):
        integer(self.position, "AutoIntervention position")
        if not 0 < real(self.top_p, "AutoIntervention top_p") <= 1:
            raise ValueError(f"AutoIntervention top_p must be in (0, 1], got {self.top_p}")
        integer(self.seed, "AutoIntervention seed", 0, 1 << 32)

    def edit(self, lm, trace, p):
        _check_position(self.position, len(trace.tokens))
        p.edits.append(_auto(lm, trace, self))
        return {**self.record(), "token": p.edits[-1][2][0]}


@dataclasses.dataclass
class Plan:
    """A counterfactual world: prompt, sampler, params and the forced response prefix."""

    prompt_tokens: list[int]
    sampler: scm.Sampler
    params: Any
    forced: list[int]  # response tokens forced at steps [0, m)
    edit_start: int  # s: first response step whose token may differ from the factual one
    aligned_to: int  # r: factual step whose noise the first sampled step uses
    prompt_changed: bool = False
    model_id: str = ""
    # The text the prompt tokens were made from (None for token ids), kept true to them.
    prompt: str | None = None
    system: str | None = None
    chat: bool = False
    records: list[dict] = dataclasses.field(default_factory=list)
    # For each forced step, the factual step its kept token was copied from (None: edited token).
    forced_from: list[int | None] = dataclasses.field(default_factory=list)
    # Collected while the interventions edit the plan: response edits (factual start, factual
    # end, new tokens) and steerings.
    edits: list[tuple[int, int, list[int]]] = dataclasses.field(default_factory=list)
    steers: list = dataclasses.field(default_factory=list)

    @property
    def resume_at(self) -> int:
        """m: the counterfactual step where sampling resumes."""
        return len(self.forced)


def _response_text(lm: LM, trace: Trace) -> tuple[str, list[int]]:
    if lm.tokenizer is None:
        raise ValueError("a text edit needs a tokenizer: this model has none")
    body = trace.tokens[:-1] if trace.stopped else trace.tokens
    return lm.tokenizer.decode(body), body


def _find(text: str, needle: str, occurrence: int) -> tuple[int, int]:
    if not needle:
        raise ValueError("the text to find is empty")
    if occurrence < 1:
        raise ValueError(f"occurrence must be >= 1, got {occurrence}")
    at = -1
    for _ in range(occurrence):
        at = text.find(needle, at + 1)
        if at < 0:
            found = text.count(needle)
            raise ValueError(
                f"text {needle!r} occurs {found} time(s) in the response, not {occurrence}"
            )
    return at, at + len(needle)


def _text_edit(lm: LM, trace: Trace, old: str, new: str, occurrence: int):
    """(factual start, factual end, new tokens) for replacing a character span's tokens."""
    from cfjax.tokenizer import token_char_spans

    tok = lm.tokenizer
    text, body = _response_text(lm, trace)
    a, b = _find(text, old, occurrence)
    spans = token_char_spans(tok, body)
    ts = next(i for i, (_, e) in enumerate(spans) if e > a)
    te = next((i for i, (s, _) in enumerate(spans) if s >= b), len(body))
    c1 = spans[te - 1][1]
    if text[spans[ts][0] : c1] == text[spans[ts][0] : a] + new + text[b:c1]:
        # Unchanged text keeps its tokens even if the model produced a non-canonical tokenization.
        return ts, te, list(body[ts:te])
    # `encode` tokenizes text as a document start: sentencepiece-style tokenizers prepend a
    # dummy-prefix space, which mid-response would be a real extra space. Keep the candidate whose
    # decoded response reads exactly as the edited text; if none fits, widen the span to the left
    # (at a word start, or at the response start where decode drops that space, one fits).
    for start in range(ts, -1, -1):
        c0 = spans[start][0]
        edited = text[c0:a] + new + text[b:c1]
        candidates = [tok.encode(edited)]
        if edited.startswith(" "):
            candidates.append(tok.encode(edited[1:]))
        for cand in candidates:
            if tok.decode(body[:start] + list(cand)) == text[:c0] + edited:
                return start, te, list(cand)
    raise ValueError(
        f"cannot re-tokenize the edited text {text[spans[ts][0] : a] + new + text[b:c1]!r} so "
        "that the response decodes to it"
    )


def step_log_probs(lm: LM, trace: Trace, position: int, top_p: float | None = None) -> jax.Array:
    """Log-probabilities `[V]` of response step `position` given the factual prefix, at the
    trace's temperature (a greedy trace's point mass replaced by the model's own τ = 1) and,
    if given, within the top-p set."""
    # Right-padded to a power of two (a causal forward: padding after a position changes
    # nothing before it), so that many positions share a few compilations.
    seq = trace.prompt_tokens + trace.tokens[:position]
    tokens = padded([seq], min(bucket_length(len(seq)), lm.config.max_seq_len))[0]
    logits = forward(lm, tokens)[0, len(seq) - 1]
    sampler = scm.Sampler(temperature=trace.sampler.temperature or 1.0, top_p=top_p)
    return scm.log_probs(logits, sampler)


def _auto(lm: LM, trace: Trace, iv: AutoIntervention) -> tuple[int, int, list[int]]:
    """Draw a different token from the top-p set of the factual distribution at `position`."""
    pos = iv.position
    logp = step_log_probs(lm, trace, pos, iv.top_p)
    logp = logp.at[trace.tokens[pos]].set(-jnp.inf)
    if not bool(jnp.isfinite(logp).any()):
        raise ValueError(
            f"AutoIntervention at position {pos}: the top-p {iv.top_p} set holds only the "
            f"factual token {trace.tokens[pos]}; no other token to choose"
        )
    key = jax.random.fold_in(as_key(iv.seed), pos)
    token = int(jax.random.categorical(key, logp))  # the intervention's own randomness
    return pos, pos + 1, [token]


def auto_token(lm: LM, trace: Trace, iv: AutoIntervention) -> int:
    """The token `iv` puts at its position (ValueError when the top-p set has no other)."""
    return _auto(lm, trace, iv)[2][0]


def _check_params(lm: LM, params: Any) -> Any:
    if isinstance(params, LM):
        if params.config != lm.config:
            raise ValueError("ChangeModel: the other model has a different config")
        ours, theirs = lm.tokenizer, params.tokenizer
        if (
            theirs is not None
            and ours is not None
            and (getattr(theirs, "spec", None) != getattr(ours, "spec", None))
        ):
            raise ValueError(
                "ChangeModel: the other model has a different tokenizer "
                f"({getattr(theirs, 'spec', '?')} vs {getattr(ours, 'spec', '?')}); a "
                "counterfactual must keep the token space"
            )
        params = params.params
    # Compared as the network sees them: a quantized or steered variant is the same model.
    effective = lambda p: jax.eval_shape(lambda q: quant.dequantize(steering.split(q)[0]), p)  # noqa: E731
    ours, theirs = effective(lm.params), effective(params)
    if jax.tree_util.tree_structure(theirs) != jax.tree_util.tree_structure(ours):
        raise ValueError("ChangeModel: params do not have the structure of the model's params")
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(ours)[0],
        jax.tree_util.tree_leaves(theirs),
        strict=True,
    ):
        if a.shape != b.shape:
            raise ValueError(
                f"ChangeModel: param {jax.tree_util.keystr(path)} has shape {b.shape}, "
                f"expected {a.shape}"
            )
    return params


def _check_position(position: int, n: int) -> None:
    if not 0 <= position < n:
        raise ValueError(f"position {position} is outside the response: positions are 0 to {n - 1}")


def _force(trace: Trace, p: Plan) -> None:
    """The forced prefix of the plan's response edits: everything from the first edit to the
    last (kept tokens between edits too), where sampling resumes, and the factual step each
    forced token comes from."""
    if not p.edits:
        return
    # By span, so the order the edits are given in never matters: an insertion at a token's
    # position goes before that token's replacement; two insertions at one position have no
    # order, and overlapping spans no meaning.
    edits = sorted(p.edits, key=lambda e: (e[0], e[1]))
    for (a, end, _), (start, b, _) in zip(edits, edits[1:], strict=False):
        if start < end or a == end == start == b:
            raise ValueError(f"two response edits overlap (tokens {a}..{end} and {start}..{b}); give them as one edit")  # fmt: skip
    forced = list(trace.tokens[: edits[0][0]])
    sources: list[int | None] = list(range(edits[0][0]))
    for i, (start, end, new) in enumerate(edits):
        forced += new
        # A same-length edit that leaves a token as it was keeps that token's noise.
        same = len(new) == end - start
        sources += [start + o if same and t == trace.tokens[start + o] else None for o, t in enumerate(new)]  # fmt: skip
        nxt = edits[i + 1][0] if i + 1 < len(edits) else end
        forced += trace.tokens[end:nxt]
        sources += list(range(end, nxt))
    p.forced, p.edit_start, p.aligned_to = forced, edits[0][0], edits[-1][1]
    p.forced_from = sources


def plan(
    lm: LM, trace: Trace, interventions: Intervention | list[Intervention], resume_at=None
) -> Plan:
    """Turn interventions on `trace` into a `Plan` (validating every one)."""
    if trace.model_id and lm.model_id and trace.model_id != lm.model_id:
        raise ValueError(
            f"the trace was made by model {trace.model_id!r}, not by {lm.model_id!r}: "
            "load that model (or use ChangeModel to ask what another model would have done)"
        )
    # A hand-edited trace must not force (or score) ids the model does not have.
    check_tokens(np.asarray(trace.prompt_tokens), lm.config.vocab_size, "the trace's prompt")
    if trace.tokens:
        check_tokens(np.asarray(trace.tokens), lm.config.vocab_size, "the trace's response")
    if trace.posterior is not None:
        for name in ("prompt_tokens", "tokens"):
            check_tokens(np.asarray(trace.posterior[name]), lm.config.vocab_size, f"the trace's posterior.{name}")  # fmt: skip
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    if not interventions:
        raise ValueError("no intervention given: pass one intervention or a non-empty list")
    p = Plan(
        prompt_tokens=list(trace.prompt_tokens),
        sampler=trace.sampler,
        params=lm.params,
        forced=[],
        edit_start=0,
        aligned_to=0,
        model_id=trace.model_id,
        prompt=trace.prompt,
        system=trace.system,
        chat=trace.chat,
    )
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"not an intervention: {iv!r}")
        p.records.append(iv.edit(lm, trace, p) or iv.record())
    for iv in p.steers:  # on top of any other params the interventions chose
        p.params = steering.steer(p.params, iv.layer, iv.vector, iv.scale, iv.at)
    if p.steers:
        p.model_id = f"{p.model_id}+steer"
    _force(trace, p)
    if resume_at is not None:
        resume_at = integer(resume_at, "resume_at", 0)
        if not 0 <= resume_at <= len(trace.tokens):
            raise ValueError(f"resume_at {resume_at} is outside the factual response [0, {len(trace.tokens)}]")  # fmt: skip
        p.aligned_to = int(resume_at)
    return p
