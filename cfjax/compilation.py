"""JAX's persistent compilation cache, on by default: a second process that runs the programs of
an earlier one loads them from disk instead of compiling them.

JAX reads its cache setting once, at a process's first compilation, so the folder is set when
`cfjax` is imported (before any program of cfjax's is compiled) and only where the process has
not configured a cache of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "CFJAX_COMPILATION_CACHE"


def default_folder() -> Path:
    """`$XDG_CACHE_HOME/cfjax/xla`, else `~/.cache/cfjax/xla`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cfjax" / "xla"


def use_compilation_cache() -> str | None:
    """Keep compiled programs on disk across processes; returns the folder in use (None: off).

    `CFJAX_COMPILATION_CACHE` names the folder (default `default_folder()`), empty turns it
    off. A folder the process already set (JAX's own `JAX_COMPILATION_CACHE_DIR`, or
    `jax.config.update("jax_compilation_cache_dir", ...)` before importing cfjax) is kept with
    the process's other cache settings. Where cfjax sets the folder it also caches programs of
    any compile time (JAX's default keeps only those over a second), so that a second process
    compiles nothing. A folder that cannot be created leaves the cache off.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = os.environ.get(ENV, str(default_folder()))
    if not folder:
        return None
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
