"""`abduct`: counterfactuals of observed text (a human's answer, a logged chat, another system's
output), through posterior (hindsight) Gumbel noise for any temperature, top-k and top-p.

The observed response is scored once, with its tokens forced through the same decode step that
replay uses, which gives the logits of every observed step. Each posterior sample is then just a
key: the decode loop draws its noise from the posterior of the observed step it aligns to
(`core.posterior.step_noise`), so `num_samples` samples cost one scoring pass and one `[S, V]`
array, and their counterfactuals run as one batch. The returned traces are ordinary traces:
`counterfactual(s)`, `interventional`, the CLI and JSON take them, and a trace records how its
noise is made (the abduction key, the observed prompt and tokens, the abduction sampler), so
that replay in another process (which scores the text again) reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.causal.trace import Prompt, Trace, key_from_list, key_to_list, new_trace
from cfjax.core import scm
from cfjax.core.checks import check_tokens, count
from cfjax.core.kernel import DEFAULT_CHUNK
from cfjax.core.posterior import Observed, step_noise
from cfjax.core.scm import Sampler
from cfjax.runtime import driver
from cfjax.runtime.lm import LM
from cfjax.runtime.request import check_request, padded, row_keys, stop_tokens_of


@dataclasses.dataclass(frozen=True)
class Observation:
    """Observed text scored once: the sampler's masked logits of each step and the log-probs."""

    z: jax.Array  # [S, V] f32, -inf outside the abduction sampler's support
    logprobs: list[float]

    @property
    def nbytes(self) -> int:
        """Device bytes held."""
        return self.z.nbytes


@jax.jit
def _sampler_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
    # Traced sampler values, as inside the decode step, so that the masked logits are the bits
    # the step computes from the same logits.
    return jax.vmap(scm.sampler_logits, in_axes=(0, None))(logits, sampler)


def observe(
    lm: LM,
    prompt: Sequence[int],
    tokens: Sequence[int],
    sampler: Sampler,
    *,
    stop_tokens: Sequence[int],
    cache_steps: int,
    chunk: int | None = None,
) -> Observation:
    """Score `tokens` after `prompt` with `lm.params` (kept in `lm.observations`).

    The forced run also leaves its KV cache in `lm.caches`, sized for `cache_steps`, so that a
    counterfactual of the observed text skips the steps before its edit.
    """
    prompt, tokens = [int(t) for t in prompt], [int(t) for t in tokens]
    store_key = (tuple(prompt), tuple(tokens), sampler)
    found = lm.observations.get(lm.params, store_key)
    if found is not None:
        return found
    request = driver.Request(
        [prompt],
        jax.random.key(0)[None],  # unused: every step is forced
        [sampler],
        len(tokens),
        forced=np.asarray([tokens], np.int32),
        keep_logits=True,
        cache_steps=cache_steps,
    )
    out = driver.run(lm.config, lm.params, request, stop_tokens=stop_tokens, chunk=chunk)
    stacked = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x[0]), scm.stack([sampler], lm.config.vocab_size)
    )
    z = _sampler_logits(jnp.asarray(out.logits[0]), stacked)
    _check_support(lm, np.asarray(out.logits[0]), np.asarray(z), tokens, sampler)
    lm.caches.keep(lm.params, out, [(prompt, tokens)])
    found = Observation(z, out.logprobs[0])
    lm.observations.put(lm.params, store_key, found)
    return found


def _check_support(lm: LM, logits, z, tokens: list[int], sampler: Sampler) -> None:
    steps = np.arange(len(tokens))
    outside = ~np.isfinite(z[steps, tokens])
    if sampler.greedy:
        outside |= np.argmax(logits, axis=-1) != np.asarray(tokens)
    if outside.any():
        s = int(np.flatnonzero(outside)[0])
        shown = f" ({lm.tokenizer.decode([tokens[s]])!r})" if lm.tokenizer is not None else ""
        raise ValueError(
            f"observed token {tokens[s]}{shown} at response step {s} is outside the support of "
            f"{_describe(sampler)}; abduct with full_support=True (cfjax abduct --full-support) to model the observed steps "
            "with temperature alone"
        )


def _describe(s: Sampler) -> str:
    parts = [f"temperature {s.temperature:g}"]
    parts += [f"top-k {s.top_k}"] if s.top_k is not None else []
    parts += [f"top-p {s.top_p:g}"] if s.top_p is not None else []
    return "the sampler (" + ", ".join(parts) + ")"


