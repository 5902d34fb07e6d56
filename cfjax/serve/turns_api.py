"""The explorer's conversation and attribution endpoints (issue 34), on the helpers of
`app.create_app`: a chat whose turns' tokens are clickable, the counterfactual conversation of
an edit at one turn, and the effect of each word of a factual prompt.

Every request is bounded as the others are: user messages and edits by `max_prompt_tokens`,
each turn by `max_new_tokens`, the turns of a conversation and the words attributed by
`max_samples`.
"""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

import cfjax
from cfjax.causal import AtTurn, Conversation, EditPrompt
from cfjax.causal.attribution import attribute, prompt_units
from cfjax.runtime.lm import LM


class ConverseBody(BaseModel):
    messages: list[str] = Field(min_length=1)
    system: str | None = None
    seed: int = Field(0, ge=0, lt=2**32)
    temperature: float = Field(1.0, ge=0, le=10)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1)  # each turn's; default: 32 or the limit


class TurnEditBody(BaseModel):
    conversation_id: str
    turn: int = Field(ge=0)
    position: int | None = Field(None, ge=0)  # a token of that turn's answer ...
    token_id: int | None = None
    text: str | None = None
    prompt: str | None = None  # ... or that turn's user message


class AttributeBody(BaseModel):
    trace_id: str
    unit: str = Field("word", pattern="^(word|token)$")
    interventional: bool = True


def add_routes(app: FastAPI, lm: LM, h: SimpleNamespace) -> None:
    """Register `/api/converse`, `/api/conversation/counterfactual` and `/api/attribute`. `h`:
    the app's helpers (sessions, session_of, remember, view, check_length, check_samples,
    check_prompt, tokens_of, token_edit, max_new_tokens)."""

    def conversation_view(cid: str, conv: Conversation, session: dict, factual: Conversation | None = None) -> dict:  # fmt: skip
        turns = []
        for k, t in enumerate(conv.turns):
            base = factual.turns[k] if factual is not None else None
            turns.append(
                {"user": t.prompt, "assistant": h.view(h.sessions.add(session, t), t, base)}
            )
        return {"id": cid, "system": conv.system, "turns": turns,
                "interventions": conv.interventions}  # fmt: skip

    @app.post("/api/converse")
    def converse(body: ConverseBody, request: Request):
        h.check_samples(len(body.messages))  # turns are bounded like samples
        for m in body.messages:
            h.check_prompt(m, None)
        h.tokens_of(body.system, "system message")
        if body.max_new_tokens is None:
            body.max_new_tokens = min(32, h.max_new_tokens)
        h.check_length(body.max_new_tokens)
        sampler = cfjax.Sampler(body.temperature, top_k=body.top_k, top_p=body.top_p)
        session = h.session_of(request, 1 + len(body.messages))
        conv = cfjax.converse(lm, body.messages, key=body.seed, sampler=sampler,
                              max_new_tokens=body.max_new_tokens, system=body.system)  # fmt: skip
        view = conversation_view(h.sessions.add(session, conv), conv, session)
        # Kept, so that its counterfactuals show it without storing its turns again.
        session.setdefault("conversation_views", {})[view["id"]] = view
        return h.remember(session, {"conversation": view})

    @app.post("/api/conversation/counterfactual")
    def conversation_counterfactual(body: TurnEditBody, request: Request):
        conv = h.sessions.trace(request.state.sid, body.conversation_id, Conversation)
        if body.turn >= len(conv.turns):
            raise ValueError(f"turn {body.turn}: the conversation has turns 0 to {len(conv.turns) - 1}")  # fmt: skip
        answer = conv.turns[body.turn]
        ivs = []
        if body.position is not None:
            where = f"turn {body.turn}'s answer"
            ivs.append(h.token_edit(body.position, body.token_id, body.text, len(answer.tokens), where))  # fmt: skip
        if body.prompt is not None:
            h.check_prompt(body.prompt, None)
            ivs.append(EditPrompt(prompt=body.prompt))
        if not ivs:
            raise ValueError("no intervention: edit a token of an answer or a user message")
        session = h.session_of(request, 1 + 2 * len(conv.turns))  # the turns of both views
        cf = cfjax.counterfactual(lm, conv, AtTurn(body.turn, ivs))
        factual = session.get("conversation_views", {}).get(body.conversation_id)
        if factual is None:  # a counterfactual conversation edited in turn: viewed once
            factual = conversation_view(body.conversation_id, conv, session)
            session.setdefault("conversation_views", {})[body.conversation_id] = factual
        other = conversation_view(h.sessions.add(session, cf), cf, session, conv)
        return h.remember(session, {"conversation": factual, "counterfactual_conversation": other})

    @app.post("/api/attribute")
    def attribution(body: AttributeBody, request: Request):
        factual = h.sessions.trace(request.state.sid, body.trace_id)
        if factual.prompt is None:
            raise ValueError("attribution needs an answer to a text prompt")
        units = len(prompt_units(lm, factual.prompt, body.unit))
        h.check_samples(units)  # one counterfactual (and one interventional) row per unit
        session = h.session_of(request, units * (2 if body.interventional else 1))
        effects = attribute(lm, factual, unit=body.unit, interventional=body.interventional)
        rows = [{"unit": e.unit, "span": list(e.span), "text": e.text, "distance": e.distance,
                 "kept_share": e.kept_share, "interventional_distance": e.interventional_distance,
                 "trace": h.view(h.sessions.add(session, e.trace), e.trace, factual)}
                for e in effects]  # fmt: skip
        payload = {"factual": h.view(body.trace_id, factual),
                   "attribution": {"prompt": factual.prompt, "unit": body.unit, "rows": rows}}  # fmt: skip
        return h.remember(session, payload)
