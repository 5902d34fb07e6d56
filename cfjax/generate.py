"""`generate`: factual generation from text or token prompts, returning replayable `Trace`s."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import decode
from cfjax.lm import LM, check_tokens
from cfjax.scm import Sampler
from cfjax.trace import Trace


def as_key(key: Any) -> jax.Array:
    """A typed key from an int seed, a typed key or raw key data."""
    if isinstance(key, (int, np.integer)):
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


def prompt_tokens(
    lm: LM, prompt: str | Sequence[int], *, chat: bool = True, system: str | None = None
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


def _is_batch(prompt: Any) -> bool:
    # A batch holds strings or sequences; a single prompt holds scalars (ints, numpy or JAX).
    return (
        not isinstance(prompt, str)
        and len(prompt) > 0
        and (isinstance(prompt[0], str) or np.ndim(prompt[0]) > 0)
    )


def check_request(lm: LM, prompts: list[list[int]], max_new_tokens: int) -> None:
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


def _text(lm: LM, tokens: list[int], stop_tokens: Sequence[int]) -> str:
    if lm.tokenizer is None:
        return ""
    if tokens and tokens[-1] in stop_tokens:
        tokens = tokens[:-1]
    return lm.tokenizer.decode(tokens)


class _Streamer:
    """Prints row 0's text as chunks arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, lm: LM, stop_tokens: Sequence[int], emit: Callable[[str], None]):
        self.lm, self.stop_tokens, self.emit, self.sent = lm, stop_tokens, emit, 0

    def __call__(self, rows: list[list[int]]) -> None:
        text = _text(self.lm, rows[0], self.stop_tokens).rstrip("\ufffd")
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)

    def finish(self, text: str) -> None:
        """Emit what was held back: the final text may really end with U+FFFD."""
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)


def generate(
    lm: LM,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    key: Any = 0,
    sampler: Sampler | None = None,
    max_new_tokens: int = 128,
    chat: bool = True,
    system: str | None = None,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = decode.DEFAULT_CHUNK,
    stream: Callable[[str], None] | None = None,
) -> Trace | list[Trace]:
    """Sample a response; a batch of prompts returns one `Trace` per row.

    `key` is an int seed, a key, or one key per row (a single key for a batch is split into
    one key per row). Each row's noise depends only on its own key and the step.
    `stream(text)` receives row 0's text as it is produced.
    """
    sampler = sampler or Sampler()
    batch = _is_batch(prompt)
    prompts_in = list(prompt) if batch else [prompt]
    prompts = [prompt_tokens(lm, p, chat=chat, system=system) for p in prompts_in]
    check_request(lm, prompts, max_new_tokens)
    keys = row_keys(key, len(prompts))
    if stop_tokens is None:
        stop_tokens = tuple(lm.tokenizer.stop_tokens) if lm.tokenizer is not None else ()
    stop_tokens = tuple(int(t) for t in stop_tokens)

    prep = decode.prepare(prompts)
    length = decode.cache_length(prep.bucket, max_new_tokens, chunk)
    carry = decode.prefill(lm.config, lm.params, prep, length)
    streamer = _Streamer(lm, stop_tokens, stream) if stream else None
    out = decode.decode(
        lm.config,
        lm.params,
        carry,
        start=jnp.asarray(prep.start),
        keys=keys,
        sampler=sampler,
        stop_tokens=stop_tokens,
        steps=max_new_tokens,
        chunk=chunk,
        on_chunk=streamer,
    )
    runtime = decode.Runtime(out.carry.cache, prep, chunk, lm.params)
    traces = [
        Trace(
            model_id=lm.model_id,
            prompt_tokens=prompts[b],
            tokens=out.tokens[b],
            key=keys[b],
            sampler=sampler,
            max_new_tokens=max_new_tokens,
            noise_index=list(range(len(out.tokens[b]))),
            logprobs=out.logprobs[b],
            text=_text(lm, out.tokens[b], stop_tokens),
            prompt=prompts_in[b] if isinstance(prompts_in[b], str) else None,
            system=system if isinstance(prompts_in[b], str) else None,
            chat=chat and isinstance(prompts_in[b], str),
            stop_tokens=stop_tokens,
            runtime=runtime.row(b),
        )
        for b in range(len(prompts))
    ]
    if streamer is not None:
        streamer.finish(traces[0].text)
    return traces if batch else traces[0]
