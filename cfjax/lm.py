"""`LM`: a loaded model (config + params pytree + tokenizer) and the plain causal forward."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import model
from cfjax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class LM:
    """A model ready to run: `params` is a plain pytree usable with jit, vmap, grad and orbax."""

    config: LlamaConfig
    params: dict
    tokenizer: Any = None
    model_id: str = ""

    @property
    def dtype(self) -> jnp.dtype:
        """Parameter dtype."""
        return self.params["embed"]["embedding"].dtype

    def replace(self, **changes: Any) -> LM:
        """A copy with some fields changed (e.g. other params: a fine-tune or a weight edit)."""
        return dataclasses.replace(self, **changes)


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


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: LlamaConfig, params: dict, tokens: jax.Array) -> jax.Array:
    return model.apply(config, params, tokens)[0]


def forward(lm: LM, tokens: Any) -> jax.Array:
    """Full causal forward without a cache: int32 `[B, T]` -> float32 logits `[B, T, V]`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time], got {tokens.shape}")
    check_tokens(tokens, lm.config.vocab_size)
    if tokens.shape[1] > lm.config.max_seq_len:
        raise ValueError(
            f"sequence of {tokens.shape[1]} tokens is longer than the model's max_seq_len "
            f"{lm.config.max_seq_len}"
        )
    return _forward(lm.config, lm.params, tokens)
