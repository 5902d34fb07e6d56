"""The explorer's server-side sessions: each browser's traces, bounded without letting strangers
evict a session that is in use."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from fastapi import HTTPException

from cfjax.causal import Conversation, Trace


class Sessions:
    """Server-side traces per browser session.

    At most `max_sessions` sessions of at most `max_traces` traces each. A session is evicted
    only when it has had no request for `idle_s` seconds and room is needed; when every session
    is active a new one is refused (503), and a full session refuses new traces (409): nothing a
    session holds is dropped while it is in use.
    """

    def __init__(self, max_sessions: int = 200, max_traces: int = 2000, idle_s: float = 3600.0,
                 clock=time.monotonic):  # fmt: skip
        self.data: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.max_sessions, self.max_traces, self.idle_s = max_sessions, max_traces, idle_s
        self.clock = clock

    def find(self, sid: str | None) -> dict | None:
        """The session `sid` (now marked as seen), or None."""
        with self.lock:
            session = self.data.get(sid) if sid else None
            if session is not None:
                session["seen"] = self.clock()
            return session

    def open(self, sid: str | None) -> tuple[str, dict]:
        """(sid, session): the session `sid`, or a new one."""
        session = self.find(sid)
        if session is not None:
            return sid, session
        with self.lock:
            now = self.clock()
            for old in [k for k, v in self.data.items() if now - v["seen"] > self.idle_s]:
                del self.data[old]
            if len(self.data) >= self.max_sessions:
                raise HTTPException(503, f"the explorer has {self.max_sessions} active sessions, its limit; try again later")  # fmt: skip
            sid = secrets.token_urlsafe(16)
            self.data[sid] = {"traces": {}, "view": None, "seen": now}
            return sid, self.data[sid]

    def room(self, session: dict, n: int) -> None:
        """Refuse, before the work, a request that would store more than `max_traces`."""
        if len(session["traces"]) + n > self.max_traces:
            raise HTTPException(409, f"this session holds {len(session['traces'])} traces and may hold {self.max_traces}: start a new session (clear the explorer's cookie)")  # fmt: skip

    def add(self, session: dict, trace: Trace | Conversation) -> str:
        tid = secrets.token_hex(6)
        with self.lock:
            session["traces"][tid] = trace
        return tid

    def trace(self, sid: str | None, tid: str, kind: type | tuple = Trace) -> Any:
        """The session's trace (or conversation) `tid`, of the `kind` the request needs."""
        session = self.find(sid)
        trace = session["traces"].get(tid) if session is not None else None
        if trace is None:
            raise HTTPException(404, f"no trace {tid!r} in this session")
        if not isinstance(trace, kind):
            what = "a conversation" if isinstance(trace, Conversation) else "a single answer"
            raise HTTPException(400, f"{tid!r} is {what}, which this request does not take")
        return trace