def _response_tokens(lm: LM, response: str | Sequence[int]) -> list[int]:
    if isinstance(response, str):
        if lm.tokenizer is None:
            raise ValueError("a text response needs a tokenizer: this model has none; pass ids")
        if not response:
            raise ValueError("the observed response is empty")
        tokens = list(lm.tokenizer.encode(response))
        back = lm.tokenizer.decode(tokens)
        if back != response:
            at = next(
                (i for i, (a, b) in enumerate(zip(back, response, strict=False)) if a != b),
                min(len(back), len(response)),
            )
            raise ValueError(
                f"the tokenizer cannot round-trip the observed response: decoded back it reads "
                f"{back[max(0, at - 10) : at + 10]!r} where the text has "
                f"{response[max(0, at - 10) : at + 10]!r} (character {at})"
            )
        return tokens
    tokens = [int(t) for t in response]
    if not tokens:
        raise ValueError("the observed response is empty")
    check_tokens(np.asarray(tokens), lm.config.vocab_size, "the observed response")
    return tokens


def _abduction_sampler(requested: Sampler, full_support: bool) -> Sampler:
    """The sampler the observed world is modelled with: the one asked for, or with
    `full_support` its temperature alone."""
    if not isinstance(requested, Sampler):
        raise TypeError(f"sampler must be a Sampler, got {requested!r}")
    if requested.mechanism != "gumbel":
        raise ValueError(
            f"abduction needs the 'gumbel' mechanism (noise per token id), not {requested.mechanism!r}"
        )
    if not full_support:
        return requested
    if requested.greedy:
        raise ValueError("full_support needs a temperature > 0: greedy has one token only")
    return Sampler(requested.temperature)


def _check_observed(lm: LM, prompt: list[int], observed: list[int], stop_tokens, max_new_tokens) -> int:  # fmt: skip
    """The steps the abducted traces allow (default: the observed length), after checking that
    the observed response ends at its first stop token and fits the model."""
    early = [i for i, t in enumerate(observed[:-1]) if t in stop_tokens]
    if early:
        raise ValueError(
            f"the observed response has stop token {observed[early[0]]} at step {early[0]}, "
            "before its end: a response ends at its first stop token"
        )
    steps = len(observed) if max_new_tokens is None else count(max_new_tokens)
    if steps < len(observed):
        raise ValueError(
            f"max_new_tokens {max_new_tokens!r} is below the observed response's "
            f"{len(observed)} tokens"
        )
    try:
        check_request(lm, [prompt], steps)
    except ValueError as e:
        raise ValueError(f"the observed response does not fit: {e}") from None
    return steps


