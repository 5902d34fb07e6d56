"""Counterfactual engine (issue 6): interventions, noise alignment, cache reuse, batches, JSON.

The references are independent of the engine: logits come from a full causal `cfjax.forward` (no
KV cache, no decode scan), sampler masks are computed in numpy, and each step's noise is drawn
directly as `jax.random.gumbel(jax.random.fold_in(key, idx), (V,), float32)` (DESIGN.md §2).

One tiny model, one trained sentencepiece tokenizer, and few shapes (batch 1 and 2, 48 steps run
in chunks of 16), so every jitted function compiles once or twice.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
from conftest import ref_keep

import cfjax
import cfjax.tokenizer
from cfjax.causal.factual import generate
from cfjax.causal.interventions import (
    AutoIntervention,
    ChangeModel,
    ChangeSampler,
    DeleteText,
    EditPrompt,
    InsertText,
    ReplaceText,
    ReplaceTokens,
    plan,
)
from cfjax.causal.replay import counterfactual, counterfactuals, interventional, interventionals
from cfjax.causal.trace import Trace
from cfjax.core import scm
from cfjax.core.model import init_params
from cfjax.core.scm import Sampler
from cfjax.runtime import driver

CHUNK = 16
STEPS = 48
SAMPLER = Sampler(temperature=1.0, top_k=64, top_p=0.9)
PROMPT = "the captain sailed"
REF_LEN = 128  # reference forwards are padded to one length, so they compile once
NEW_WORD = "Alicia"  # encodes to several tokens with the test tokenizer (a count-changing edit)
WORDS = (
    "the captain sailed across a calm sea with her crew and small dog named Alice who loved fish "
    "bread Bob ship storm island night morning wind wave harbor sailor anchor lighthouse gold map "
    "treasure old young brave quiet loud found lost into under over through against"
).split()


def _train_spm(folder, seed: int):
    """A 256-piece BPE sentencepiece model (the tiny preset's vocabulary size), Llama 2 style."""
    rng = np.random.default_rng(seed)
    lines = [
        " ".join(rng.choice(WORDS, 12)) + rng.choice([".", ",", "!", "?"]) for _ in range(2000)
    ]
    (folder / "corpus.txt").write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tok"),
        vocab_size=256,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    tok = cfjax.tokenizer.load(folder / "tok.model")
    assert tok.vocab_size == 256
    return tok


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _train_spm(tmp_path_factory.mktemp("spm"), seed=0)


@pytest.fixture(scope="module")
def lm(tok):
    config = cfjax.preset("tiny")
    params = init_params(config, jax.random.key(0), scale=4.0)
    return cfjax.LM(config, params, model_id="tiny").replace(tokenizer=tok)


def _generate(lm, key, max_new_tokens=STEPS):
    tr = generate(
        lm,
        PROMPT,
        key=key,
        sampler=SAMPLER,
        max_new_tokens=max_new_tokens,
        chat=False,
        chunk=CHUNK,
    )
    assert len(tr.tokens) == max_new_tokens, "fixture: the factual response stopped early"
    return tr


@pytest.fixture(scope="module")
def fact(lm):
    return _generate(lm, 3)


@pytest.fixture(scope="module")
def fact_b(lm):
    return _generate(lm, 7)


@pytest.fixture(scope="module")
def fact_short(lm):
    return _generate(lm, 11, max_new_tokens=32)


@pytest.fixture(scope="module")
def word(tok, fact):
    """(k, w, a): response token k spells '▁w' (w unique in the text), starting at character a."""
    for k in range(8, 30):
        piece = tok.id_to_piece(fact.tokens[k])
        w = piece[1:]
        if piece.startswith("\u2581") and len(w) >= 3 and w.isalpha() and fact.text.count(w) == 1:
            a = fact.text.index(w)
            assert tok.decode(fact.tokens[:k]) + " " + w == fact.text[: a + len(w)]
            return k, w, a
    raise AssertionError("fixture: no unique whole-word token in the factual response")


# --- independent references ----------------------------------------------------------------------


def ref_logits(lm, tokens, params=None) -> np.ndarray:
    """f32[T, V]: full causal forward (no cache) of `tokens`, right-padded to REF_LEN."""
    model = lm if params is None else lm.replace(params=params)
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(cfjax.forward(model, padded))[0, : len(tokens)]


def ref_mask(z: np.ndarray, top_k, top_p) -> np.ndarray:
    """bool[V]: top-k, then the nucleus (drop a token when the mass strictly before it > p)."""
    return ref_keep(z, top_k, top_p)[0]


def gumbel(key, idx: int, vocab: int) -> np.ndarray:
    return np.asarray(jax.random.gumbel(jax.random.fold_in(key, idx), (vocab,), jnp.float32))


def mechanism_violations(lm, trace, start, noise_index, *, key=None, params=None, sampler=None):
    """Steps j >= start whose token is not argmax(masked z + g[noise_index(j)]) (tie-tolerant)."""
    sampler = sampler or trace.sampler
    key = trace.key if key is None else key
    logits = ref_logits(lm, trace.prompt_tokens + trace.tokens, params)
    n_prompt, vocab = len(trace.prompt_tokens), logits.shape[-1]
    assert start < len(trace.tokens), "nothing to check"
    bad = []
    for j in range(start, len(trace.tokens)):
        z = logits[n_prompt + j - 1].astype(np.float32) / np.float32(sampler.temperature)
        mask = ref_mask(z, sampler.top_k, sampler.top_p)
        score = np.where(mask, z + gumbel(key, noise_index(j), vocab), -np.inf)
        token = trace.tokens[j]
        second, best = np.sort(score)[-2:]
        # A different rounding of the same logits may only flip a near-tie.
        ok = mask[token] and (
            token == int(np.argmax(score)) if best - second > 1e-3 else score[token] >= best - 1e-3
        )
        if not ok:
            bad.append(j)
    return bad


def assert_mechanism(lm, trace, start, noise_index, **kw):
    bad = mechanism_violations(lm, trace, start, noise_index, **kw)
    assert not bad, f"steps {bad} do not follow the mechanism with the expected noise"


def other_token(t: int) -> int:
    """A different token, never a control token (0-2: unk, bos, eos would end the response)."""
    return 3 + (t + 14) % 253


def same_result(a: Trace, b: Trace) -> None:
    assert a.tokens == b.tokens
    assert a.text == b.text
    assert a.prompt_tokens == b.prompt_tokens
    assert a.noise_index == b.noise_index
    assert a.alignment == b.alignment
    assert a.interventions == b.interventions
    assert a.sampler == b.sampler
    assert a.max_new_tokens == b.max_new_tokens
    assert a.model_id == b.model_id
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


# --- the reference itself ------------------------------------------------------------------------


def test_reference_reproduces_factual(lm, fact, fact_b):
    """The independent reference explains the factual run (noise index = step) ..."""
    assert fact.noise_index == list(range(STEPS))
    assert_mechanism(lm, fact, 0, lambda j: j)
    assert_mechanism(lm, fact_b, 0, lambda j: j)
    # ... and has the power to reject: another row's noise does not explain it.
    assert mechanism_violations(lm, fact, 0, lambda j: j, key=fact_b.key)


# --- identities ----------------------------------------------------------------------------------

IDENTITIES = {
    "replace_token": lambda lm, tr, w: ReplaceTokens(20, [tr.tokens[20]]),
    "replace_tokens": lambda lm, tr, w: ReplaceTokens(5, tr.tokens[5:9]),
    "replace_text": lambda lm, tr, w: ReplaceText(w, w),
    "insert_nothing": lambda lm, tr, w: InsertText("", after=w),
    "edit_prompt_text": lambda lm, tr, w: EditPrompt(prompt=PROMPT),
    "edit_prompt_tokens": lambda lm, tr, w: EditPrompt(tokens=tuple(tr.prompt_tokens)),
    "change_sampler": lambda lm, tr, w: ChangeSampler(
        temperature=1.0, top_k=64, top_p=0.9, mechanism="gumbel"
    ),
    "change_model_params": lambda lm, tr, w: ChangeModel(lm.params),
    "change_model_lm": lambda lm, tr, w: ChangeModel(lm.replace(model_id="copy")),
    "combined": lambda lm, tr, w: [
        EditPrompt(prompt=PROMPT),
        ChangeSampler(top_p=0.9),
        ReplaceTokens(30, [tr.tokens[30]]),
        ReplaceText(w, w),
    ],
}


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "recompute"])
@pytest.mark.parametrize("name", list(IDENTITIES))
def test_identity_intervention_reproduces_factual(lm, fact, word, name, reuse):
    iv = IDENTITIES[name](lm, fact, word[1])
    cf = counterfactual(lm, fact, iv, reuse_cache=reuse, chunk=CHUNK)
    assert cf.tokens == fact.tokens
    assert cf.text == fact.text
    assert cf.prompt_tokens == fact.prompt_tokens
    assert cf.noise_index == fact.noise_index
    assert cf.sampler == fact.sampler
    np.testing.assert_allclose(cf.logprobs, fact.logprobs, rtol=1e-5, atol=1e-5)


