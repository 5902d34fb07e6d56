"""Counterfactual attribution (issue 34): every unit's counterfactual under the factual noise.

References: a numpy dynamic-programming Levenshtein distance, one-by-one `counterfactual` and
`interventional` calls, the model's own top-p set from a cache-less forward, and on SmolLM2 a
name the answer copies.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from test_counterfactual import _train_spm

import cfjax
from cfjax import EditPrompt, ReplaceTokens, Sampler
from cfjax.causal.attribution import WORD, Auto, attribute, distances
from cfjax.core import scm
from cfjax.core.model import init_params

PROMPT = "the captain sailed across a calm sea with her dog"


def levenshtein(a, b) -> int:
    d = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        prev, d[0] = d.copy(), i
        for j, y in enumerate(b, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
    return int(d[-1])


def test_distances_match_a_numpy_levenshtein():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = (list(rng.integers(0, 4, rng.integers(0, 9))) for _ in range(2))
        d, kept = distances(a, b)
        longer = max(len(a), len(b))
        assert d == pytest.approx(levenshtein(a, b) / longer if longer else 0.0)
        assert 0.0 <= kept <= 1.0 and (kept == 1.0 if a == b else d > 0)
    assert distances([1, 2, 3, 4], [1, 9, 3, 4, 5]) == pytest.approx((2 / 5, 3 / 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = _train_spm(tmp_path_factory.mktemp("spm"), seed=0)
    config = cfjax.preset("tiny")
    return cfjax.LM(config, init_params(config, jax.random.key(0), scale=4.0), model_id="tiny").replace(tokenizer=tok)  # fmt: skip


@pytest.fixture(scope="module")
def lm(tiny):
    return tiny


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def both(tiny, request):
    """The tiny model in each dtype, for the equalities the project promises."""
    return tiny if request.param == "float32" else cfjax.quantize(tiny, "bfloat16")


@pytest.fixture(scope="module")
def fact(lm):
    return cfjax.generate(lm, PROMPT, key=3, sampler=Sampler(1.0, top_p=0.9), max_new_tokens=16, chat=False)  # fmt: skip


def test_each_word_removed_is_the_one_by_one_counterfactual(both):
    lm = both
    fact = cfjax.generate(lm, PROMPT, key=3, sampler=Sampler(1.0, top_p=0.9), max_new_tokens=16, chat=False)  # fmt: skip
    effects = attribute(lm, fact, key=7)
    words = PROMPT.split()
    assert [e.text for e in effects] == words
    keys = jax.random.split(jax.random.key(7), len(words))
    for e, word in zip(effects, words, strict=True):
        a, b = e.span
        assert PROMPT[a:b] == word and e.replacement == ""
        new = " ".join(w for i, w in enumerate(words) if i != e.unit)  # one space removed too
        assert e.trace.prompt == new
        alone = cfjax.counterfactual(lm, fact, EditPrompt(prompt=new))
        assert e.trace.to_dict() == alone.to_dict()  # batched = one by one, bit for bit
        fresh = cfjax.interventional(lm, fact, EditPrompt(prompt=new), key=keys[e.unit])
        assert e.interventional.to_dict() == fresh.to_dict()
        assert (e.distance, e.kept_share) == distances(fact.tokens, alone.tokens)
        assert e.interventional_distance == distances(fact.tokens, fresh.tokens)[0]
    assert any(e.distance > 0 for e in effects)


def test_the_null_edit_of_every_word_changes_nothing(both):
    lm = both
    fact = cfjax.generate(lm, PROMPT, key=3, sampler=Sampler(1.0, top_p=0.9), max_new_tokens=16, chat=False)  # fmt: skip
    effects = attribute(lm, fact, replace={w: w for w in PROMPT.split()}, contains=fact.text[:6],
                        interventional=False)  # fmt: skip
    assert len(effects) == len(PROMPT.split())
    for e in effects:
        assert e.trace.tokens == fact.tokens and e.distance == 0.0 and e.kept_share == 1.0
        assert e.contains is True and e.interventional is None


def test_token_units_and_a_given_replacement(lm, fact):
    effects = attribute(lm, fact, unit="token", replace="dog", interventional=False)
    ids = lm.tokenizer.encode(PROMPT)
    assert len(effects) == len(ids)
    assert " ".join(e.text for e in effects) == PROMPT  # each token's text without its space
    for e in effects:
        a, b = e.span
        assert e.trace.prompt == PROMPT[:a] + "dog" + PROMPT[b:]


def test_automatic_replacements_come_from_the_models_top_p_set(lm, fact):
    effects = attribute(lm, fact, replace=Auto(top_p=0.9, seed=0), interventional=False)
    assert effects
    ids = lm.tokenizer.encode(PROMPT)
    at = len(fact.prompt_tokens) - len(ids)
    assert fact.prompt_tokens[at:] == ids
    logits = np.asarray(cfjax.forward(lm, np.asarray([fact.prompt_tokens])))[0]
    spans = cfjax.tokenizer.token_char_spans(lm.tokenizer, ids)
    for e in effects:
        first = next(i for i, (s, t) in enumerate(spans) if s < e.span[1] and t > e.span[0])
        new = lm.tokenizer.encode(e.replacement) if e.replacement.strip() else None
        logp = np.asarray(scm.log_probs(logits[at + first - 1], Sampler(1.0, top_p=0.9)))
        drawn = [t for t in range(len(logp)) if lm.tokenizer.decode([t]) == e.replacement]
        assert any(np.isfinite(logp[t]) and t != ids[first] for t in drawn), (e.text, e.replacement, new)  # fmt: skip
        assert e.trace.prompt != PROMPT


def test_response_units_are_the_papers_positions_all_at_once(lm, fact):
    effects = attribute(lm, fact, over="response", unit="token", interventional=False)
    assert [e.unit for e in effects] == list(range(len(fact.tokens)))
    for e in effects[:: max(1, len(effects) // 4)]:  # a few rows, one by one
        i = e.unit
        alone = cfjax.counterfactual(lm, fact, ReplaceTokens(i, [], count=1))
        assert e.trace.to_dict() == alone.to_dict()
        assert e.trace.alignment["edit_start"] == i
        assert e.distance == distances(fact.tokens[i + 1 :], alone.tokens[i:])[0]
    with pytest.raises(ValueError, match="per token"):
        attribute(lm, fact, over="response", unit="word")


def test_bad_requests_are_refused(lm, fact):
    with pytest.raises(ValueError, match="text prompt"):
        attribute(lm, cfjax.generate(lm, fact.prompt_tokens, key=0, max_new_tokens=4))
    with pytest.raises(ValueError, match="no unit of the prompt"):
        attribute(lm, fact, replace={"absent": "x"})
    with pytest.raises(ValueError, match="unit must be"):
        attribute(lm, fact, unit="sentence")


def test_words_are_runs_of_letters_or_of_punctuation():
    assert WORD.findall("Hi, Maeve's ship!") == ["Hi", ",", "Maeve", "'", "s", "ship", "!"]
    assert list(itertools.chain(WORD.findall("a  b"))) == ["a", "b"]


@pytest.mark.slow
def test_a_name_the_answer_copies_has_the_largest_effect():
    lm = cfjax.load("smollm2-135m-instruct")
    prompt = "Write one sentence about a captain named Ahab and his ship."
    fact = cfjax.generate(lm, prompt, key=0, sampler=Sampler(0.7), max_new_tokens=24)
    assert "Ahab" in fact.text
    effects = attribute(lm, fact, contains="Ahab", interventional=False)
    ahab = next(e for e in effects if e.text == "Ahab")
    assert ahab.distance == max(e.distance for e in effects)
    assert [e.text for e in effects if not e.contains] == ["Ahab"]
