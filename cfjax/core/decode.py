"""The decode loop, and `sample`: one row, pure (jit, vmap and a user's own jitted code work).

`decode` is the one loop every route runs: `core.sample` (initialise + decode), and the host
driver (`cfjax.runtime.driver`) that runs it chunk by chunk behind `generate`,
`counterfactual(s)`, `interventional`, `abduct` and `coupled`. Its body is a plain step
(`kernel.step`) or, with a draft, a speculative round (`speculative.round_`): a static choice
of the same loop (see `kernel.Options`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import model, scm, speculative
from cfjax.core.checks import as_key, check_tokens, count
from cfjax.core.config import LlamaConfig
from cfjax.core.kernel import (
    NOT_FORCED,
    Options,
    Outputs,
    Rows,
    State,
    cache_length,
    layout,
    prefill,
    step,
    stop_tuple,
)


def decode(config: LlamaConfig, options: Options, params, rows: Rows, state: State, n, draft_params=None):  # fmt: skip
    """Up to `n` steps (<= W, the width of `rows.forced`) in one `lax.while_loop`.

    Returns the final state, the outputs `[W, B]` (steps not run are not valid) and the number
    of loop iterations (steps, or speculative rounds with a draft).
    """
    batch, width = rows.forced.shape
    vocab = config.vocab_size if options.keep_logits else None
    if options.draft is None:
        # RoPE of every step the loop may run (slot `index + i`), before the loop.
        slots = state.index + jnp.arange(width, dtype=jnp.int32)
        positions = model.positions(slots[:, None], rows.start[None, :])[..., None]  # [W, B, 1]
        cos, sin = model.rotation(positions, model.rope_frequencies(config))
        outputs = Outputs.empty(width, batch, vocab)

        def body(i, state, outputs):
            state, row = step(config, options, params, rows, state, i, (cos[i], sin[i]))
            fields = [f.name for f in dataclasses.fields(Outputs)][: len(row)]
            written = {f: getattr(outputs, f).at[i].set(r) for f, r in zip(fields, row, strict=True)}  # fmt: skip
            return 1, state, dataclasses.replace(outputs, **written)

    else:
        rows = speculative.pad_rows(rows, options.draft.lookahead)
        outputs = Outputs.empty(width + options.draft.lookahead + 1, batch, vocab)
        body = functools.partial(speculative.round_, config, options, params, draft_params, rows, n)  # fmt: skip

    def more(carry):
        i, _, state, _ = carry
        return (i < n) & ~jnp.all(state.done) if options.early_exit else i < n

    def one(carry):
        i, iterations, state, outputs = carry
        advance, state, outputs = body(i, state, outputs)
        return i + advance, iterations + 1, state, outputs

    _, iterations, state, outputs = jax.lax.while_loop(
        more, one, (jnp.int32(0), jnp.int32(0), state, outputs)
    )
    return state, jax.tree_util.tree_map(lambda o: o[:width], outputs), iterations


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """One row's result: `tokens` int32 `[N]`, `logprobs` float32 `[N]`, `length` int32 `[]`.

    `length` counts the tokens produced, a final stop token included; entries past it are 0.
    """

    tokens: jax.Array
    logprobs: jax.Array
    length: jax.Array


def sample(
    config: LlamaConfig,
    params: dict,
    prompt: jax.Array,
    prompt_length: jax.Array | int,
    key: jax.Array,
    sampler: scm.Sampler,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    forced: jax.Array | None = None,
    noise_index: jax.Array | None = None,
    noise: jax.Array | None = None,
    draft: speculative.Draft | None = None,
) -> Sampled:
    """Sample one response: a pure function of its inputs, usable under `jit` and `vmap`.

    `prompt` int32 `[P]` holds `prompt_length` real tokens (the rest is ignored); `key` is a
    typed key or raw key data; `sampler` a `Sampler` whose values may be traced. Optional:
    `forced` int32 `[N]` (token to force, or -1 to sample), `noise_index` int32 `[N]` (the noise
    index of each step, default 0..N-1) and `noise` float32 `[N, V]` (Gumbel noise replacing the
    key-derived noise). Static: `config`, `max_new_tokens`, `stop_tokens` and the sampler's
    structure. Padding the prompt to `bucket_length(prompt_length)` gives the program shapes of
    `cfjax.generate`, whose tokens it equals. `draft` (a `speculative.Draft`, its params traced)
    decodes by speculative rounds: the same tokens, fewer passes over the weights.

    Concrete values are checked (token ids in the vocabulary, `prompt_length` within the buffer,
    forced ids -1 or in the vocabulary, noise indices >= 0). Traced values cannot be checked
    here: under `jit`/`vmap` wrap the call in `checkify.checkify(f, errors=checkify.index_checks)`
    (`jax.experimental.checkify`), which reports an id outside the vocabulary by its index.
    """
    n = count(max_new_tokens)
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be int32 [P] (one row; vmap for more), got {prompt.shape}")
    for name, x, shape in (
        ("forced", forced, (n,)),
        ("noise_index", noise_index, (n,)),
        ("noise", noise, (n, config.vocab_size)),
    ):
        if x is not None and tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(jnp.shape(x))}")
    forced = jnp.full((n,), NOT_FORCED, jnp.int32) if forced is None else forced
    noise_index = jnp.arange(n, dtype=jnp.int32) if noise_index is None else noise_index
    _check_concrete(config.vocab_size, prompt, prompt_length, forced, noise_index)
    options = Options(stop_tuple(stop_tokens), draft=None if draft is None else draft.spec)
    return _sample(config, options, params, None if draft is None else draft.params, prompt,
                   prompt_length, as_key(key), scm.as_arrays(sampler),
                   jnp.asarray(forced, jnp.int32), jnp.asarray(noise_index, jnp.int32),
                   None if noise is None else jnp.asarray(noise, jnp.float32))  # fmt: skip


def _check_concrete(vocab: int, prompt, prompt_length, forced, noise_index) -> None:
    """`sample`'s checks of the values that are not traced (see its docstring)."""
    concrete = lambda x: not isinstance(x, jax.core.Tracer)  # noqa: E731
    if concrete(prompt_length):
        length = np.asarray(prompt_length)
        if length.ndim or not np.issubdtype(length.dtype, np.integer):
            raise TypeError(f"prompt_length must be an integer, got {prompt_length!r}")
        if not 1 <= int(length) <= prompt.shape[0]:
            raise ValueError(f"prompt_length {int(length)} is outside [1, {prompt.shape[0]}]")
        if concrete(prompt):
            check_tokens(prompt[: int(length)], vocab, "prompt")
    if concrete(forced):
        ids = np.asarray(forced)
        bad = np.flatnonzero((ids < NOT_FORCED) | (ids >= vocab))
        if len(bad):
            raise ValueError(f"forced: token id {int(ids[bad[0]])} at step {int(bad[0])} is neither {NOT_FORCED} (sample) nor in the vocabulary [0, {vocab})")  # fmt: skip
    if concrete(noise_index) and np.any(np.asarray(noise_index) < 0):
        raise ValueError("noise_index must hold indices >= 0")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample(config, options: Options, params, draft_params, prompt, prompt_length, key, sampler,
            forced, index, noise) -> Sampled:  # fmt: skip
    """`sample` on a batch of one: prefill, then the decode loop (no early exit: see Options)."""
    batch1 = lambda x: None if x is None else jnp.asarray(x)[None]  # noqa: E731
    n = forced.shape[0]
    length = cache_length(prompt.shape[0], n, spare=options.spare)
    state, start = prefill(config, params, prompt[None], batch1(prompt_length), length)
    if options.draft is not None:
        prefix = layout(prompt[None], batch1(prompt_length))[0]
        state.draft = speculative.start(options.draft.config, draft_params, prefix, start,
                                        length, jnp.zeros((1, 0), jnp.int32), 0)  # fmt: skip
    rows = Rows(key[None], start, jax.tree_util.tree_map(batch1, sampler), forced[None],
                index[None], batch1(noise))  # fmt: skip
    _, out, _ = decode(config, options, params, rows, state, n, draft_params)
    return Sampled(out.tokens[:, 0], out.logprobs[:, 0], jnp.sum(out.valid[:, 0], dtype=jnp.int32))