# --- noise alignment -----------------------------------------------------------------------------


def test_replace_two_tokens_by_one_aligns_after_the_edited_span(lm, fact):
    new = other_token(fact.tokens[20])
    cf = counterfactual(lm, fact, ReplaceTokens(20, [new], count=2), chunk=CHUNK)
    assert cf.tokens[:20] == fact.tokens[:20]
    assert cf.tokens[20] == new
    # m = 21 (after the forced span), r = 22 (the factual index after the 2 replaced tokens).
    assert cf.alignment == {
        "edit_start": 20,
        "resume_at": 21,
        "aligned_to": 22,
        "fresh_noise": False,
    }
    assert cf.noise_index[21:] == [j + 1 for j in range(21, len(cf.tokens))]
    assert_mechanism(lm, cf, 21, lambda j: 22 + (j - 21))
    # The check has power: the unshifted noise (index j) does not explain the continuation.
    assert mechanism_violations(lm, cf, 21, lambda j: j)
    assert cf.tokens[21:] != fact.tokens[21:]


def test_same_length_token_edit_keeps_noise_index(lm, fact):
    new = other_token(fact.tokens[20])
    cf = counterfactual(lm, fact, ReplaceTokens(20, [new]), chunk=CHUNK)
    assert cf.tokens[:20] == fact.tokens[:20] and cf.tokens[20] == new
    assert cf.alignment["resume_at"] == cf.alignment["aligned_to"] == 21
    assert cf.noise_index == list(range(len(cf.tokens)))
    assert_mechanism(lm, cf, 21, lambda j: j)