def abduct(
    lm: LM,
    prompt: str | Sequence[int],
    response: str | Sequence[int],
    *,
    key: Any,
    sampler: Sampler | None = None,
    num_samples: int = 1,
    full_support: bool = False,
    max_new_tokens: int | None = None,
    chat: bool = True,
    system: str | None = None,
    stop_tokens: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> list[Trace]:
    """`num_samples` posterior samples of the world in which `lm` wrote `response` to `prompt`.

    `prompt` is text (chat-templated like `generate`) or token ids; `response` text (encoded
    as is, no stop token added) or token ids. Sample `s` has key `row_keys(key, n)[s]`, split
    into the trace key (prior noise: steps after the observed text and tokens outside a step's
    support) and the abduction key (the posterior draw). Each trace's response is the observed
    one; an intervention on it (`counterfactual(s)`) shows what the model would have written
    instead. An observed token outside the sampler's support is an error, unless
    `full_support`: then the observed world is modelled with temperature alone (the traces'
    sampler has no truncation, and `posterior["requested_sampler"]` records the one asked for).
    `max_new_tokens` (default: the observed length) bounds the counterfactuals' responses.
    """
    requested = Sampler() if sampler is None else sampler
    sampler = _abduction_sampler(requested, full_support)
    num_samples = count(num_samples, "num_samples")
    given = Prompt.of(lm, prompt, chat=chat, system=system)
    prompt_ids = given.tokens
    observed = _response_tokens(lm, response)
    stop_tokens = stop_tokens_of(lm, stop_tokens)
    steps = _check_observed(lm, prompt_ids, observed, stop_tokens, max_new_tokens)
    obs = observe(
        lm, prompt_ids, observed, sampler, stop_tokens=stop_tokens, cache_steps=steps, chunk=chunk
    )
    record = {
        "prompt_tokens": prompt_ids,
        "tokens": observed,
        "sampler": sampler.to_dict(),
        "full_support": bool(full_support),
    }
    if full_support:
        record["requested_sampler"] = requested.to_dict()
    traces = []
    for k in row_keys(key, num_samples):
        trace_key, abduction_key = jax.random.split(k)
        traces.append(new_trace(lm, given, observed, obs.logprobs, key=trace_key, sampler=sampler,
                                max_new_tokens=steps, stop_tokens=stop_tokens,
                                posterior={"key": key_to_list(abduction_key), **record}))  # fmt: skip
    return traces


def observed_steps(
    lm: LM, traces: Sequence[Trace], *, cache_steps: int, chunk: int | None
) -> Observed | None:
    """The `Observed` of a batch of rows (None when no row is abducted); rows share the
    `[S, V]` logits of their observation, scored again if no longer kept."""
    if all(t.posterior is None for t in traces):
        return None
    groups: dict[tuple, int] = {}
    found: list[tuple[Observation, list[int]]] = []
    rows, keys = [], []
    for t in traces:
        p = t.posterior
        if p is None:
            rows.append(-1)
            keys.append(jax.random.key(0))
            continue
        ident = (tuple(p["prompt_tokens"]), tuple(p["tokens"]), repr(p["sampler"]))
        if ident not in groups:
            obs = observe(
                lm, p["prompt_tokens"], p["tokens"], Sampler.from_dict(p["sampler"]),
                stop_tokens=t.stop_tokens, cache_steps=cache_steps, chunk=chunk,
            )  # fmt: skip
            groups[ident] = len(found)
            found.append((obs, p["tokens"]))
        rows.append(groups[ident])
        keys.append(key_from_list(p["key"]))
    longest = max(len(tokens) for _, tokens in found)
    pad = lambda z: jnp.pad(z, ((0, longest - z.shape[0]), (0, 0)))  # noqa: E731
    z = found[0][0].z[None] if len(found) == 1 else jnp.stack([pad(o.z) for o, _ in found])
    tokens, lengths = padded([toks for _, toks in found], longest)
    return Observed(
        z=z,
        tokens=jnp.asarray(tokens),
        length=jnp.asarray(lengths),
        row=jnp.asarray(rows, jnp.int32),
        key=jnp.stack(keys),
    )


def posterior_noise(lm: LM, traces: Sequence[Trace]) -> jax.Array:
    """f32 `[B, S, V]`: the noise each abducted trace uses at its observed steps 0..S-1, drawn
    by the function the decode loop calls (for inspection; replay never materialises it)."""
    observed = observed_steps(lm, traces, cache_steps=max(t.max_new_tokens for t in traces),
                              chunk=None)  # fmt: skip
    if observed is None:
        raise ValueError("no trace was abducted: their noise is the prior noise(key, step)")
    keys = jnp.stack([t.key for t in traces])
    s = int(observed.tokens.shape[1])
    f = jax.jit(jax.vmap(lambda i: step_noise(observed, keys, jnp.full(keys.shape, i))))
    return jnp.swapaxes(f(jnp.arange(s, dtype=jnp.int32)), 0, 1)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Distinct texts with their counts (most frequent first), and a containment share."""

    counts: list[tuple[str, int]]
    total: int
    contains: str | None = None
    share: float | None = None  # of the samples whose text contains `contains`

    def __str__(self) -> str:
        lines = [f"{n:>5}  {text!r}" for text, n in self.counts]
        if self.contains is not None:
            lines.append(f"{self.share:.1%} of {self.total} contain {self.contains!r}")
        return "\n".join(lines)


def summarize(traces: Sequence[Trace], *, contains: str | None = None) -> Summary:
    """Count the distinct texts of `traces` (ties in count by text), and the share containing
    `contains`."""
    traces = list(traces)
    if not traces:
        raise ValueError("summarize needs at least one trace")
    bad = next((t for t in traces if not isinstance(t, Trace)), None)
    if bad is not None:
        raise TypeError(f"summarize takes Traces, got a {type(bad).__name__}")
    if contains is not None and not isinstance(contains, str):
        raise TypeError(f"contains must be a text, got {contains!r:.60}")
    counts: dict[str, int] = {}
    for t in traces:
        counts[t.text] = counts.get(t.text, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    share = None
    if contains is not None:
        share = sum(contains in t.text for t in traces) / len(traces)
    return Summary(ordered, len(traces), contains, share)
