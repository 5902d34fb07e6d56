"""A run's decode chunk programs compiled on worker threads while its prefill compiles.

The first run of a shape compiles two programs, the prefill and the decode chunk (with a growing
cache, one chunk program per cache length), each on one thread, and JAX would compile them one
after the other. Their arguments' shapes are known before the prefill runs (`jax.eval_shape`
of the run's start), so the driver lowers the chunk programs first and has them compiled beside
the prefill: XLA compiles outside the GIL, and JAX keeps an ahead-of-time compilation in the
in-memory cache its calls read, so the chunk's first call finds its program compiled. The
programs are the ones the calls would compile, so are the tokens. Measured on a 2-core CPU
(benchmarks/RESULTS.md): the Llama 3 8B config's two programs, 11.1-11.9 s of compile one after
the other, took 7.6-8.4 s side by side.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Hashable, Iterable
from typing import Any

import jax

log = logging.getLogger("cfjax")
ENV = "CFJAX_COMPILE_AHEAD"  # "0": each program compiles in its call, one after the other

# Beside the main thread's compile: a worker per other core, at most four (each holds the
# compiler's memory for its program).
_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()  # (runs may start on several threads: the explorer's requests)
# The shapes of runs whose programs were compiled ahead: a later run of the same shapes finds
# them compiled, and skips the ~5 ms of abstract tracing it would take to say so.
_seen: set[Hashable] = set()
_in_flight: set[concurrent.futures.Future] = set()


def enabled() -> bool:
    """Whether runs compile ahead: unless `CFJAX_COMPILE_AHEAD=0`."""
    return os.environ.get(ENV, "1").strip() != "0"


def first_time(shapes: Hashable) -> bool:
    """Whether a run of these `shapes` (what fixes its programs) should compile ahead: the
    first time they come, and again after `forget`; never unless `enabled()`. A key that misses
    some shape only makes a run compile its chunk program in the call, as without this module."""
    if not enabled():
        return False
    with _lock:
        if shapes in _seen:
            return False
        _seen.add(shapes)
        return True


def forget() -> None:
    """Compiled programs were cleared (`programs.keep_room`): compile ahead again."""
    with _lock:
        _seen.clear()


def committed(tree: Any, device: Any) -> Any:
    """The shapes of `tree` committed to `device` (as `jax.device_put(x, x.sharding)` commits an
    array, and as a program's outputs are when its inputs are)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type),
        tree,
    )


def compile_beside(lowered: Iterable[tuple[Hashable, Any]]) -> dict[Hashable, concurrent.futures.Future]:  # fmt: skip
    """Compile each `(name, lowered program)` on a worker thread: {name: its future}. The
    programs are traced and lowered by the caller, under its thread's JAX settings (thread-local
    ones, e.g. `jax.default_matmul_precision`, are not a worker's) and as its calls will be."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="cfjax-compile")  # fmt: skip
    futures = {name: _pool.submit(program.compile) for name, program in lowered}
    for future in futures.values():
        with _lock:
            _in_flight.add(future)
        future.add_done_callback(_landed)  # (at once, on this thread, if already done)
    return futures


def _landed(future: concurrent.futures.Future) -> None:
    with _lock:
        _in_flight.discard(future)


def drain() -> None:
    """Wait until no compilation is in flight (the workers idle)."""
    with _lock:
        in_flight = list(_in_flight)
    concurrent.futures.wait(in_flight)


def wait(future: concurrent.futures.Future | None) -> None:
    """Wait for a compilation `compile_beside` started. One not yet begun (the workers busy
    with others) is dropped and one that failed is left to the call, which compiles its program
    itself (and raises the error where it belongs)."""
    if future is None or future.cancel():
        return
    try:
        future.result()
    except Exception as error:  # noqa: BLE001 (the call reports it)
        log.debug("compiling ahead failed (%s): the call compiles its program itself", error)


def cancel(pending: dict[Hashable, concurrent.futures.Future]) -> None:
    """Drop the compilations not yet begun (a run that stopped early needs no more programs)."""
    for future in pending.values():
        future.cancel()