def test_user_set_resume_at(lm, fact):
    new = other_token(fact.tokens[20])
    cf = counterfactual(lm, fact, ReplaceTokens(20, [new]), resume_at=30, chunk=CHUNK)
    assert cf.tokens[:20] == fact.tokens[:20] and cf.tokens[20] == new
    assert cf.alignment == {
        "edit_start": 20,
        "resume_at": 21,
        "aligned_to": 30,
        "fresh_noise": False,
    }
    assert_mechanism(lm, cf, 21, lambda j: 30 + (j - 21))
    assert mechanism_violations(lm, cf, 21, lambda j: j)


TEXT_EDITS = {
    # (intervention, expected text prefix of the counterfactual, factual index right after the span)
    "replace": lambda k, w, a, text: (ReplaceText(w, NEW_WORD), text[:a] + NEW_WORD),
    "insert": lambda k, w, a, text: (
        InsertText(" " + NEW_WORD, after=w),
        text[: a + len(w)] + " " + NEW_WORD,
    ),
    "delete": lambda k, w, a, text: (DeleteText(" " + w), text[: a - 1]),
}


@pytest.mark.parametrize("name", list(TEXT_EDITS))
def test_text_edit_changes_token_count_and_aligns(lm, tok, fact, word, name):
    k, w, a = word
    iv, prefix = TEXT_EDITS[name](k, w, a, fact.text)
    cf = counterfactual(lm, fact, iv, chunk=CHUNK)
    m = cf.alignment["resume_at"]
    assert cf.alignment["edit_start"] == k
    assert cf.alignment["aligned_to"] == k + 1  # the word's token is the edited factual span
    assert m != k + 1, "the edit should change the token count"
    assert cf.tokens[:k] == fact.tokens[:k]
    # The forced tokens spell exactly the edited text (no extra dummy-prefix space) ...
    assert tok.decode(cf.tokens[:m]) == prefix
    assert cf.text.startswith(prefix)
    # ... and the continuation uses the factual noise at r + (j - m).
    assert cf.noise_index[m:] == [k + 1 + j - m for j in range(m, len(cf.tokens))]
    assert_mechanism(lm, cf, m, lambda j: k + 1 + (j - m))


