"""Compile time (issue 31). The persistent compilation cache is on by default: a second process
running the programs of a first loads every one of them from disk and compiles none. And a
run's decode chunk programs compile on a worker thread beside its prefill (`runtime.ahead`),
each once: the chunk's calls find it compiled."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import cfjax
from cfjax.core import model
from cfjax.runtime import ahead, driver

CHILD = r"""
import json, sys
import jax
events = {"requests": 0, "hits": 0}
names = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
         "/jax/compilation_cache/cache_hits": "hits"}
jax.monitoring.register_event_listener(lambda e, **kw: e in names and events.__setitem__(names[e], events[names[e]] + 1))
import cfjax
config = cfjax.preset("tiny")
lm = cfjax.LM(config, cfjax.core.model.init_params(config, jax.random.key(0)))
trace = cfjax.generate(lm, [[1, 5, 9], [1, 7]], key=0, max_new_tokens=6, stop_tokens=())
cfjax.counterfactual(lm, trace[0], cfjax.ReplaceTokens(2, [3]))
print(json.dumps({**events, "folder": jax.config.jax_compilation_cache_dir, "tokens": trace[0].tokens}))
"""


def _child(env: dict) -> dict:
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 20-60 s: in `make test-slow`, which CI runs too
def test_a_second_process_compiles_nothing(tmp_path):
    env = {"CFJAX_COMPILATION_CACHE": str(tmp_path / "xla")}
    first = _child(env)
    assert first["folder"] == str(tmp_path / "xla")
    assert first["requests"] > 0 and first["hits"] == 0, first
    second = _child(env)
    assert second["requests"] == first["requests"], (first, second)
    assert second["hits"] == second["requests"], second  # every program loaded from disk
    assert second["tokens"] == first["tokens"]
    # The default folder follows XDG_CACHE_HOME; an empty variable turns the cache off.
    default = _child({"CFJAX_COMPILATION_CACHE": "", "XDG_CACHE_HOME": str(tmp_path)})
    assert default["folder"] is None and default["hits"] == 0, default
    xdg = {k: v for k, v in os.environ.items() if k != "CFJAX_COMPILATION_CACHE"}
    run = subprocess.run([sys.executable, "-c", "import cfjax, jax; print(jax.config.jax_compilation_cache_dir)"],
                         env={**xdg, "XDG_CACHE_HOME": str(tmp_path / "home")}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.stdout.strip() == str(tmp_path / "home" / "cfjax" / "xla"), run.stderr[-2000:]


class _Compiles(logging.Handler):
    """The programs XLA compiles (JAX's `log_compiles` records), with the thread of each."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            self.seen.append((message.split()[4], record.threadName))


def _compiles(run) -> list[tuple[str, str]]:
    handler, logger = _Compiles(), logging.getLogger("jax._src.dispatch")
    logger.addHandler(handler)
    was = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # (for every thread: a context is the caller's)
    try:
        run()
    finally:
        jax.config.update("jax_log_compiles", was)
        logger.removeHandler(handler)
    return handler.seen


@pytest.mark.parametrize("case", ["one-cache-length", "growing-cache", "draft"])
def test_the_chunk_programs_compile_beside_the_prefill_once(case):
    # A model of its own per case (3 to 5 layers), so that no other test compiled its programs.
    layers = {"one-cache-length": 3, "growing-cache": 4, "draft": 5}[case]
    config = dataclasses.replace(cfjax.preset("tiny"), n_layers=layers)
    params = model.init_params(config, jax.random.key(0))
    keys = jax.random.split(jax.random.key(4), 2)
    request = driver.Request([[1, 5, 9], [1, 7]], keys, [cfjax.Sampler()] * 2, steps=40)
    grow = case == "growing-cache"
    draft = cfjax.core.Draft(config, params, 3) if case == "draft" else None

    def run():
        return driver.run(config, params, request, stop_tokens=(), chunk=16, grow_cache=grow, draft=draft)  # fmt: skip

    ahead.drain()  # (compilations earlier tests left running: the workers idle)
    first = []
    compiled = _compiles(lambda: first.append(run()))
    chunks = [thread for name, thread in compiled if name == "jit(decode)"]
    # One chunk program per cache length (three with a growing cache: 16, 32 and 48 slots past
    # the prompt's 32), each compiled once. The first one by a worker beside the prefill; the
    # others there too unless the run needs one before a worker begins it (then by the run).
    assert first[0].slots == ([48, 64, 80] if grow else [80, 80, 80])
    assert len(chunks) == (3 if grow else 1), compiled
    assert chunks[0].startswith("cfjax-compile"), compiled
    assert ("jit(prefill)", threading.current_thread().name) in compiled, compiled
    again = []
    assert _compiles(lambda: again.append(run())) == []  # the same shapes: nothing to compile
    np.testing.assert_array_equal(first[0].tokens, again[0].tokens)


def test_compile_ahead_off(monkeypatch):
    """`CFJAX_COMPILE_AHEAD=0`: the chunk compiles in its call, on the run's own thread."""
    monkeypatch.setenv("CFJAX_COMPILE_AHEAD", "0")
    config = dataclasses.replace(cfjax.preset("tiny"), n_layers=6)  # (programs of its own)
    params = model.init_params(config, jax.random.key(0))
    request = driver.Request([[1, 5, 9]], jax.random.key(4)[None], [cfjax.Sampler()], steps=8)
    compiled = _compiles(lambda: driver.run(config, params, request, stop_tokens=(), chunk=16))
    assert [t for name, t in compiled if name == "jit(decode)"] == [threading.current_thread().name]  # fmt: skip
