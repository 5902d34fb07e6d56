"""A counterfactual plan, and the edits interventions make to it.

A plan says what the counterfactual world looks like: its prompt, sampler and params, and the
response prefix that is forced (factual tokens kept before the edit, then the edited span).
Sampling resumes after the forced prefix (counterfactual step `m`) with the factual noise of
step `r` (DESIGN.md §2), where `r` is by default the factual step right after the edited span.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cfjax.causal.trace import Trace
from cfjax.core import quant, scm, steering
from cfjax.core.checks import as_key
from cfjax.core.kernel import bucket_length
from cfjax.runtime.lm import LM, forward
from cfjax.runtime.request import padded


@dataclasses.dataclass
class Plan:
    """A counterfactual world: prompt, sampler, params and the forced response prefix."""

    prompt_tokens: list[int]
    sampler: scm.Sampler
    params: Any
    forced: list[int]  # response tokens forced at steps [0, m)
    edit_start: int  # s: first response step whose token may differ from the factual one
    aligned_to: int  # r: factual step whose noise the first sampled step uses
    prompt_changed: bool = False
    model_id: str = ""
    # The text the prompt tokens were made from (None for token ids), kept true to them.
    prompt: str | None = None
    system: str | None = None
    chat: bool = False
    history: list[dict] | None = None  # a conversation's earlier turns, rendered before prompt
    records: list[dict] = dataclasses.field(default_factory=list)
    # For each forced step, the factual step its kept token was copied from (None: edited token).
    forced_from: list[int | None] = dataclasses.field(default_factory=list)
    # Collected while the interventions edit the plan: response edits (factual start, factual
    # end, new tokens) and steerings.
    edits: list[tuple[int, int, list[int]]] = dataclasses.field(default_factory=list)
    steers: list = dataclasses.field(default_factory=list)

    @property
    def resume_at(self) -> int:
        """m: the counterfactual step where sampling resumes."""
        return len(self.forced)


def _response_text(lm: LM, trace: Trace) -> tuple[str, list[int]]:
    if lm.tokenizer is None:
        raise ValueError("a text edit needs a tokenizer: this model has none")
    body = trace.tokens[:-1] if trace.stopped else trace.tokens
    return lm.tokenizer.decode(body), body


def _find(text: str, needle: str, occurrence: int) -> tuple[int, int]:
    """The `occurrence`-th (>= 1) match of `needle` (non-empty: the text edits check both)."""
    at = -1
    for _ in range(occurrence):
        at = text.find(needle, at + 1)
        if at < 0:
            found = text.count(needle)
            raise ValueError(
                f"text {needle!r} occurs {found} time(s) in the response, not {occurrence}"
            )
    return at, at + len(needle)


def text_edit(lm: LM, trace: Trace, old: str, new: str, occurrence: int):
    """(factual start, factual end, new tokens) for replacing a character span's tokens."""
    from cfjax.tokenizer import token_char_spans

    tok = lm.tokenizer
    text, body = _response_text(lm, trace)
    a, b = _find(text, old, occurrence)
    spans = token_char_spans(tok, body)
    ts = next(i for i, (_, e) in enumerate(spans) if e > a)
    te = next((i for i, (s, _) in enumerate(spans) if s >= b), len(body))
    c1 = spans[te - 1][1]
    if text[spans[ts][0] : c1] == text[spans[ts][0] : a] + new + text[b:c1]:
        # Unchanged text keeps its tokens even if the model produced a non-canonical tokenization.
        return ts, te, list(body[ts:te])
    # `encode` tokenizes text as a document start: sentencepiece-style tokenizers prepend a
    # dummy-prefix space, which mid-response would be a real extra space. Keep the candidate whose
    # decoded response reads exactly as the edited text; if none fits, widen the span to the left
    # (at a word start, or at the response start where decode drops that space, one fits).
    for start in range(ts, -1, -1):
        c0 = spans[start][0]
        edited = text[c0:a] + new + text[b:c1]
        candidates = [tok.encode(edited)]
        if edited.startswith(" "):
            candidates.append(tok.encode(edited[1:]))
        for cand in candidates:
            if tok.decode(body[:start] + list(cand)) == text[:c0] + edited:
                return start, te, list(cand)
    raise ValueError(
        f"cannot re-tokenize the edited text {text[spans[ts][0] : a] + new + text[b:c1]!r} so "
        "that the response decodes to it"
    )