def test_two_response_edits_force_the_span_between_them(lm, fact, word):
    k, w, a = word
    new = other_token(fact.tokens[32])
    cf = counterfactual(lm, fact, [ReplaceTokens(32, [new]), ReplaceText(w, NEW_WORD)], chunk=CHUNK)
    m = cf.alignment["resume_at"]
    shift = m - 33  # the word edit added tokens; everything after it moved by `shift`
    assert cf.alignment["edit_start"] == k and cf.alignment["aligned_to"] == 33
    assert cf.tokens[:k] == fact.tokens[:k]
    assert cf.tokens[k + 1 + shift : m - 1] == fact.tokens[k + 1 : 32]  # kept between the edits
    assert cf.tokens[m - 1] == new
    assert_mechanism(lm, cf, m, lambda j: 33 + (j - m))


# --- cache reuse, batches ------------------------------------------------------------------------


def _spy(monkeypatch):
    """Records each driver run as ["prefill", 0] or [the step it resumed a stored cache at]."""
    calls = []
    real_run = driver.run

    def run(*a, **kw):
        out = real_run(*a, **kw)
        calls.extend([out.first] if out.resumed else ["prefill", 0])
        return out

    monkeypatch.setattr(driver, "run", run)
    return calls


def test_reuse_cache_equals_recompute(lm, fact, word, monkeypatch):
    k, w, _ = word
    ivs = [
        (ReplaceTokens(20, [other_token(fact.tokens[20])]), 20),
        (ReplaceText(w, NEW_WORD), k),
        ([ChangeSampler(top_k=64), ReplaceTokens(40, [other_token(fact.tokens[40])])], 40),
    ]
    for iv, edit_start in ivs:
        calls = _spy(monkeypatch)
        reused = counterfactual(lm, fact, iv, reuse_cache=True, chunk=CHUNK)
        assert calls == [edit_start], "the factual cache was not reused from the edit on"
        calls.clear()
        fresh = counterfactual(lm, fact, iv, reuse_cache=False, chunk=CHUNK)
        assert calls == ["prefill", 0]
        same_result(reused, fresh)
        assert reused.tokens[edit_start + 1 :] != fact.tokens[edit_start + 1 :]


def test_a_capped_counterfactual_is_a_prefix_of_the_full_one(lm, fact, monkeypatch):
    ivs = [ReplaceTokens(20, [other_token(fact.tokens[20])]),
           ReplaceTokens(30, [other_token(fact.tokens[30])])]  # fmt: skip
    full = counterfactuals(lm, fact, ivs, chunk=CHUNK)
    calls = _spy(monkeypatch)
    capped = counterfactuals(lm, fact, ivs, chunk=CHUNK, max_new_tokens=[25, 41])
    assert calls == [20], "a capped batch still resumes from the factual cache"
    for f, c, cap in zip(full, capped, (25, 41), strict=True):
        assert len(c.tokens) == cap and c.max_new_tokens == cap
        assert c.tokens == f.tokens[:cap] and c.noise_index == f.noise_index[:cap]
        np.testing.assert_allclose(c.logprobs, f.logprobs[:cap], rtol=1e-6, atol=1e-6)
    fresh = interventionals(lm, [fact] * 2, ivs, keys=jax.random.key(5), chunk=CHUNK)
    fresh_capped = interventionals(lm, [fact] * 2, ivs, keys=jax.random.key(5), chunk=CHUNK,
                                   max_new_tokens=25)  # fmt: skip
    # A cap below a row's forced prefix (31 tokens) keeps the prefix and samples nothing more.
    assert [len(t.tokens) for t in fresh_capped] == [25, 31]
    assert [t.tokens[: len(c.tokens)] for t, c in zip(fresh, fresh_capped, strict=True)] == [
        c.tokens for c in fresh_capped
    ]
    with pytest.raises(ValueError, match="1 max_new_tokens values for 2 rows"):
        counterfactuals(lm, fact, ivs, max_new_tokens=[4])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        counterfactual(lm, fact, ivs[0], max_new_tokens=0)


