"""`generate`: factual generation from text or token prompts, returning replayable `Trace`s."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cfjax.causal.trace import Prompt, Trace, new_trace, text_of
from cfjax.core import speculative
from cfjax.core.checks import count
from cfjax.core.kernel import DEFAULT_CHUNK
from cfjax.core.scm import Sampler
from cfjax.runtime import driver
from cfjax.runtime.lm import LM
from cfjax.runtime.request import check_request, is_batch, row_keys, stop_tokens_of

# Steps between the pieces of text `stream` receives: the chunk's program runs on a shifted
# window of its inputs, so streaming changes no token (see `driver.run`'s `report_every`).
STREAM_EVERY = 4


class _Streamer:
    """Prints row 0's text as chunks arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, lm: LM, stop_tokens: Sequence[int], emit: Callable[[str], None]):
        self.lm, self.stop_tokens, self.emit, self.sent = lm, stop_tokens, emit, 0

    def __call__(self, rows: list[list[int]]) -> None:
        text = text_of(self.lm, rows[0], self.stop_tokens).rstrip("\ufffd")
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
    sampler: Sampler | Sequence[Sampler] | None = None,
    max_new_tokens: int = 128,
    chat: bool = True,
    system: str | None = None,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK,
    stream: Callable[[str], None] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Trace | list[Trace]:
    """Sample a response; a batch of prompts returns one `Trace` per row.

    `key` is an int seed, a key, or one key per row (a single key for a batch is split into
    one key per row). Each row's noise depends only on its own key and the step. `sampler` is
    one sampler or one per row (rows of one mechanism share the batch). `stream(text)` receives
    row 0's text as it is produced (every `STREAM_EVERY` steps; the same tokens). The final KV
    cache is kept in `lm.caches` (bounded), so that a counterfactual of these traces skips the
    steps before its edit.

    `draft`: a model of the same vocabulary (e.g. `cfjax.quantize(lm, "int8")`, or a smaller
    one) that proposes `lookahead` tokens per round with the same noise; `lm` scores them in
    one pass and keeps its own choice (see `core.speculative`): the tokens of plain decoding.
    """
    max_new_tokens = count(max_new_tokens)
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a function of the new text, got {stream!r:.60}")
    batch = is_batch(prompt)
    prompts = [Prompt.of(lm, p, chat=chat, system=system) for p in (prompt if batch else [prompt])]
    traces = sample_rows(
        lm, prompts, row_keys(key, len(prompts)), _samplers(sampler, len(prompts)),
        max_new_tokens, stop_tokens=stop_tokens, chunk=chunk, stream=stream, draft=draft,
        lookahead=lookahead,
    )  # fmt: skip
    return traces if batch else traces[0]


def sample_rows(
    lm: LM,
    prompts: list[Prompt],
    keys: Any,
    samplers: list[Sampler],
    max_new_tokens: int,
    *,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK,
    stream: Callable[[str], None] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> list[Trace]:
    """One factual batch: row b samples a response to `prompts[b]` with noise key `keys[b]`
    (checked prompts, the cache kept for counterfactuals); `generate`'s engine."""
    check_request(lm, [p.tokens for p in prompts], max_new_tokens)
    stops = stop_tokens_of(lm, stop_tokens)
    streamer = _Streamer(lm, stops, stream) if stream else None
    request = driver.Request([p.tokens for p in prompts], keys, samplers, max_new_tokens)
    out = driver.run(
        lm.config, lm.params, request, stop_tokens=stops, chunk=chunk, on_chunk=streamer,
        draft=draft_for(lm, draft, lookahead), report_every=STREAM_EVERY if stream else None,
        pad_rows=lm.pad_batch,
    )  # fmt: skip
    lm.caches.keep(lm.params, out, [(p.tokens, t) for p, t in zip(prompts, out.tokens, strict=True)])  # fmt: skip
    traces = [
        new_trace(
            lm,
            p,
            out.tokens[b],
            out.logprobs[b],
            key=keys[b],
            sampler=samplers[b],
            max_new_tokens=max_new_tokens,
            stop_tokens=stops,
        )  # fmt: skip
        for b, p in enumerate(prompts)
    ]
    if streamer is not None:
        streamer.finish(traces[0].text)
    return traces


def draft_for(lm: LM, draft: LM | None, lookahead: int) -> speculative.Draft | None:
    """The engine's draft of `draft` for `lm` (checked to share its vocabulary), or None."""
    if draft is None:
        return None
    if not isinstance(draft, LM):
        raise TypeError(f"draft must be a loaded model (cfjax.load or cfjax.quantize), not a {type(draft).__name__}")  # fmt: skip
    if draft.config.vocab_size != lm.config.vocab_size:
        raise ValueError(
            f"draft {draft.model_id or 'model'} has {draft.config.vocab_size} tokens, "
            f"{lm.model_id or 'the model'} {lm.config.vocab_size}: a draft must share the vocabulary"
        )
    return speculative.Draft(draft.config, draft.params, lookahead)


def _samplers(sampler: Sampler | Sequence[Sampler] | None, batch: int, each: str = "row") -> list[Sampler]:  # fmt: skip
    if sampler is None:
        return [Sampler()] * batch
    if isinstance(sampler, Sampler):
        return [sampler] * batch
    samplers = list(sampler) if isinstance(sampler, (list, tuple)) else [sampler]
    if len(samplers) != batch or not all(isinstance(s, Sampler) for s in samplers):
        raise ValueError(f"sampler: give one Sampler or one per {each} ({batch}), got {sampler!r}")
    return samplers
