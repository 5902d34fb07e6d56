"""Speculative decoding: a draft proposes with the same noise, the target keeps its own choices.

Reference: plain decoding of the target (`core.sample`, `generate`, `counterfactual(s)`
without a draft), which every speculative result must equal token for token, on 20 seeds and
three samplers, for a draft that agrees often (the target's int8 variant), one that agrees at
random (other weights) and the target itself (all proposals kept: the round count shows it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

import cfjax
from cfjax.core import kernel, model, scm
from cfjax.runtime import driver

N = 48
PROMPT = [3, 17, 99, 5, 200, 42, 7]
STOP = (2,)
SAMPLERS = {
    "t1": cfjax.Sampler(),
    "topp": cfjax.Sampler(temperature=0.7, top_p=0.9),
    "topk-greedy": cfjax.Sampler(temperature=0.0),
}


@pytest.fixture(scope="module")
def lm():
    c = cfjax.preset("tiny")
    return cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=4.0), model_id="tiny")


@pytest.fixture(scope="module")
def drafts(lm):
    other = model.init_params(lm.config, jax.random.key(9), scale=4.0)
    return {
        "int8": cfjax.quantize(lm, "int8"),
        "other": lm.replace(params=other, model_id="other"),
        "self": lm,
    }


def padded(prompt=PROMPT) -> np.ndarray:
    out = np.zeros((kernel.bucket_length(len(prompt)),), np.int32)
    out[: len(prompt)] = prompt
    return out


@pytest.mark.slow  # 20-60 s: in `make test-slow`, which CI runs too
def test_sample_with_a_draft_gives_the_tokens_of_plain_sampling(lm, drafts):
    """20 seeds x 3 samplers as one jit(vmap(core.sample)): speculative = plain, every draft."""
    keys = jax.random.split(jax.random.key(5), 20 * len(SAMPLERS))
    samplers = scm.stack(list(SAMPLERS.values()) * 20, lm.config.vocab_size)

    def run(draft_params, k):
        draft = None if draft_params is None else cfjax.core.Draft(lm.config, draft_params, k)
        return jax.jit(jax.vmap(lambda key, sampler: cfjax.core.sample(
            lm.config, lm.params, padded(), len(PROMPT), key, sampler, max_new_tokens=N,
            stop_tokens=STOP, draft=draft,
        )))(keys, samplers)  # fmt: skip

    plain = run(None, None)
    assert 1 < len(set(np.asarray(plain.length).tolist()))  # some rows stop early
    for draft, k in (("int8", 3), ("other", 3), ("self", 3)):
        spec = run(drafts[draft].params, k)
        np.testing.assert_array_equal(spec.tokens, plain.tokens, err_msg=f"{draft} k={k}")
        np.testing.assert_array_equal(spec.length, plain.length)
        np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4)


def _run(lm, prompts, keys, samplers, steps, draft=None, stop_tokens=STOP, **kw):
    request = driver.Request(prompts, keys, samplers, steps, **kw)
    return driver.run(lm.config, lm.params, request, stop_tokens=stop_tokens, draft=draft)


def test_a_speculative_batch_equals_the_plain_batch(lm, drafts):
    """Rows of different prompt lengths and samplers, across a chunk boundary, some stopping:
    the same tokens, log-probs and (kept) logits as the plain batch."""
    prompts = [PROMPT, [5, 6], PROMPT[:4] * 3, [11] * 20]
    keys = jax.random.split(jax.random.key(2), 4)
    samplers = [SAMPLERS["t1"], SAMPLERS["topp"], SAMPLERS["topk-greedy"], cfjax.Sampler(top_k=8)]
    stops = tuple(range(2, 12))  # frequent enough that rows stop at different steps
    plain = _run(lm, prompts, keys, samplers, 80, stop_tokens=stops, keep_logits=True)
    draft = cfjax.core.Draft(lm.config, drafts["int8"].params, 3)
    spec = _run(lm, prompts, keys, samplers, 80, draft, stop_tokens=stops, keep_logits=True)
    assert spec.tokens == plain.tokens
    assert len({len(t) for t in plain.tokens}) > 1  # some rows stop before others
    np.testing.assert_allclose(
        np.concatenate([np.asarray(r, float) for r in spec.logprobs]),
        np.concatenate([np.asarray(r, float) for r in plain.logprobs]),
        atol=1e-4,
    )
    for b, row in enumerate(plain.tokens):  # the logits of each row's own steps
        np.testing.assert_allclose(spec.logits[b, : len(row)], plain.logits[b, : len(row)], atol=1e-4)  # fmt: skip
    assert spec.rounds is not None and plain.rounds is None


def test_the_target_as_its_own_draft_keeps_every_proposal(lm, drafts):
    """Each round emits lookahead + 1 tokens (a round never crosses a chunk's end)."""
    k, steps = 3, 100
    spec = _run(lm, [PROMPT], jax.random.key(4)[None], [SAMPLERS["t1"]], steps,
                cfjax.core.Draft(lm.config, lm.params, k))  # fmt: skip
    plain = _run(lm, [PROMPT], jax.random.key(4)[None], [SAMPLERS["t1"]], steps)
    assert spec.tokens == plain.tokens
    n = len(plain.tokens[0])
    if n == steps:  # ran to the end: chunks of 64 then 36 steps
        assert spec.rounds == math.ceil(64 / (k + 1)) + math.ceil(36 / (k + 1))
    else:  # stopped early: at most one round per k + 1 tokens, plus the chunk's cut
        assert spec.rounds <= math.ceil(n / (k + 1)) + 1


@pytest.fixture(scope="module")
def tok_lm(lm, tmp_path_factory):
    from test_counterfactual import _train_spm

    return lm.replace(tokenizer=_train_spm(tmp_path_factory.mktemp("spm"), seed=0))


@pytest.mark.slow  # 20-60 s: in `make test-slow`, which CI runs too
def test_generate_and_counterfactuals_with_a_draft(tok_lm, drafts, monkeypatch):
    """generate / counterfactual(s) / interventional with `draft=` equal their plain results;
    a counterfactual of a speculative factual resumes from its stored cache (the draft catches
    up on the kept tokens) and a null intervention reproduces the factual."""
    lm, draft = tok_lm, drafts["int8"]
    kw = dict(key=3, sampler=SAMPLERS["topp"], max_new_tokens=N, chat=False, stop_tokens=STOP)
    fact = cfjax.generate(lm, "the captain sailed", **kw)
    fact_spec = cfjax.generate(lm, "the captain sailed", draft=draft, lookahead=3, **kw)
    assert fact_spec.tokens == fact.tokens and len(fact.tokens) > 12
    ivs = [
        cfjax.ReplaceTokens(5, [(fact.tokens[5] + 7) % 250 + 3]),
        cfjax.ReplaceTokens(10, [fact.tokens[10]]),  # null
        cfjax.ChangeSampler(temperature=1.0),
    ]
    runs = []  # the `Decoded` of each driver run from here on
    real = driver.run
    monkeypatch.setattr(driver, "run", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    again = cfjax.generate(lm, "the captain sailed", draft=draft, lookahead=3, **kw)
    assert again.tokens == fact.tokens
    # The int8 draft agrees with its target on most steps: far fewer rounds than tokens.
    assert runs[-1].rounds < len(fact.tokens) / 2
    plain = cfjax.counterfactuals(lm, fact, ivs)
    spec = cfjax.counterfactuals(lm, fact_spec, ivs, draft=draft, lookahead=3)
    assert [t.tokens for t in spec] == [t.tokens for t in plain]
    assert spec[1].tokens == fact.tokens
    assert runs[-1].resumed  # the speculative factual's cache served the speculative rows
    fresh = cfjax.interventional(lm, fact, ivs[0], key=11)
    assert cfjax.interventional(lm, fact, ivs[0], key=11, draft=draft).tokens == fresh.tokens


def test_draft_errors(lm):
    with pytest.raises(ValueError, match="lookahead"):
        cfjax.core.Draft(lm.config, lm.params, 0)
    other_vocab = dataclasses.replace(lm.config, vocab_size=128)
    draft = cfjax.LM(
        other_vocab, model.init_params(other_vocab, jax.random.key(1)), model_id="v128"
    )
    with pytest.raises(ValueError, match="share the vocabulary"):
        cfjax.generate(lm, PROMPT, max_new_tokens=4, draft=draft)


def test_speculative_rounds_match_a_transcription(lm, drafts):
    """One round by hand with numpy: the draft's Gumbel-max proposals with the step's noise,
    the target's choices from a full forward of prompt + proposals, kept up to the first
    disagreement; the engine's first tokens and round count agree."""
    k, sampler = 3, SAMPLERS["t1"]
    key = jax.random.key(6)
    draft = drafts["int8"]
    tokens = list(PROMPT)
    proposals = []
    for j in range(k):  # the draft's proposals, step by step with its own full forward
        z = np.asarray(cfjax.forward(draft, [tokens + proposals]))[0, -1]
        g = np.asarray(scm.noise(key, j, lm.config.vocab_size))
        proposals.append(int(np.argmax(z + g)))
    z = np.asarray(cfjax.forward(lm, [tokens + proposals]))[0, len(tokens) - 1 :]
    chosen = [
        int(np.argmax(z[j] + np.asarray(scm.noise(key, j, lm.config.vocab_size))))
        for j in range(k + 1)
    ]
    kept = next((j for j in range(k) if chosen[j] != proposals[j]), k)
    spec = _run(lm, [PROMPT], key[None], [sampler], kept + 1, cfjax.core.Draft(lm.config, draft.params, k))  # fmt: skip
    assert spec.tokens[0][: kept + 1] == chosen[: kept + 1]
    assert spec.rounds == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculative_is_plain_bit_for_bit(lm, dtype):
    """The scoring pass of k + 1 tokens rounds every position as the one-token step does, by
    construction (the batch-invariant arithmetic, `core.invariant`): tokens and log-probs are
    bit-identical to plain decoding in both dtypes (an H200 run had 1 flip in 256 in bf16)."""
    target = lm if dtype == "float32" else cfjax.quantize(lm, "bfloat16")
    prompts = [PROMPT, [5, 6], [11] * 20]
    run = lambda **kw: cfjax.generate(target, prompts, key=4, chat=False, sampler=cfjax.Sampler(0.9), max_new_tokens=40, **kw)  # noqa: E731  # fmt: skip
    plain, spec = run(), run(draft=cfjax.quantize(target, "int8"), lookahead=3)
    for a, b in zip(plain, spec, strict=True):
        assert a.tokens == b.tokens
        assert np.asarray(a.logprobs).tobytes() == np.asarray(b.logprobs).tobytes()