def test_batched_interventions_equal_one_by_one(lm, fact, word):
    _, w, _ = word
    ivs = [
        ReplaceTokens(20, [other_token(fact.tokens[20])]),
        ReplaceText(w, NEW_WORD),
        [ChangeSampler(temperature=0.7), ReplaceTokens(30, [other_token(fact.tokens[30])])],
    ]
    batched = counterfactuals(lm, fact, ivs, chunk=CHUNK)
    assert len(batched) == 3
    for iv, b in zip(ivs, batched, strict=True):
        same_result(b, counterfactual(lm, fact, iv, chunk=CHUNK))
    assert len({tuple(b.tokens) for b in batched}) == 3


@pytest.mark.parametrize("other", ["fact_b", "fact_short"])
def test_batched_traces_equal_one_by_one(lm, fact, other, request, monkeypatch):
    """Traces with different keys (and max_new_tokens) batch to their one-by-one results; two
    traces of one cache layout resume from their two stored batches' caches at once."""
    trace2 = request.getfixturevalue(other)
    assert trace2.tokens[:10] != fact.tokens[:10]
    ivs = [
        ReplaceTokens(12, [other_token(fact.tokens[12])]),
        ReplaceTokens(6, [other_token(trace2.tokens[6]), 9], count=1),
    ]
    calls = _spy(monkeypatch)
    batched = counterfactuals(lm, [fact, trace2], ivs, chunk=CHUNK)
    assert calls == ([6] if other == "fact_b" else ["prefill", 0])  # (fact_short: 32-step cache)
    for t, iv, b in zip([fact, trace2], ivs, batched, strict=True):
        one = counterfactual(lm, t, iv, chunk=CHUNK)
        same_result(b, one)
        stops = [i for i, x in enumerate(b.tokens) if x in t.stop_tokens]
        full = max(t.max_new_tokens, b.alignment["resume_at"] + 1)
        assert len(b.tokens) == (stops[0] + 1 if stops else full)
    # row 2: one token became two; its continuation uses its own key at r + (j - m).
    assert_mechanism(lm, batched[1], 8, lambda j: 7 + (j - 8))


def test_interventional_uses_fresh_noise(lm, fact):
    iv = ReplaceTokens(20, [other_token(fact.tokens[20])])
    cf = counterfactual(lm, fact, iv, chunk=CHUNK)
    differs = []
    for seed in (101, 102):
        it = interventional(lm, fact, iv, key=seed, chunk=CHUNK)
        fresh = jax.random.key(seed)
        assert it.tokens[:21] == cf.tokens[:21]
        assert it.alignment["fresh_noise"] is True
        np.testing.assert_array_equal(jax.random.key_data(it.key), jax.random.key_data(fresh))
        differs.append(it.tokens[21:] != cf.tokens[21:])
        # Its continuation follows the mechanism with the fresh key's noise at index j ...
        assert_mechanism(lm, it, 21, lambda j: j, key=fresh)
        # ... i.e. it is the counterfactual of a world whose noise came from the fresh key.
        other_world = counterfactual(lm, dataclasses.replace(fact, key=fresh), iv, chunk=CHUNK)
        assert other_world.tokens == it.tokens
    assert any(differs)


# --- counterfactual stability (Oberst & Sontag 2019) ---------------------------------------------