def step_log_probs(lm: LM, trace: Trace, position: int, top_p: float | None = None) -> jax.Array:
    """Log-probabilities `[V]` of response step `position` given the factual prefix, at the
    trace's temperature (a greedy trace's point mass replaced by the model's own τ = 1) and,
    if given, within the top-p set."""
    # Right-padded to its bucket (a causal forward: padding after a position changes nothing
    # before it), so that many positions share a few compilations.
    seq = trace.prompt_tokens + trace.tokens[:position]
    tokens = padded([seq], min(bucket_length(len(seq)), lm.config.max_seq_len))[0]
    logits = forward(lm, tokens)[0, len(seq) - 1]
    sampler = scm.Sampler(temperature=trace.sampler.temperature or 1.0, top_p=top_p)
    return scm.log_probs(logits, sampler)


def auto_edit(lm: LM, trace: Trace, pos: int, top_p: float, seed: int) -> tuple[int, int, list[int]]:  # fmt: skip
    """The paper's automatic intervention at `pos`: a different token drawn from the top-p set
    of the factual distribution, with the intervention's own randomness (`seed`)."""
    token = other_token(step_log_probs(lm, trace, pos, top_p), trace.tokens[pos], seed, pos)
    if token is None:
        raise ValueError(
            f"AutoIntervention at position {pos}: the top-p {top_p} set holds only the "
            f"factual token {trace.tokens[pos]}; no other token to choose"
        )
    return pos, pos + 1, [token]


def other_token(logp: jax.Array, factual: int, seed: int, index: int) -> int | None:
    """A token other than `factual` drawn from the log-probabilities `logp` with the
    intervention's own randomness (`fold_in(key(seed), index)`); None when `logp` leaves no
    other token any mass."""
    logp = logp.at[factual].set(-jnp.inf)
    if not bool(jnp.isfinite(logp).any()):
        return None
    return int(jax.random.categorical(jax.random.fold_in(as_key(seed), index), logp))


def check_params(lm: LM, params: Any) -> Any:
    if isinstance(params, LM):
        if params.config != lm.config:
            raise ValueError("ChangeModel: the other model has a different config")
        ours, theirs = lm.tokenizer, params.tokenizer
        if (
            theirs is not None
            and ours is not None
            and (getattr(theirs, "spec", None) != getattr(ours, "spec", None))
        ):
            raise ValueError(
                "ChangeModel: the other model has a different tokenizer "
                f"({getattr(theirs, 'spec', '?')} vs {getattr(ours, 'spec', '?')}); a "
                "counterfactual must keep the token space"
            )
        params = params.params
    # Compared as the network sees them: a quantized or steered variant is the same model.
    effective = lambda p: jax.eval_shape(lambda q: quant.dequantize(steering.split(q)[0]), p)  # noqa: E731
    ours, theirs = effective(lm.params), effective(params)
    if jax.tree_util.tree_structure(theirs) != jax.tree_util.tree_structure(ours):
        raise ValueError("ChangeModel: params do not have the structure of the model's params")
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(ours)[0],
        jax.tree_util.tree_leaves(theirs),
        strict=True,
    ):
        if a.shape != b.shape:
            raise ValueError(
                f"ChangeModel: param {jax.tree_util.keystr(path)} has shape {b.shape}, "
                f"expected {a.shape}"
            )
    return params


def check_position(position: int, n: int) -> None:
    if not 0 <= position < n:
        raise ValueError(f"position {position} is outside the response: positions are 0 to {n - 1}")


def force(trace: Trace, p: Plan) -> None:
    """The forced prefix of the plan's response edits: everything from the first edit to the
    last (kept tokens between edits too), where sampling resumes, and the factual step each
    forced token comes from."""
    if not p.edits:
        return
    # By span, so the order the edits are given in never matters: an insertion at a token's
    # position goes before that token's replacement; two insertions at one position have no
    # order, and overlapping spans no meaning.
    edits = sorted(p.edits, key=lambda e: (e[0], e[1]))
    for (a, end, _), (start, b, _) in zip(edits, edits[1:], strict=False):
        if start < end or a == end == start == b:
            raise ValueError(f"two response edits overlap (tokens {a}..{end} and {start}..{b}); give them as one edit")  # fmt: skip
    forced = list(trace.tokens[: edits[0][0]])
    sources: list[int | None] = list(range(edits[0][0]))
    for i, (start, end, new) in enumerate(edits):
        forced += new
        # A same-length edit that leaves a token as it was keeps that token's noise.
        same = len(new) == end - start
        sources += [start + o if same and t == trace.tokens[start + o] else None for o, t in enumerate(new)]  # fmt: skip
        nxt = edits[i + 1][0] if i + 1 < len(edits) else end
        forced += trace.tokens[end:nxt]
        sources += list(range(end, nxt))
    p.forced, p.edit_start, p.aligned_to = forced, edits[0][0], edits[-1][1]
    p.forced_from = sources
