"""Request helpers shared by every host entry point: keys, prompt tokens, request checks.

Nothing here knows the network or the sampler; `lm` is anything with `config`, `tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    words = _key_words()
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


def _key_words() -> int:
    """Words of raw data in a key of the default PRNG implementation (threefry: 2)."""
    return int(jax.random.key_data(jax.random.key(0)).shape[-1])


def row_keys(key: Any, batch: int) -> jax.Array:
    """One key per row: a given `[B]` batch of keys, or B keys split from a single key/seed."""
    if isinstance(key, (list, tuple)) and len(key) == batch and batch > 1:
        return jnp.stack([as_key(k) for k in key])
    key = as_key(key)
    if key.ndim == 1:
        if key.shape[0] != batch:
            raise ValueError(f"got {key.shape[0]} keys for a batch of {batch} prompts")
        return key
    return key[None] if batch == 1 else jax.random.split(key, batch)


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


def prompt_tokens(
    lm: Any, prompt: str | Sequence[int], *, chat: bool = True, system: str | None = None
) -> list[int]:
    """Token ids of one prompt: token ids as given, text through the chat template or encoded."""
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: this model has none; pass token ids")
        if system is not None and not chat:
            raise ValueError(
                "a system message needs the chat template: it cannot be given with chat=False "
                "(--no-chat)"
            )
        if chat:
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": prompt}
            ]
            return list(lm.tokenizer.chat(messages))
        # The model's own setting: a GGUF's add_bos_token, an HF tokenizer's post-processor.
        bos = lm.tokenizer.bos_id if getattr(lm.tokenizer, "add_bos", True) else None
        return ([bos] if bos is not None else []) + list(lm.tokenizer.encode(prompt))
    if system is not None:
        raise ValueError("a system message applies to a text prompt; token ids are used as given")
    tokens = list(token_ids(prompt, "prompt"))
    if not tokens:
        raise ValueError("the prompt is empty: give at least one token")
    return tokens


def is_batch(prompt: Any) -> bool:
    """A batch holds strings or sequences; a single prompt holds scalars (ints, numpy or JAX)."""
    return (
        not isinstance(prompt, str)
        and len(prompt) > 0
        and (isinstance(prompt[0], str) or np.ndim(prompt[0]) > 0)
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


def token_ids(tokens: Any, name: str) -> tuple[int, ...]:
    """A flat sequence of integer token ids as ints (a string or float ids are refused)."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of token ids, not text {tokens!r:.40}")
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a flat sequence of integer token ids, got {tokens!r:.60}")
    return tuple(int(t) for t in arr)  # ranges are checked against the vocabulary later


def check_request(lm: Any, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Clear errors for empty or out-of-vocabulary prompts and overlong requests."""
    max_new_tokens = count(max_new_tokens)
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt of row {b} is empty: give at least one token")
        check_tokens(np.asarray(p), lm.config.vocab_size, what=f"prompt of row {b}")
        if len(p) + max_new_tokens > lm.config.max_seq_len:
            raise ValueError(
                f"prompt of row {b} ({len(p)} tokens) + max_new_tokens {max_new_tokens} exceeds "
                f"the model's max_seq_len {lm.config.max_seq_len}"
            )
