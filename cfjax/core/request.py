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
        return jax.random.key(int(key))
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key.astype(jnp.uint32))


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
        if chat:
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": prompt}
            ]
            return list(lm.tokenizer.chat(messages))
        bos = getattr(lm.tokenizer, "bos_id", None)
        return ([bos] if bos is not None else []) + list(lm.tokenizer.encode(prompt))
    tokens = [int(t) for t in prompt]
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


def check_request(lm: Any, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Clear errors for empty or out-of-vocabulary prompts and overlong requests."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt of row {b} is empty: give at least one token")
        check_tokens(np.asarray(p), lm.config.vocab_size, what=f"prompt of row {b}")
        if len(p) + max_new_tokens > lm.config.max_seq_len:
            raise ValueError(
                f"prompt of row {b} ({len(p)} tokens) + max_new_tokens {max_new_tokens} exceeds "
                f"the model's max_seq_len {lm.config.max_seq_len}"
            )
