"""Room for compiled programs in a long-lived process (an explorer, a notebook, a long study).

XLA:CPU links each compiled program into the process with memory maps of its own: 280 to 350
for one batch shape of a model's prefill and decode chunk. Linux allows a process
`vm.max_map_count` maps (65,530 by default); past them the next compilation fails ("LLVM
compilation error: Cannot allocate memory") and the process crashes, after some 200 batch
shapes in one process. So before each engine run `keep_room` counts the process's maps and,
past a budget, clears JAX's in-memory programs: those needed again are compiled anew, or read
back from the persistent compilation cache (`cfjax.compilation`). Tokens do not change: a
program compiled again computes the same bits.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import jax

from cfjax.runtime import ahead

ENV = "CFJAX_MAP_BUDGET"
log = logging.getLogger("cfjax")
_after_last_clear = [0]  # maps in use right after the last clear (not JAX's, when large)


def budget() -> int | None:
    """Maps the process may hold before compiled programs are cleared: `CFJAX_MAP_BUDGET`, or
    three quarters of `vm.max_map_count`; None where the system sets no such limit."""
    given = os.environ.get(ENV, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"{ENV} must be a number of memory maps >= 1, got {given!r}")
        return int(given)
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text()) * 3 // 4
    except (OSError, ValueError):
        return None


def maps_in_use() -> int | None:
    """The memory maps this process holds (Linux's `/proc/self/maps`; None elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def keep_room() -> bool:
    """Clear JAX's compiled programs if the process holds more maps than its `budget()` (and a
    quarter of the budget more than right after the last clear, so that maps that are not
    JAX's never make every run compile again). True when it cleared."""
    limit, used = budget(), maps_in_use()
    if limit is None or used is None or used <= max(limit, _after_last_clear[0] + limit // 4):
        return False
    jax.clear_caches()
    ahead.forget()
    gc.collect()  # the programs' maps go with their last reference
    _after_last_clear[0] = maps_in_use() or 0
    log.info("%d memory maps in use (budget %d): compiled programs cleared, %d maps left",
             used, limit, _after_last_clear[0])  # fmt: skip
    return True
