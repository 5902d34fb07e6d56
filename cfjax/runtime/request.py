"""Request helpers of the host entry points: keys per row, prompt tokens (chat templates), stop
tokens, bucket padding, and the checks of a request against the model.

`lm` is anything with `config` and `tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core.checks import as_key, check_tokens, count, key_words, token_ids
from cfjax.core.kernel import bucket_length


def row_keys(key: Any, batch: int) -> jax.Array:
    """One key per row: a given `[B]` batch of keys, or B keys split from a single key/seed."""
    if isinstance(key, (list, tuple)) and len(key) == batch and batch > 1:
        return jnp.stack([as_key(k) for k in key])
    if isinstance(key, (list, tuple)) and len(key) != key_words() and batch > 1:
        # Not one key's raw words (e.g. [0, 1]): one seed or key per row, of another count.
        raise ValueError(f"key: got {len(key)} keys for a batch of {batch} prompts")
    key = as_key(key)
    if key.ndim == 1:
        if key.shape[0] != batch:
            raise ValueError(f"got {key.shape[0]} keys for a batch of {batch} prompts")
        return key
    return key[None] if batch == 1 else jax.random.split(key, batch)


def prompt_tokens(
    lm: Any,
    prompt: str | Sequence[int],
    *,
    chat: bool = True,
    system: str | None = None,
    history: Sequence[dict] | None = None,
) -> list[int]:
    """Token ids of one prompt: token ids as given, text through the chat template or encoded.

    `history`: the earlier messages of a conversation (user and assistant, in order), rendered
    between the system message and `prompt`."""
    if not isinstance(chat, (bool, np.bool_)):
        raise TypeError(f"chat must be True or False, got {chat!r}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a text or None, got {system!r:.60}")
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: this model has none; pass token ids")
        if system is not None and not chat:
            raise ValueError(
                "a system message needs the chat template: it cannot be given with chat=False "
                "(--no-chat)"
            )
        if history and not chat:
            raise ValueError("a conversation's earlier turns need the chat template (chat=True)")
        if chat:
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages += [dict(m) for m in history or ()] + [{"role": "user", "content": prompt}]
            return list(lm.tokenizer.chat(messages))
        # The model's own setting: a GGUF's add_bos_token, an HF tokenizer's post-processor.
        bos = lm.tokenizer.bos_id if getattr(lm.tokenizer, "add_bos", True) else None
        return ([bos] if bos is not None else []) + list(lm.tokenizer.encode(prompt))
    if system is not None or history:
        what = "a system message" if system is not None else "a conversation history"
        raise ValueError(f"{what} applies to a text prompt; token ids are used as given")
    tokens = list(token_ids(prompt, "prompt"))
    if not tokens:
        raise ValueError("the prompt is empty: give at least one token")
    return tokens


def is_batch(prompt: Any) -> bool:
    """A batch holds strings or sequences; a single prompt holds scalars (ints, numpy or JAX)."""
    if not isinstance(prompt, (str, Sequence)) and np.ndim(prompt) == 0:
        raise TypeError(
            f"prompt must be text, a sequence of token ids, or a list of either, got {prompt!r:.60}"
        )
    return (
        not isinstance(prompt, str)
        and len(prompt) > 0
        and (isinstance(prompt[0], str) or np.ndim(prompt[0]) > 0)
    )


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


def stop_tokens_of(lm: Any, given: Sequence[int] | None) -> tuple[int, ...]:
    """The stop tokens of a run: those given, else the tokenizer's (none without one)."""
    if given is None:
        given = lm.tokenizer.stop_tokens if lm.tokenizer is not None else ()
    stops = token_ids(given, "stop_tokens")
    if stops:  # an id the model has not would never stop a row (another tokenizer's?)
        check_tokens(np.asarray(stops), lm.config.vocab_size, "stop_tokens")
    return stops


def padded(prompts: Sequence[Sequence[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Prompts right-padded with 0 into `[B, width]` (default: their bucket), and their lengths."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    out = np.zeros((len(prompts), width or bucket_length(int(lengths.max()))), np.int32)
    for b, p in enumerate(prompts):
        out[b, : len(p)] = p
    return out, lengths


def host_rows(x: Any, index: np.ndarray) -> Any:
    """Rows `index` of a per-row input, taken on the host (typed keys as their raw data), so
    that padding compiles no program of its own."""
    if x is None:
        return None
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x))[index], impl=jax.random.key_impl(x))  # fmt: skip
    return np.asarray(x)[index]


def valid_entries(parts: list[np.ndarray], valid: list[np.ndarray], limit: int) -> list[list]:
    """Each row's valid entries of the chunks' `[B, steps]` outputs, as lists."""
    values = np.concatenate(parts, axis=1)[:, :limit]
    mask = np.concatenate(valid, axis=1)[:, :limit]
    return [values[b][mask[b]].tolist() for b in range(values.shape[0])]