def _masked_probs(z: np.ndarray, top_k) -> np.ndarray:
    z = z.astype(np.float64)
    if top_k is not None:
        cut = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _stability_violations(sampler: Sampler, n: int = 3000, vocab: int = 6) -> tuple[int, int]:
    """(violations, constrained pairs) over random categoricals and random logit interventions."""
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.normal(size=(n, vocab))).astype(np.float32)
    edited = logits + (2.0 * rng.normal(size=(n, vocab))).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), n)
    steps = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    choose = jax.vmap(scm.choose, in_axes=(0, 0, 0, None))
    x = np.asarray(choose(jnp.asarray(logits), keys, steps, sampler)[0])
    y = np.asarray(choose(jnp.asarray(edited), keys, steps, sampler)[0])  # the same noise
    t = sampler.temperature
    p, q = _masked_probs(logits / t, sampler.top_k), _masked_probs(edited / t, sampler.top_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, q / p, np.where(q > 0, np.inf, 0.0))
    rows = np.arange(n)
    assert (p[rows, x] > 0).all()  # the factual draw is in its support
    # y != x is forbidden whenever q(x)/p(x) >= q(y)/p(y) (a small margin keeps float ties out).
    raised = ratio[rows, x][:, None] >= ratio * (1 + 1e-4)
    raised[rows, x] = False
    violations = int(np.sum(raised[rows, y] & (y != x)))
    return violations, int(raised.sum())


@pytest.mark.parametrize(
    "sampler",
    [Sampler(1.0), Sampler(0.6), Sampler(1.3, top_k=4)],
    ids=["t1", "t0.6", "t1.3-topk4"],
)
def test_counterfactual_stability(sampler):
    violations, constrained = _stability_violations(sampler)
    assert constrained > 1000  # the property is exercised, not vacuous
    assert violations == 0


def test_stability_check_has_power():
    """Rank-indexed noise (ordinary sampling) is not counterfactually stable: the check sees it."""
    violations, _ = _stability_violations(Sampler(1.0, mechanism="gumbel-rank"))
    assert violations > 0


# --- automatic intervention, combined interventions, other models --------------------------------


def test_auto_intervention_picks_another_top_p_token(lm, fact):
    pos = 12
    cf = counterfactual(lm, fact, AutoIntervention(pos), chunk=CHUNK)
    z = ref_logits(lm, fact.prompt_tokens + fact.tokens[:pos])[-1] / fact.sampler.temperature
    nucleus = ref_mask(z, None, 0.9)
    assert nucleus.sum() >= 2
    new = cf.tokens[pos]
    assert new != fact.tokens[pos]
    assert nucleus[new]
    assert cf.tokens[:pos] == fact.tokens[:pos]
    assert cf.interventions == [
        {"type": "AutoIntervention", "position": pos, "top_p": 0.9, "seed": 0, "token": new}
    ]
    assert cf.alignment["resume_at"] == cf.alignment["aligned_to"] == pos + 1
    assert_mechanism(lm, cf, pos + 1, lambda j: j)


def test_auto_intervention_on_a_greedy_trace_uses_the_model_distribution(lm, fact):
    """τ = 0 is a point mass; the top-p set is taken from the model's own (τ = 1) distribution."""
    logits = ref_logits(lm, fact.prompt_tokens + fact.tokens)[len(fact.prompt_tokens) - 1 :]
    # A step where the factual token is the argmax, as in a greedy trace, and others are likely.
    pos = next(
        j
        for j in range(5, 40)
        if fact.tokens[j] == int(np.argmax(logits[j])) and ref_mask(logits[j], None, 0.9).sum() >= 3
    )
    nucleus = ref_mask(logits[pos], None, 0.9)
    greedy = dataclasses.replace(fact, sampler=Sampler(temperature=0.0))
    chosen = {plan(lm, greedy, AutoIntervention(pos, seed=s)).forced[pos] for s in range(8)}
    assert fact.tokens[pos] not in chosen
    assert all(nucleus[t] for t in chosen)
    assert len(chosen) >= 2  # drawn from the set, not a fixed runner-up


