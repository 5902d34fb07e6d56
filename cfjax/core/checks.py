"""Argument checks shared by the core and every entry point: keys, token ids, counts, numbers.

Nothing here knows the network or the sampler.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_key(key: Any) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key or raw uint32 key data (e.g. from JSON)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not 0 <= int(key) < 1 << 32:
            # jax keeps a seed's low 32 bits (without x64): a larger one would silently collide.
            raise ValueError(f"seed {int(key)} is outside [0, 2**32): a seed is one 32-bit word")
        return jax.random.key(int(key))
    if isinstance(key, (bool, float, str, bytes, type(None))):
        raise TypeError(
            f"key must be an int seed, a typed PRNG key or raw uint32 key data, got {key!r}"
        )
    if isinstance(key, (list, tuple)) and any(isinstance(k, jax.Array) for k in key):
        return jnp.stack([as_key(k) for k in key])  # a list of keys
    if not isinstance(key, jax.Array):
        key = np.asarray(key)  # lists of Python ints: checked before any 32-bit conversion
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    words = key_words()
    if not jnp.issubdtype(key.dtype, jnp.integer) or key.ndim == 0 or key.shape[-1] != words:
        raise ValueError(
            f"raw key data must be unsigned 32-bit words of shape (..., {words}), got "
            f"{key.dtype} {tuple(key.shape)}"
        )
    if not isinstance(key, jax.core.Tracer):
        values = np.asarray(key).astype(np.int64)
        if np.any(values < 0) or np.any(values >= 1 << 32):
            raise ValueError(f"raw key data must hold words in [0, 2**32), got {values.tolist()}")
    return jax.random.wrap_key_data(jnp.asarray(key).astype(jnp.uint32))


def key_words() -> int:
    """Words of raw data in a key of the default PRNG implementation (threefry: 2)."""
    return int(jax.random.key_data(jax.random.key(0)).shape[-1])


def check_tokens(tokens: Any, vocab_size: int, what: str = "tokens") -> None:
    """Raise a clear error for token ids outside `[0, vocab_size)` (concrete arrays only)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if len(bad):
        pos = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{what}: token id {int(arr[pos])} at position {pos} is outside the vocabulary "
            f"[0, {vocab_size})"
        )


def count(value: Any, name: str = "max_new_tokens") -> int:
    """`value` as a Python int >= 1 (numpy integers too; bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def integer(value: Any, name: str, low: int = 0, high: int | None = None) -> int:
    """`value` as a Python int in [low, high) (numpy integers too; bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value}")
    return int(value)


def real(value: Any, name: str, *, low: float | None = None, positive: bool = False) -> float:
    """`value` as a finite float (> 0 with `positive`, >= `low` with `low`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0) or (low is not None and value < low):
        rule = " > 0" if positive else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{rule}, got {value}")
    return value


def share(value: Any, name: str) -> float:
    """`value` as a float in (0, 1] (a top-p mass)."""
    if not 0 < real(value, name) <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def token_ids(tokens: Any, name: str) -> tuple[int, ...]:
    """A flat sequence of integer token ids as ints (a string or float ids are refused)."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of token ids, not text {tokens!r:.40}")
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a flat sequence of integer token ids, got {tokens!r:.60}")
    return tuple(int(t) for t in arr)  # ranges are checked against the vocabulary later
