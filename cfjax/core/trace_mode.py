"""The mode the batch-invariant helpers (`invariant`) trace to, as one context variable: whether
their forms are batch-invariant, the model blocks of their matmuls, whether the program is a
prefill, and the backend whose forms they take. Read while tracing; a function jitted inside a
trace (the model's block, `model._block`) takes `mode()` as a static argument, since JAX
caches its trace without it."""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple


class Mode(NamedTuple):
    """What `invariant`'s helpers trace to (set by `invariant.batch_invariance` and
    `invariant.forms_for`)."""

    invariant: bool = True
    blocks: int = 1
    prefill: bool = False
    forms_for: str | None = None


_MODE = contextvars.ContextVar("cfjax_invariant_mode", default=Mode())  # noqa: B039 (immutable)


@contextlib.contextmanager
def traced_under(mode: Mode):
    """Trace under `mode`."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def mode() -> Mode:
    """The mode programs are traced under now."""
    return _MODE.get()
