"""Coupled generation (Benz et al., "coupled autoregressive generation"): several models answer
the same prompts with the same noise, one key per prompt row shared by every model, so that the
differences between their answers are the models' and not the luck's.

Models whose params have the same structure, shapes and dtypes run as one program: their params
stacked and `core.sample` vmapped over models and prompts. Any other model runs `generate`.
Either way a model's traces equal `generate(model, prompts, key=key)` token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.causal.factual import _samplers, generate
from cfjax.causal.trace import Prompt, Trace, new_trace
from cfjax.core import decode
from cfjax.core.checks import count
from cfjax.core.kernel import stop_tuple
from cfjax.core.scm import Sampler
from cfjax.runtime.driver import rows_to_run
from cfjax.runtime.lm import LM
from cfjax.runtime.request import (
    check_request,
    host_rows,
    is_batch,
    padded,
    row_keys,
    stop_tokens_of,
)


def check_shared_vocabulary(models: Sequence[LM]) -> None:
    """Models coupled by noise must index the same tokens: the same vocabulary and tokenizer."""
    for i, m in enumerate(models):
        if not isinstance(m, LM):
            raise TypeError(f"coupled: model {i} is a {type(m).__name__}, not a loaded model (cfjax.load)")  # fmt: skip
    first = models[0]
    for i, m in enumerate(models[1:], 1):
        if m.config.vocab_size != first.config.vocab_size:
            raise ValueError(
                f"coupled: model {i} ({m.model_id or '?'}) has a vocabulary of "
                f"{m.config.vocab_size} tokens, model 0 ({first.model_id or '?'}) of "
                f"{first.config.vocab_size}: coupled models must share the vocabulary"
            )
        ours, theirs = (getattr(x.tokenizer, "spec", None) for x in (first, m))
        if ours != theirs:
            raise ValueError(
                f"coupled: model {i} ({m.model_id or '?'}) has another tokenizer ({theirs}) than "
                f"model 0 ({ours}): coupled models must share the vocabulary"
            )


def _signature(lm: LM) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(lm.params)
    return lm.config, tree, tuple((x.shape, str(x.dtype)) for x in leaves)


def _stacked_sample(config, stop_tokens, params, prompts, lengths, keys, sampler, n):
    one = lambda p, x, length, k: decode.sample(  # noqa: E731
        config, p, x, length, k, sampler, max_new_tokens=n, stop_tokens=stop_tokens
    )
    over_prompts = jax.vmap(one, in_axes=(None, 0, 0, 0))
    return jax.vmap(over_prompts, in_axes=(0, None, None, None))(params, prompts, lengths, keys)


_stacked = jax.jit(_stacked_sample, static_argnums=(0, 1, 7))


def coupled(
    models: Sequence[LM],
    prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    key: Any = 0,
    sampler: Sampler | None = None,
    max_new_tokens: int = 128,
    chat: bool = True,
    system: str | None = None,
    stop_tokens: Sequence[int] | None = None,
) -> list[list[Trace]]:
    """Every model answers every prompt under the same noise: `result[model][prompt]`.

    `key` gives one key per prompt row (an int seed or key is split, or give one key per row),
    shared across the models; `sampler` is one sampler for every row.
    """
    models = list(models)
    if not models:
        raise ValueError("coupled: give at least one model")
    check_shared_vocabulary(models)
    n = count(max_new_tokens)
    sampler = _samplers(sampler, 1)[0]
    lm0 = models[0]
    given = [Prompt.of(lm0, p, chat=chat, system=system) for p in (prompts if is_batch(prompts) else [prompts])]  # fmt: skip
    tokens = [p.tokens for p in given]
    check_request(lm0, tokens, n)
    keys = row_keys(key, len(tokens))
    stop_tokens = stop_tokens_of(lm0, stop_tokens)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(_signature(m), []).append(i)
    results: list[list[Trace] | None] = [None] * len(models)
    for members in groups.values():
        if len(members) == 1:
            m = models[members[0]]
            results[members[0]] = generate(
                m, tokens, key=keys, sampler=sampler, max_new_tokens=n, stop_tokens=stop_tokens
            )
            continue
        rows = _run_stacked([models[i] for i in members], given, keys, sampler, n, stop_tokens)
        for i, traces in zip(members, rows, strict=True):
            results[i] = traces
    # Traces record the prompt as text where it was text, like `generate`.
    for traces in results:
        for t, p in zip(traces, given, strict=True):
            t.prompt, t.system, t.chat = p.text, p.system, p.chat
    return results  # type: ignore[return-value]


def _run_stacked(models, given: list[Prompt], keys, sampler, n, stop_tokens) -> list[list[Trace]]:
    """One program for models of one signature: params stacked, vmapped over models, prompts.

    More than `EXACT_ROWS` prompts run as `rows_to_run` says, as the engine's batches do (one
    program for several prompt counts), the added rows copies of row 0: they end when it ends,
    and the vmapped loop, batch-invariant, computes every other row as it would without them."""
    tokens = [p.tokens for p in given]
    lm = models[0]
    rows, index = rows_to_run(lm.config, len(tokens), lm.pad_batch)
    prompts, lengths = padded(tokens + [tokens[0]] * (rows - len(tokens)))
    if index is not None:
        keys = host_rows(keys, index)
    params = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(m.params for m in models))
    out = _stacked(lm.config, stop_tuple(stop_tokens), params, jnp.asarray(prompts),
                   jnp.asarray(lengths), keys, sampler, n)  # fmt: skip
    toks, logps, length = (np.asarray(x) for x in (out.tokens, out.logprobs, out.length))
    return [
        [new_trace(m, p, toks[i, b, : length[i, b]], logps[i, b, : length[i, b]], key=keys[b],
                   sampler=sampler, max_new_tokens=n, stop_tokens=stop_tokens)  # fmt: skip
         for b, p in enumerate(given)]
        for i, m in enumerate(models)
    ]  # fmt: skip
