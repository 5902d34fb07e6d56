"""`cfjax convert` that pauses at a named point of the conversion, for the interrupt tests.

    python interrupt_child.py POINT READY GO -- <convert arguments>

At POINT it creates the file READY and waits (at most a minute) for the test to send a signal:
- `read`: before the params are written (the source has been read);
- `save`: inside orbax's save, where cfjax holds signals until the save is done (it waits for
  the file GO, which the test creates once the signal is sent);
- `meta`: after the params are written, before `cfjax.json`.

The process starts with SIGINT ignored, as a non-interactive shell starts a background job (and
as some CI runners start their tests): Ctrl-C must still stop it.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

signal.signal(signal.SIGINT, signal.SIG_IGN)

import orbax.checkpoint as ocp  # noqa: E402

from cfjax.cli import main  # noqa: E402
from cfjax.weights import checkpoint  # noqa: E402

point, ready, go, sep, *args = sys.argv[1:]
assert sep == "--"


def wait_for(path: Path | None) -> None:
    Path(ready).touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (path and path.exists()):
        time.sleep(0.01)  # a signal that raises interrupts this sleep


def pausing(function, at: str, until: Path | None = None):
    def paused(*a, **kw):
        if point == at:
            wait_for(until)
        return function(*a, **kw)

    return paused


checkpoint.save_params = pausing(checkpoint.save_params, "read")
checkpoint.write_meta = pausing(checkpoint.write_meta, "meta")
ocp.Checkpointer.save = pausing(ocp.Checkpointer.save, "save", Path(go))
sys.exit(main(args))