def test_edit_prompt_with_change_sampler(lm, tok, fact):
    ivs = [EditPrompt(prompt="the sailor found"), ChangeSampler(temperature=0.7)]
    cf = counterfactual(lm, fact, ivs, chunk=CHUNK)
    assert cf.prompt_tokens == [tok.bos_id, *tok.encode("the sailor found")]
    assert cf.sampler == Sampler(temperature=0.7, top_k=64, top_p=0.9)
    assert [r["type"] for r in cf.interventions] == ["EditPrompt", "ChangeSampler"]
    assert cf.interventions[1] == {"type": "ChangeSampler", "temperature": 0.7}
    assert cf.alignment["resume_at"] == cf.alignment["aligned_to"] == 0
    assert cf.tokens != fact.tokens
    # The whole response is resampled in the new world with the factual noise at index j.
    assert_mechanism(lm, cf, 0, lambda j: j)


def test_a_counterfactual_trace_describes_its_own_prompt(lm, tok, fact):
    """After a prompt edit the trace's text fields are the new prompt's, so a chained edit of
    the counterfactual starts from its world, not the factual one."""
    cf = counterfactual(lm, fact, EditPrompt(prompt="the sailor found"), chunk=CHUNK)
    assert cf.prompt == "the sailor found" and fact.prompt == PROMPT
    again = counterfactual(lm, cf, EditPrompt(), chunk=CHUNK)  # no change: the same world
    assert again.prompt_tokens == cf.prompt_tokens and again.tokens == cf.tokens
    ids = counterfactual(lm, fact, EditPrompt(tokens=(1, 5, 6)), chunk=CHUNK)
    assert ids.prompt is None and ids.system is None and ids.prompt_tokens == [1, 5, 6]
    with pytest.raises(ValueError, match="EditPrompt with text needs a trace made from a text"):
        counterfactual(lm, ids, EditPrompt(prompt="x"), chunk=CHUNK)


def test_change_model_uses_the_new_params(lm, fact):
    other = init_params(lm.config, jax.random.key(1), scale=4.0)
    cf = counterfactual(lm, fact, ChangeModel(other, name="ft"), chunk=CHUNK)
    assert cf.model_id == "tiny+ft"
    assert cf.interventions == [{"type": "ChangeModel", "name": "ft"}]
    assert cf.tokens != fact.tokens
    assert_mechanism(lm, cf, 0, lambda j: j, params=other)


# --- bad inputs ----------------------------------------------------------------------------------


