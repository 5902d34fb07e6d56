"""Interventions, each of which edits a counterfactual `Plan` (see `plan.py`), and `plan`,
which turns a list of them on a factual trace into one."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cfjax.causal import environment
from cfjax.causal.plan import Plan, auto_edit, check_params, check_position, force, text_edit
from cfjax.causal.trace import Trace
from cfjax.core import scm, steering
from cfjax.core.checks import check_tokens, integer, real, share, token_ids
from cfjax.runtime.lm import LM
from cfjax.runtime.request import prompt_tokens


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
        check_position(self.position, n)
        if self.position + count > n:
            raise ValueError(f"replacing {count} tokens at position {self.position} runs past the response ({n} tokens)")  # fmt: skip
        if self.tokens or count == 0:
            check_tokens(np.asarray(self.tokens), lm.config.vocab_size, "ReplaceTokens.tokens")
        p.edits.append((self.position, self.position + count, list(self.tokens)))


class _TextEdit(Intervention):
    """A response edit given as text: the span `old` (its `occurrence`-th match) becomes `new`,
    made on characters and mapped to the tokens that cover them."""

    occurrence: int

    def __post_init__(self):
        kind = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "occurrence":
                object.__setattr__(self, f.name, integer(value, f"{kind} occurrence", 1))
            elif not isinstance(value, str):
                raise TypeError(f"{kind} {f.name} must be text, got {value!r:.40}")
        if not self.span()[0]:
            raise ValueError(f"{kind}: the text to find is empty")

    def span(self) -> tuple[str, str]:
        """(old text, new text)."""
        raise NotImplementedError

    def edit(self, lm, trace, p):
        p.edits.append(text_edit(lm, trace, *self.span(), self.occurrence))


@dataclasses.dataclass(frozen=True)
class ReplaceText(_TextEdit):
    """Replace the `occurrence`-th (1-based) `old` string of the response text by `new`."""

    old: str
    new: str
    occurrence: int = 1

    def span(self):
        return self.old, self.new


@dataclasses.dataclass(frozen=True)
class InsertText(_TextEdit):
    """Insert `text` right after the `occurrence`-th `after` string of the response."""

    text: str
    after: str
    occurrence: int = 1

    def span(self):
        return self.after, self.after + self.text


@dataclasses.dataclass(frozen=True)
class DeleteText(_TextEdit):
    """Delete the `occurrence`-th `text` string of the response."""

    text: str
    occurrence: int = 1

    def span(self):
        return self.text, ""


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
            p.prompt = p.system = p.history = None
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
            new_prompt = prompt_tokens(lm, p.prompt, chat=p.chat, system=p.system, history=p.history)  # fmt: skip
        p.prompt_changed = p.prompt_changed or new_prompt != p.prompt_tokens
        p.prompt_tokens = new_prompt


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


_KEEP: Any = _Keep()


@dataclasses.dataclass(frozen=True)
class ChangeSampler(Intervention):
    """Change some sampler fields (the others are kept): temperature, top_k, top_p, mechanism.
    `ChangeSampler(Sampler(...))` replaces the whole sampler."""

    temperature: Any = _KEEP
    top_k: Any = _KEEP
    top_p: Any = _KEEP
    mechanism: Any = _KEEP

    def __post_init__(self):
        given = self.changes()
        if isinstance(self.temperature, scm.Sampler):
            if len(given) > 1:
                raise ValueError("ChangeSampler: give a whole Sampler or the fields to change, not both")  # fmt: skip
            given = self.temperature.to_dict()
        # Checked here, where a mistake is made, not when a run applies it; kept as the Sampler
        # normalises them (Python numbers, so the record is plain JSON).
        checked = scm.Sampler(**given)
        for name in given:
            object.__setattr__(self, name, getattr(checked, name))

    def changes(self) -> dict[str, Any]:
        """The fields given (the others are kept)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in given.items() if value is not _KEEP}

    def apply(self, sampler: scm.Sampler) -> scm.Sampler:
        """The changed sampler."""
        return dataclasses.replace(sampler, **self.changes())

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
        p.params = check_params(lm, self.params)
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
        share(self.top_p, "AutoIntervention top_p")
        integer(self.seed, "AutoIntervention seed", 0, 1 << 32)

    def edit(self, lm, trace, p):
        check_position(self.position, len(trace.tokens))
        p.edits.append(auto_edit(lm, trace, self.position, self.top_p, self.seed))
        return {**self.record(), "token": p.edits[-1][2][0]}


def auto_token(lm: LM, trace: Trace, iv: AutoIntervention) -> int:
    """The token `iv` puts at its position (ValueError when the top-p set has no other)."""
    return auto_edit(lm, trace, iv.position, iv.top_p, iv.seed)[2][0]


def plan(
    lm: LM, trace: Trace, interventions: Intervention | list[Intervention], resume_at=None
) -> Plan:
    """Turn interventions on `trace` into a `Plan` (validating every one)."""
    if trace.model_id and lm.model_id and trace.model_id != lm.model_id:
        raise ValueError(
            f"the trace was made by model {trace.model_id!r}, not by {lm.model_id!r}: "
            "load that model (or use ChangeModel to ask what another model would have done)"
        )
    environment.warn_if_elsewhere(trace.made_on, lm)
    # A hand-edited trace must not force (or score) ids the model does not have.
    check_tokens(np.asarray(trace.prompt_tokens), lm.config.vocab_size, "the trace's prompt")
    for name, tokens in (("response", trace.tokens), ("stop_tokens", trace.stop_tokens)):
        if len(tokens):
            check_tokens(np.asarray(tokens), lm.config.vocab_size, f"the trace's {name}")
    if trace.posterior is not None:
        for name in ("prompt_tokens", "tokens"):
            check_tokens(np.asarray(trace.posterior[name]), lm.config.vocab_size, f"the trace's posterior.{name}")  # fmt: skip
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    elif not isinstance(interventions, (list, tuple)):
        raise TypeError(f"not an intervention: {interventions!r} (give an Intervention or a list of them)")  # fmt: skip
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
        history=trace.history,
    )
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"not an intervention: {iv!r}")
        p.records.append(iv.edit(lm, trace, p) or iv.record())
    for iv in p.steers:  # on top of any other params the interventions chose
        p.params = steering.steer(p.params, iv.layer, iv.vector, iv.scale, iv.at)
    if p.steers:
        p.model_id = f"{p.model_id}+steer"
    force(trace, p)
    if resume_at is not None:
        resume_at = integer(resume_at, "resume_at", 0)
        if not 0 <= resume_at <= len(trace.tokens):
            raise ValueError(f"resume_at {resume_at} is outside the factual response [0, {len(trace.tokens)}]")  # fmt: skip
        p.aligned_to = int(resume_at)
    return p
