"""The explorer's web API (FastAPI) over one loaded model.

A browser gets a session (a random cookie) with its first generation or abduction; its traces
live server-side in that session only, so a reload restores them (`GET /api/state`) and a second
user never sees the first's. A request without a session creates none, and sessions are evicted
only after `session_idle_s` without a request, so strangers cannot push out a working session.
Only requests whose Host is one the server was bound to are served (a DNS-rebinding page cannot
drive it), and every request's work is bounded by the server's limits: prompt tokens, new
tokens, samples.
Model calls run in FastAPI's thread pool (JAX releases the GIL while it computes, and the
model's cache stores are locked), so a long generation blocks no other request;
`/api/generate` streams the text as it is produced (NDJSON lines). Bad input is a 4xx with a
one-line `detail`, never a stack trace.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

import cfjax
from cfjax.causal import ChangeSampler, Conversation, EditPrompt, ReplaceText, ReplaceTokens, Trace
from cfjax.causal.plan import step_log_probs
from cfjax.present import (
    _pieces,
    changes,
    describe,
    html_diff,
    kept_after_edit,
    seed_of,
    settings_line,
)
from cfjax.runtime.lm import LM
from cfjax.serve import turns_api
from cfjax.serve.sessions import Sessions

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("cfjax.serve")
COOKIE = "cfjax_session"


class SamplerFields(BaseModel):
    temperature: float = Field(1.0, ge=0, le=10)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)

    def sampler(self) -> cfjax.Sampler:
        return cfjax.Sampler(self.temperature, top_k=self.top_k, top_p=self.top_p)


class GenerateBody(SamplerFields):
    prompt: str
    system: str | None = None
    seed: int = Field(0, ge=0, lt=2**32)
    max_new_tokens: int | None = Field(None, ge=1)  # default: 64, or the server's limit if lower
    stream: bool = False


class Edit(BaseModel):
    """What the counterfactual world changes: a token, the prompt, the system, the sampler."""

    position: int | None = Field(None, ge=0)
    token_id: int | None = None
    text: str | None = None  # replaces the token at `position` by this text
    prompt: str | None = None
    system: str | None = None
    temperature: float | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)


class CounterfactualBody(Edit):
    trace_id: str
    samples: int = Field(1, ge=0, le=16)  # interventional samples beside the counterfactual
    seed: int = Field(1, ge=0, lt=2**32)


class AbductBody(SamplerFields):
    prompt: str
    system: str | None = None
    observed: str
    seed: int = Field(0, ge=0, lt=2**32)
    samples: int = Field(16, ge=1)
    old: str  # the intervention on the observed text: replace `old` by `new`
    new: str


def create_app(
    lm: LM,
    *,
    max_new_tokens: int = 512,
    max_prompt_tokens: int = 1024,
    max_samples: int = 64,
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    sessions: Sessions | None = None,
) -> FastAPI:
    """The explorer app for `lm`. A request may ask for at most `max_new_tokens` new tokens, a
    prompt (or system message, or edit text) of at most `max_prompt_tokens` tokens and at most
    `max_samples` samples; only requests whose Host header names one of `allowed_hosts` are
    served (`"*"` allows any)."""
    if lm.tokenizer is None:
        raise ValueError("cfjax serve shows text: the model needs a tokenizer")
    app = FastAPI(title="cfjax explorer", docs_url=None, redoc_url=None)
    sessions = sessions or Sessions()
    allowed = {h.lower() for h in allowed_hosts}
    tok = lm.tokenizer

    @app.exception_handler(ValueError)
    async def bad_value(_request: Request, e: ValueError):
        return JSONResponse({"detail": str(e).splitlines()[0] if str(e) else "bad input"}, 400)

    @app.middleware("http")
    async def log_request(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        ms = (time.perf_counter() - start) * 1000
        log.info("%s %s %d %.0f ms", request.method, request.url.path, response.status_code, ms)
        return response

    @app.middleware("http")
    async def trusted_host(request: Request, call_next):
        # The Host header's name without its port ([::1]:8000 -> ::1): a page on another
        # name that resolves here (DNS rebinding) is refused before any work.
        host = request.headers.get("host", "")
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        if "*" not in allowed_hosts and name.lower() not in allowed:
            detail = f"host {host[:80]!r} is not served here (allowed: {', '.join(allowed_hosts)}; cfjax serve --allowed-hosts adds names)"  # fmt: skip
            return JSONResponse({"detail": detail}, 400)
        return await call_next(request)

    @app.middleware("http")
    async def session_cookie(request: Request, call_next):
        request.state.sid = request.cookies.get(COOKIE)
        response = await call_next(request)
        if request.state.sid and request.cookies.get(COOKIE) != request.state.sid:
            response.set_cookie(COOKIE, request.state.sid, httponly=True, samesite="strict")
        return response

    def session_of(request: Request, new_traces: int) -> dict:
        """The request's session (opened if it has none) with room for `new_traces`."""
        request.state.sid, session = sessions.open(request.state.sid)
        sessions.room(session, new_traces)
        return session

    def settings(trace: Trace) -> dict:
        """What the page's form shows for a trace: prompt, system, seed (when the key is a
        seed's, `key(seed)` = [0, seed]) and sampler, so a reload restores the form."""
        sampler = trace.sampler.to_dict()
        return {"prompt": trace.prompt, "system": trace.system, "seed": seed_of(trace),
                **{k: sampler.get(k) for k in ("temperature", "top_k", "top_p")}}  # fmt: skip

    def view(tid: str, trace: Trace, factual: Trace | None = None) -> dict:
        """A trace as the page shows it: tokens with their text and probability, and for a
        counterfactual which tokens changed and where it first diverges."""
        pieces = _pieces(tok, trace.tokens, trace.stop_tokens)
        tokens = [{"i": i, "id": int(t), "text": pieces[i], "p": float(np.exp(trace.logprobs[i]))}
                  for i, t in enumerate(trace.tokens[: len(pieces)])]  # fmt: skip
        out = {"id": tid, "text": trace.text, "tokens": tokens, "prompt": trace.prompt,
               "system": trace.system, "interventions": trace.interventions,
               "settings": settings(trace)}  # fmt: skip
        words = "; ".join(describe(r, tok) for r in trace.interventions)
        out["about"] = (words + " · " if words else "") + settings_line(trace)
        if factual is not None:
            _, changed, out["first_divergence"] = changes(factual, trace)
            for t in tokens:
                t["changed"] = changed[t["i"]]
            same, total = kept_after_edit(factual, trace)
            out["about"] += f" · {same}/{total} tokens after the edit equal the factual ones"
        return out

    def check_length(n: int, what: str = "max_new_tokens") -> None:
        if n > max_new_tokens:
            raise ValueError(f"{what} {n} is over this server's limit of {max_new_tokens} new tokens")  # fmt: skip

    def check_samples(n: int) -> None:
        if n > max_samples:
            raise ValueError(f"samples {n} is over this server's limit of {max_samples}")

    def tokens_of(text: str | None, what: str) -> list[int]:
        """`text`'s tokens, refused when over `max_prompt_tokens` (checked on characters first,
        so an oversized body costs no tokenisation)."""
        if text is None:
            return []
        if len(text) > 32 * max_prompt_tokens:
            raise ValueError(f"the {what} has over {32 * max_prompt_tokens} characters, this server's limit for {max_prompt_tokens} tokens")  # fmt: skip
        tokens = tok.encode(text)
        if len(tokens) > max_prompt_tokens:
            raise ValueError(f"the {what} has over {max_prompt_tokens} tokens, this server's limit")  # fmt: skip
        return tokens

    def check_prompt(prompt: str, system: str | None) -> None:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        tokens_of(prompt, "prompt")
        tokens_of(system, "system message")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    def static(name: str):
        file = STATIC / name
        if name not in {"app.js", "style.css"} or not file.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(file)

    @app.get("/api/info")
    def info():
        return {"model": lm.model_id, "max_new_tokens": max_new_tokens,
                "max_prompt_tokens": max_prompt_tokens, "max_samples": max_samples,
                "vocab_size": lm.config.vocab_size}  # fmt: skip

    @app.get("/api/state")
    def state(request: Request):
        session = sessions.find(request.state.sid)
        return {"view": session["view"] if session is not None else None}

    def remember(session: dict, payload: dict) -> dict:
        session["view"] = payload
        return payload

    def run_generate(body: GenerateBody, emit=None) -> Trace:
        return cfjax.generate(lm, body.prompt, key=body.seed, sampler=body.sampler(),
                                  max_new_tokens=body.max_new_tokens, system=body.system,
                                  stream=emit)  # fmt: skip

    @app.post("/api/generate")
    def generate(body: GenerateBody, request: Request):
        check_prompt(body.prompt, body.system)
        if body.max_new_tokens is None:
            body.max_new_tokens = min(64, max_new_tokens)
        check_length(body.max_new_tokens)
        body.sampler()  # validate before any work
        session = session_of(request, 1)
        if not body.stream:
            trace = run_generate(body)
            return remember(session, {"factual": view(sessions.add(session, trace), trace)})
        lines: queue.Queue = queue.Queue()

        def work():
            try:
                trace = run_generate(body, emit=lambda text: lines.put({"text": text}))
                tid = sessions.add(session, trace)
                lines.put(remember(session, {"factual": view(tid, trace)}))
            except Exception as e:  # noqa: BLE001 (reported to the page as a line)
                lines.put({"error": str(e).splitlines()[0] if str(e) else type(e).__name__})
            lines.put(None)

        threading.Thread(target=work, daemon=True).start()

        async def stream():
            while (line := await asyncio.to_thread(lines.get)) is not None:
                yield json.dumps(line) + "\n"

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @app.get("/api/candidates")
    def candidates(request: Request, trace_id: str, position: int, k: int = 10):
        trace = sessions.trace(request.state.sid, trace_id)
        if not 0 <= position < len(trace.tokens):
            raise ValueError(f"position {position} is outside the response (0 to {len(trace.tokens) - 1})")  # fmt: skip
        k = max(1, min(int(k), 50))
        probs = np.exp(np.asarray(step_log_probs(lm, trace, position)))
        top = np.argsort(-probs)[:k]
        return {"position": position, "factual": int(trace.tokens[position]),
                "candidates": [{"id": int(t), "text": tok.decode([int(t)]), "p": float(probs[t])} for t in top]}  # fmt: skip

    def token_edit(position: int, token_id: int | None, text: str | None, length: int, where: str) -> ReplaceTokens:  # fmt: skip
        """The edit of token `position` of a response of `length` tokens (`where`, for the
        error): to the token `token_id`, or to the tokens of `text`, checked."""
        if not 0 <= position < length:
            raise ValueError(f"position {position} is outside {where} (0 to {length - 1})")
        if token_id is not None:
            if not 0 <= token_id < lm.config.vocab_size:
                raise ValueError(f"unknown token id {token_id} (the vocabulary has {lm.config.vocab_size})")  # fmt: skip
            return ReplaceTokens(position, [token_id])
        if text:
            tokens = tokens_of(text, "edit text")
            check_length(position + len(tokens), "the edited response's forced length")
            return ReplaceTokens(position, tokens, count=1)
        raise ValueError("a token edit needs token_id or text")

    def interventions(body: Edit, trace: Trace) -> list:
        out = []
        if body.position is not None:
            out.append(token_edit(body.position, body.token_id, body.text, len(trace.tokens), "the response"))  # fmt: skip
        if body.prompt is not None or body.system is not None:
            if body.prompt is not None:
                check_prompt(body.prompt, None)
            tokens_of(body.system, "system message")
            out.append(EditPrompt(prompt=body.prompt, system=body.system))
        changes = {k: getattr(body, k) for k in ("temperature", "top_k", "top_p") if getattr(body, k) is not None}  # fmt: skip
        if changes:
            out.append(ChangeSampler(**changes))
        if not out:
            raise ValueError("no intervention: edit a token, the prompt, the system or the sampler")
        return out

    @app.post("/api/counterfactual")
    def counterfactual(body: CounterfactualBody, request: Request):
        factual = sessions.trace(request.state.sid, body.trace_id)
        check_samples(body.samples)
        ivs = interventions(body, factual)
        session = session_of(request, 1 + body.samples)
        cf = cfjax.counterfactual(lm, factual, ivs)
        keys = jax.random.split(jax.random.key(body.seed), max(body.samples, 1))[: body.samples]
        ints = cfjax.causal.interventionals(lm, [factual] * body.samples, [ivs] * body.samples, keys=keys) if body.samples else []  # fmt: skip
        payload = {"factual": view(body.trace_id, factual),
                   "counterfactual": view(sessions.add(session, cf), cf, factual),
                   "interventional": [view(sessions.add(session, t), t, factual) for t in ints]}  # fmt: skip
        return remember(session, payload)

    @app.post("/api/abduct")
    def abduct(body: AbductBody, request: Request):
        check_prompt(body.prompt, body.system)
        check_samples(body.samples)
        if not body.observed.strip():
            raise ValueError("the observed text is empty")
        edit = ReplaceText(body.old, body.new)  # an empty `old` is refused here, before any work
        if body.old not in body.observed:
            raise ValueError(f"{body.old!r} does not occur in the observed text")
        check_length(len(tokens_of(body.observed, "observed text")) + 1, "the observed text's length")  # fmt: skip
        tokens_of(body.new, "replacement text")
        session = session_of(request, 1 + body.samples)
        posts = cfjax.abduct(lm, body.prompt, body.observed, key=body.seed, sampler=body.sampler(),
                             num_samples=body.samples, system=body.system)  # fmt: skip
        cfs = cfjax.counterfactuals(lm, posts, [edit] * len(posts))
        counts = collections.Counter(t.text for t in cfs)
        first = {}
        for t in cfs:
            first.setdefault(t.text, t)
        return remember(session, {
            "observed": view(sessions.add(session, posts[0]), posts[0]),
            "abducted": [{"text": text, "count": n, "trace": view(sessions.add(session, first[text]), first[text], posts[0])}
                         for text, n in counts.most_common()],
            "samples": len(cfs), "old": body.old, "new": body.new,
        })  # fmt: skip

    turns_api.add_routes(app, lm, SimpleNamespace(
        sessions=sessions, session_of=session_of, remember=remember, view=view,
        check_length=check_length, check_samples=check_samples, check_prompt=check_prompt,
        tokens_of=tokens_of, token_edit=token_edit, max_new_tokens=max_new_tokens,
    ))  # fmt: skip

    @app.get("/api/traces/{trace_id}.json")
    def export_json(trace_id: str, request: Request):
        trace = sessions.trace(request.state.sid, trace_id, (Trace, Conversation))
        return Response(trace.to_json(), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{trace_id}.json"'})  # fmt: skip

    @app.get("/api/diff.html", response_class=HTMLResponse)
    def export_diff(request: Request, factual: str, other: list[str] | None = Query(None)):  # noqa: B008
        sid = request.state.sid
        base = sessions.trace(sid, factual)
        others = {f"trace {o}": sessions.trace(sid, o) for o in (other or [])[:16]}
        if not others:
            raise ValueError("give at least one other trace to compare (other=ID)")
        return HTMLResponse(html_diff(tok, base, others))

    return app