def _wrong_shape(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves[0] = leaves[0][..., :-1]
    return jax.tree_util.tree_unflatten(treedef, leaves)


BAD = {
    "position_past": (lambda lm, tr, o: ReplaceTokens(STEPS, [5]), r"position 48 is outside the response: positions are 0 to 47"),
    "position_negative": (lambda lm, tr, o: ReplaceTokens(-1, [5]), r"ReplaceTokens position must be an integer >= 0, got -1"),
    "span_past": (lambda lm, tr, o: ReplaceTokens(46, [5, 5, 5]), r"runs past the response \(48 tokens\)"),
    "auto_past": (lambda lm, tr, o: AutoIntervention(STEPS + 3), r"position 51 is outside the response"),
    "text_not_found": (lambda lm, tr, o: ReplaceText("zebra", "cat"), r"'zebra' occurs 0 time\(s\) in the response"),
    "occurrence": (lambda lm, tr, o: ReplaceText(o, "cat", occurrence=2), r"occurs 1 time\(s\) in the response, not 2"),
    "bad_token": (lambda lm, tr, o: ReplaceTokens(3, [256]), r"token id 256 .* outside the vocabulary"),
    "param_shape": (lambda lm, tr, o: ChangeModel(_wrong_shape(lm.params)), r"ChangeModel: param .* has shape .*, expected"),
    "param_tree": (lambda lm, tr, o: ChangeModel({"embed": lm.params["embed"]}), r"ChangeModel: params do not have the structure"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_intervention_errors(lm, fact, word, name):
    make, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        counterfactual(lm, fact, make(lm, fact, word[1]), chunk=CHUNK)


def test_resume_at_outside_the_response(lm, fact):
    with pytest.raises(ValueError, match=r"resume_at 49 is outside the factual response \[0, 48\]"):
        counterfactual(lm, fact, ReplaceTokens(3, [5]), resume_at=49, chunk=CHUNK)


def test_trace_from_another_model(lm, fact):
    foreign = dataclasses.replace(fact, model_id="other-model")
    with pytest.raises(ValueError, match=r"made by model 'other-model', not by 'tiny'"):
        counterfactual(lm, foreign, ReplaceTokens(3, [5]), chunk=CHUNK)


def test_change_model_with_another_tokenizer(lm, fact, tmp_path_factory):
    tok2 = _train_spm(tmp_path_factory.mktemp("spm2"), seed=1)
    assert tok2.spec != lm.tokenizer.spec
    with pytest.raises(ValueError, match=r"different tokenizer .* must keep the token space"):
        counterfactual(lm, fact, ChangeModel(lm.replace(tokenizer=tok2)), chunk=CHUNK)


def test_counterfactuals_length_mismatch(lm, fact, fact_b):
    with pytest.raises(ValueError, match=r"2 traces but 1 interventions"):
        counterfactuals(lm, [fact, fact_b], [ReplaceTokens(3, [5])], chunk=CHUNK)


# --- JSON ----------------------------------------------------------------------------------------


def test_counterfactual_json_round_trip(lm, fact, word, tmp_path):
    _, w, _ = word
    new = other_token(fact.tokens[32])
    cf = counterfactual(lm, fact, [ReplaceTokens(32, [new]), ReplaceText(w, NEW_WORD)], chunk=CHUNK)
    cf.to_json(tmp_path / "cf.json")
    raw = json.loads((tmp_path / "cf.json").read_text(encoding="utf-8"))
    assert raw["interventions"] == [
        {"type": "ReplaceTokens", "position": 32, "tokens": [new], "count": None},
        {"type": "ReplaceText", "old": w, "new": NEW_WORD, "occurrence": 1},
    ]
    assert raw["alignment"] == cf.alignment
    assert raw["alignment"]["aligned_to"] == 33
    back = Trace.from_json(tmp_path / "cf.json")
    assert back.to_dict() == cf.to_dict()
    same_result(back, cf)
    # A counterfactual of the loaded counterfactual follows its noise map: an identity edit
    # late in the response reproduces it, from its cache and from JSON alike, and its kept
    # tokens keep the noise indices they were generated with.
    for source in (cf, back):
        again = counterfactual(lm, source, ReplaceTokens(44, [cf.tokens[44]]), chunk=CHUNK)
        assert again.tokens == cf.tokens
        assert again.noise_index == cf.noise_index


def test_counterfactual_of_a_counterfactual_keeps_the_noise_alignment(lm, fact):
    """Two traces with the same tokens and noise give the same counterfactual.

    `a` shifts the noise (2 tokens -> 1); `b` is an identity counterfactual of `a` (same tokens,
    its steps before the edit forced). Editing either one must resample with the same noise.
    """
    a = counterfactual(
        lm, fact, ReplaceTokens(10, [other_token(fact.tokens[10])], count=2), chunk=CHUNK
    )
    b = counterfactual(lm, a, ReplaceTokens(30, [a.tokens[30]]), chunk=CHUNK)
    assert b.tokens == a.tokens
    assert b.noise_index[:30] == a.noise_index[:30] == [*range(10), 10, *range(12, 31)]
    iv = ReplaceTokens(20, [other_token(a.tokens[20])])
    from_a = counterfactual(lm, a, iv, chunk=CHUNK)
    from_b = counterfactual(lm, b, iv, chunk=CHUNK)
    same_result(from_a, from_b)
    assert_mechanism(lm, from_a, 21, lambda j: j + 1)  # a's step 21 used factual noise 22


def test_factual_trace_from_json_gives_the_same_counterfactual(lm, fact, word):
    loaded = Trace.from_json(fact.to_json())
    # The cache is found by the trace's tokens, so a trace read back from JSON reuses it too.
    assert lm.caches.get(lm.params, loaded.prompt_tokens, loaded.tokens) is not None
    for iv in (ReplaceTokens(20, [other_token(fact.tokens[20])]), ReplaceText(word[1], NEW_WORD)):
        same_result(
            counterfactual(lm, loaded, iv, chunk=CHUNK), counterfactual(lm, fact, iv, chunk=CHUNK)
        )
