"""The persistent compilation cache is on by default (issue 31): a second process running the
programs of a first loads every one of them from disk and compiles none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
