"""`generate`: factual generation from text or token prompts, returning replayable `Trace`s."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cfjax.causal.trace import Trace
from cfjax.core import engine, speculative
from cfjax.core.lm import LM
from cfjax.core.request import check_request, count, is_batch, prompt_tokens, row_keys
from cfjax.core.scm import Sampler
from cfjax.core.store import Stored


def text_of(lm: LM, tokens: list[int], stop_tokens: Sequence[int]) -> str:
    """The response text: tokens decoded without a final stop token ("" without a tokenizer)."""
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
    chunk: int = engine.DEFAULT_CHUNK,
    stream: Callable[[str], None] | None = None,
    draft: LM | None = None,
    lookahead: int = speculative.DEFAULT_LOOKAHEAD,
) -> Trace | list[Trace]:
    """Sample a response; a batch of prompts returns one `Trace` per row.

    `key` is an int seed, a key, or one key per row (a single key for a batch is split into
    one key per row). Each row's noise depends only on its own key and the step. `sampler` is
    one sampler or one per row (rows of one mechanism share the batch). `stream(text)` receives
    row 0's text as it is produced. The final KV cache is kept in `lm.caches` (bounded), so
    that a counterfactual of these traces skips the steps before its edit.

    `draft`: a model of the same vocabulary (e.g. `cfjax.quantize(lm, "int8")`, or a smaller
    one) that proposes `lookahead` tokens per round with the same noise; `lm` scores them in
    one pass and keeps its own choice (see `core.speculative`): the tokens of plain decoding.
    """
    max_new_tokens = count(max_new_tokens)
    batch = is_batch(prompt)
    prompts_in = list(prompt) if batch else [prompt]
    prompts = [prompt_tokens(lm, p, chat=chat, system=system) for p in prompts_in]
    check_request(lm, prompts, max_new_tokens)
    keys = row_keys(key, len(prompts))
    samplers = _samplers(sampler, len(prompts))
    if stop_tokens is None:
        stop_tokens = tuple(lm.tokenizer.stop_tokens) if lm.tokenizer is not None else ()
    stop_tokens = tuple(int(t) for t in stop_tokens)

    streamer = _Streamer(lm, stop_tokens, stream) if stream else None
    request = engine.Request(prompts, keys, samplers, max_new_tokens)
    out = engine.run(
        lm.config, lm.params, request, stop_tokens=stop_tokens, chunk=chunk, on_chunk=streamer,
        draft=draft_for(lm, draft, lookahead),
    )  # fmt: skip
    lm.caches.put(
        Stored(out.cache, out.start, out.bucket, chunk, lm.params),
        list(zip(prompts, out.tokens, strict=True)),
    )
    traces = [
        Trace(
            model_id=lm.model_id,
            prompt_tokens=prompts[b],
            tokens=out.tokens[b],
            key=keys[b],
            sampler=samplers[b],
            max_new_tokens=max_new_tokens,
            noise_index=list(range(len(out.tokens[b]))),
            logprobs=out.logprobs[b],
            text=text_of(lm, out.tokens[b], stop_tokens),
            prompt=prompts_in[b] if isinstance(prompts_in[b], str) else None,
            system=system if isinstance(prompts_in[b], str) else None,
            chat=chat and isinstance(prompts_in[b], str),
            stop_tokens=stop_tokens,
        )
        for b in range(len(prompts))
    ]
    if streamer is not None:
        streamer.finish(traces[0].text)
    return traces if batch else traces[0]


def draft_for(lm: LM, draft: LM | None, lookahead: int) -> speculative.Draft | None:
    """The engine's draft of `draft` for `lm` (checked to share its vocabulary), or None."""
    if draft is None:
        return None
    if draft.config.vocab_size != lm.config.vocab_size:
        raise ValueError(
            f"draft {draft.model_id or 'model'} has {draft.config.vocab_size} tokens, "
            f"{lm.model_id or 'the model'} {lm.config.vocab_size}: a draft must share the vocabulary"
        )
    return speculative.Draft(draft.config, draft.params, lookahead)


def _samplers(sampler: Sampler | Sequence[Sampler] | None, batch: int) -> list[Sampler]:
    if sampler is None:
        return [Sampler()] * batch
    if isinstance(sampler, Sampler):
        return [sampler] * batch
    samplers = list(sampler)
    if len(samplers) != batch or not all(isinstance(s, Sampler) for s in samplers):
        raise ValueError(f"sampler: give one Sampler or one per row ({batch}), got {sampler!r}")
    return samplers
