"""Abduction (issue 15): counterfactuals of observed text through posterior Gumbel noise.

References: a full causal `cfjax.forward` for the logits (no cache, no decode loop), numpy masks
(`conftest.ref_keep`), rejection sampling of the prior noise, and a numpy transcription of
Ravfogel et al.'s top-down truncated-Gumbel sampler (`lm-counterfactuals/sampling.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import ref_keep
from test_counterfactual import _train_spm

import cfjax
from cfjax.causal import Trace, abduct, counterfactual, counterfactuals, generate, summarize
from cfjax.causal.abduction import posterior_noise
from cfjax.causal.interventions import ChangeSampler, EditPrompt, ReplaceText, ReplaceTokens
from cfjax.core import decode, kernel, posterior
from cfjax.core.model import init_params
from cfjax.core.scm import Sampler
from cfjax.runtime import driver
from cfjax.runtime.request import row_keys

CHUNK = 16
STEPS = 24
PROMPT = "the captain sailed"
HUMAN = " the brave sailor found the old map under the lighthouse and lost her gold"
SAMPLERS = {
    "t1": Sampler(1.0),
    "t0.7": Sampler(0.7),
    "top_k": Sampler(1.0, top_k=8),
    "top_p": Sampler(0.8, top_p=0.8),
    "top_k1": Sampler(1.0, top_k=1),  # every step's support is one token
}
REF_LEN = 128
N = 4  # posterior samples per test


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _train_spm(tmp_path_factory.mktemp("spm"), seed=0)


@pytest.fixture(scope="module")
def lm(tok):
    config = cfjax.preset("tiny")
    params = init_params(config, jax.random.key(0), scale=2.0)
    return cfjax.LM(config, params, model_id="tiny").replace(tokenizer=tok)


@pytest.fixture(scope="module")
def observed(lm):
    """name -> tokens written by the model with that sampler (so inside its support)."""
    return {
        name: generate(
            lm, PROMPT, key=3, sampler=s, max_new_tokens=STEPS, chat=False, chunk=CHUNK,
            stop_tokens=(),
        ).tokens
        for name, s in SAMPLERS.items()
    }  # fmt: skip


def _abduct(lm, response, sampler, key=1, num_samples=N, **kw):
    kw = {"chat": False, "chunk": CHUNK, "stop_tokens": (), **kw}
    return abduct(lm, PROMPT, response, key=key, sampler=sampler, num_samples=num_samples, **kw)


def ref_logits(lm, tokens) -> np.ndarray:
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(cfjax.forward(lm, padded))[0, : len(tokens)]


def _null(trace: Trace) -> ReplaceTokens:
    return ReplaceTokens(0, [trace.tokens[0]])


# --- replay reproduces the observation -------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_replaying_posterior_samples_reproduces_the_observation(lm, observed, name):
    tokens = observed[name]
    posts = _abduct(lm, tokens, SAMPLERS[name])
    assert [p.tokens for p in posts] == [tokens] * N
    assert len({tuple(p.posterior["key"]) for p in posts}) == N  # N distinct samples
    for reuse in (True, False):
        null = counterfactuals(lm, posts, [_null(p) for p in posts], reuse_cache=reuse)
        assert [c.tokens for c in null] == [tokens] * N
        np.testing.assert_allclose(null[0].logprobs, posts[0].logprobs, atol=1e-5)
    # A changed sampler is a real intervention on the same noise: the rows differ from it.
    hot = counterfactuals(lm, posts, [ChangeSampler(temperature=2.0, top_k=None, top_p=None)] * N)
    assert any(c.tokens != tokens for c in hot)


def test_human_text_replays_and_its_counterfactuals_differ_by_sample(lm, tok):
    posts = _abduct(lm, HUMAN, Sampler(1.0), num_samples=8)
    assert posts[0].text == HUMAN and posts[0].tokens == tok.encode(HUMAN)
    null = counterfactuals(lm, posts, [_null(p) for p in posts])
    assert all(c.text == HUMAN for c in null)
    cfs = counterfactuals(lm, posts, [ReplaceText("brave", "old")] * 8)
    assert all(c.text.startswith(" the old") for c in cfs)
    assert len({c.text for c in cfs}) > 1, "posterior samples should disagree after the edit"


def test_replay_in_another_process_reproduces_it(lm, observed, tmp_path):
    """From JSON, with no stored observation or cache (as in a new process), the observed text
    is scored again and every counterfactual comes out the same."""
    posts = _abduct(lm, observed["top_p"], SAMPLERS["top_p"])
    edit = ReplaceTokens(10, [observed["top_p"][11]])
    here = counterfactuals(lm, posts, [edit] * N)
    loaded = [Trace.from_json(p.to_json()) for p in posts]
    assert [t.posterior for t in loaded] == [p.posterior for p in posts]
    fresh = lm.replace(params=jax.tree_util.tree_map(jnp.copy, lm.params))  # no stored entry
    fresh.caches.clear()
    fresh.observations.clear()
    there = counterfactuals(fresh, loaded, [edit] * N)
    assert [c.tokens for c in there] == [c.tokens for c in here]
    # A counterfactual's trace keeps the posterior record: a chained null edit after the first
    # edit (its token was forced, not drawn) replays the same noise.
    again = Trace.from_json(here[0].to_json(tmp_path / "cf.json"))
    assert again.posterior == posts[0].posterior
    chained = counterfactual(fresh, again, ReplaceTokens(11, [again.tokens[11]]))
    assert chained.tokens == here[0].tokens


# --- the counterfactual follows the mechanism with the posterior noise -----------------------


def test_posterior_noise_explains_the_observation_and_the_counterfactual(lm, observed):
    sampler, tokens = SAMPLERS["top_k"], observed["top_k"]
    posts = _abduct(lm, tokens, sampler)
    g = np.asarray(posterior_noise(lm, posts))  # [N, S, V], the function the decode step calls
    assert np.all(np.isfinite(g))
    n_prompt = len(posts[0].prompt_tokens)
    logits = ref_logits(lm, posts[0].prompt_tokens + tokens)
    for b, p in enumerate(posts):
        for s, t in enumerate(tokens):
            z = logits[n_prompt + s - 1] / sampler.temperature
            keep, _ = ref_keep(z, sampler.top_k, None)
            score = np.where(keep, z + g[b, s], -np.inf)
            assert np.argmax(score) == t
            prior = jax.random.gumbel(jax.random.fold_in(p.key, s), z.shape, jnp.float32)
            np.testing.assert_array_equal(g[b, s][~keep], np.asarray(prior)[~keep])
    # After an edit at the middle, step j uses the noise of observed step j (same length edit).
    m = 12
    cfs = counterfactuals(lm, posts, [ReplaceTokens(m, [(tokens[m] + 7) % 256])] * N)
    for b, cf in enumerate(cfs):
        assert cf.tokens[:m] == tokens[:m] and cf.noise_index == list(range(STEPS))
        cf_logits = ref_logits(lm, cf.prompt_tokens + cf.tokens)
        for j in range(m + 1, len(cf.tokens)):
            z = cf_logits[n_prompt + j - 1] / sampler.temperature
            score = np.where(ref_keep(z, sampler.top_k, None)[0], z + g[b, j], -np.inf)
            best, second = np.sort(score)[::-1][:2]
            assert cf.tokens[j] == np.argmax(score) or best - second < 1e-3, (b, j)


def test_steps_past_the_observed_text_use_prior_noise(lm, observed):
    tokens = observed["t1"][:10]
    posts = _abduct(lm, tokens, Sampler(1.0), max_new_tokens=STEPS)
    assert posts[0].max_new_tokens == STEPS
    cf = counterfactual(lm, posts[0], _null(posts[0]))
    assert cf.tokens[:10] == tokens and len(cf.tokens) == STEPS
    # Past the observation, the tokens are those the prior noise of the trace key gives.
    want = decode.sample(
        lm.config, lm.params, jnp.asarray(_padded(posts[0].prompt_tokens)),
        len(posts[0].prompt_tokens), posts[0].key, Sampler(1.0), max_new_tokens=STEPS,
        forced=jnp.asarray(tokens + [-1] * (STEPS - 10)),
    )  # fmt: skip
    assert cf.tokens == np.asarray(want.tokens).tolist()


def _padded(prompt: list[int]) -> list[int]:
    return prompt + [0] * (kernel.bucket_length(len(prompt)) - len(prompt))


# --- batching and cost ---------------------------------------------------------------------------


def test_batched_samples_equal_one_by_one(lm, observed):
    tokens, sampler = observed["t0.7"], SAMPLERS["t0.7"]
    edit = ReplaceTokens(8, [(tokens[8] + 3) % 256])
    batch = _abduct(lm, tokens, sampler, key=5, num_samples=N)
    batch_cfs = counterfactuals(lm, batch, [edit] * N)
    for s, k in enumerate(row_keys(5, N)):
        (one,) = _abduct(lm, tokens, sampler, key=k, num_samples=1)
        assert one.posterior == batch[s].posterior
        assert counterfactual(lm, one, edit).tokens == batch_cfs[s].tokens


def test_forward_passes_do_not_grow_with_the_number_of_samples(lm, observed, monkeypatch):
    calls: list[tuple[int, int]] = []  # (rows, chunks) of each driver run
    real = driver.run

    def counted(config, params, request, **kw):
        out = real(config, params, request, **kw)
        calls.append((len(request.prompts), len(out.slots)))
        return out

    monkeypatch.setattr(driver, "run", counted)
    tokens = observed["t1"]
    runs = {}
    for n in (1, 16):
        lm.observations.clear()
        lm.caches.clear()
        calls.clear()
        posts = _abduct(lm, tokens, Sampler(1.0), num_samples=n)
        scoring = list(calls)
        calls.clear()
        counterfactuals(lm, posts, [ReplaceTokens(12, [5])] * n)
        runs[n] = (scoring, list(calls))
    # One scoring pass of batch 1 either way, and one batch of n rows for the counterfactuals,
    # resumed at step 12 in chunks of the factual's 16 steps (where the cache grows, as it does
    # by default for 16 rows on the CPU, the chunks after the first start at whole chunks).
    assert runs[1][0] == runs[16][0] == [(1, math.ceil(len(tokens) / CHUNK))]
    every = lambda first: math.ceil((STEPS - first) / CHUNK)  # noqa: E731
    aligned = 1 + every((12 // CHUNK + 1) * CHUNK)
    assert runs[1][1] == [(1, every(12))]
    assert runs[16][1] == [(16, aligned if driver.grows_by_default(16, None, None) else every(12))]


# --- the law of the posterior ---------------------------------------------------------------


V = 8
LOGITS = np.array([0.3, 2.0, -0.5, 1.0, 0.0, 1.5, -1.0, 0.7], np.float32)
EDITED = np.array([1.2, 0.4, 0.9, -0.3, 1.1, 0.2, 0.5, -0.8], np.float32)


def _ours(sampler: Sampler, k: int, n: int, seed: int) -> np.ndarray:
    """n posterior noise draws given that `sampler` chose k from LOGITS (prior noise: own)."""
    keys = jax.random.split(jax.random.key(seed), 2 * n).reshape(n, 2)

    def one(ks):
        prior = jax.random.gumbel(ks[0], (V,), jnp.float32)
        return posterior.posterior_noise(LOGITS, k, ks[1], sampler, prior)

    return np.asarray(jax.jit(jax.vmap(one))(keys))


def _cf_tokens(noise: np.ndarray, logits: np.ndarray, sampler: Sampler) -> np.ndarray:
    z = logits / sampler.temperature
    keep, _ = ref_keep(z, sampler.top_k, sampler.top_p)
    return np.argmax(np.where(keep, z + noise, -np.inf), axis=1)


def _same_law(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of a chi-square two-sample test on two samples of token ids."""
    ids = np.union1d(a, b)
    table = np.array([[np.sum(a == i) for i in ids], [np.sum(b == i) for i in ids]])
    return scipy.stats.chi2_contingency(table).pvalue


@pytest.mark.parametrize(
    "sampler", [Sampler(1.0), Sampler(0.7, top_k=5), Sampler(1.3, top_p=0.8)], ids=str
)
def test_posterior_matches_rejection_sampling(sampler):
    z = LOGITS / sampler.temperature
    keep, _ = ref_keep(z, sampler.top_k, sampler.top_p)
    k = int(np.argsort(-z)[2])  # a likely but not the likeliest token
    prior = np.asarray(jax.random.gumbel(jax.random.key(5), (400_000, V), jnp.float32))
    accepted = prior[np.argmax(np.where(keep, z + prior, -np.inf), axis=1) == k]
    ours = _ours(sampler, k, 20_000, seed=6)
    for j in range(V):  # every coordinate, in or out of the support
        assert scipy.stats.ks_2samp(ours[:, j], accepted[:, j]).pvalue > 1e-3, j
    # ... and so does the counterfactual token under another distribution.
    edited = dataclasses.replace(sampler, temperature=0.9)
    p = _same_law(_cf_tokens(ours, EDITED, edited), _cf_tokens(accepted, EDITED, edited))
    assert p > 1e-3
    # The test has power: the prior noise (no abduction) gives another counterfactual law.
    assert _same_law(_cf_tokens(prior[:20_000], EDITED, edited), _cf_tokens(accepted, EDITED, edited)) < 1e-6  # fmt: skip


def _ravfogel_topdown(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Transcription of `topdown_vectorized` in Ravfogel et al.'s sampling.py (τ = 1)."""
    logalphas = logits.astype(np.float64)
    logsumalphas = np.log(np.sum(np.exp(logalphas)))
    topgumbel = rng.gumbel() + logsumalphas
    gumbel = rng.gumbel(size=len(logalphas)) + logalphas
    gumbels = -np.log(np.exp(-gumbel) + np.exp(-topgumbel))
    gumbels[k] = topgumbel
    return gumbels - logalphas


def test_counterfactuals_match_ravfogel_at_temperature_one():
    rng = np.random.default_rng(0)
    for k in (1, 4):
        theirs = np.stack([_ravfogel_topdown(LOGITS, k, rng) for _ in range(20_000)])
        ours = _ours(Sampler(1.0), k, 20_000, seed=7 + k)
        assert np.all(np.argmax(LOGITS + theirs, axis=1) == k)
        ours_cf, theirs_cf = (_cf_tokens(g, EDITED, Sampler(1.0)) for g in (ours, theirs))
        assert _same_law(ours_cf, theirs_cf) > 1e-3
        for j in range(V):
            assert scipy.stats.ks_2samp(ours[:, j], theirs[:, j]).pvalue > 1e-3, (k, j)


def test_the_observed_token_wins_even_at_a_float32_near_tie():
    """Equal logits, and an exponential clamped to finfo.tiny: the race still names token k."""
    z = jnp.zeros((V,), jnp.float32)
    for seed in range(200):
        g = posterior.race(z, 3, jax.random.key(seed), jnp.zeros((V,)))
        assert int(jnp.argmax(z + g)) == 3
    g = posterior.race(jnp.full((V,), 1e4, jnp.float32), 5, jax.random.key(0), jnp.zeros((V,)))
    assert int(jnp.argmax(1e4 + g)) == 5 and bool(jnp.all(jnp.isfinite(g)))
    # A token alone in the support (top-p or top-k left one): no rival, finite noise, the prior
    # for every other token.
    alone = jnp.full((V,), -jnp.inf, jnp.float32).at[2].set(3.0)
    prior = jax.random.gumbel(jax.random.key(1), (V,))
    g = posterior.race(alone, 2, jax.random.key(2), prior)
    assert bool(jnp.all(jnp.isfinite(g))) and int(jnp.argmax(alone + g)) == 2
    np.testing.assert_array_equal(np.delete(g, 2), np.delete(prior, 2))


# --- full support, greedy, summaries, records ----------------------------------------------------


def test_full_support_models_the_observed_steps_with_temperature_alone(lm):
    narrow = Sampler(0.9, top_k=2)
    with pytest.raises(ValueError, match=r"observed token \d+ \('.*'\) at response step \d+ is outside the support of the sampler \(temperature 0.9, top-k 2\)"):  # fmt: skip
        _abduct(lm, HUMAN, narrow)
    posts = _abduct(lm, HUMAN, narrow, full_support=True)
    assert posts[0].sampler == Sampler(0.9)
    assert posts[0].posterior["full_support"] is True
    assert Sampler.from_dict(posts[0].posterior["requested_sampler"]) == narrow
    assert np.all(np.isfinite(posts[0].logprobs))
    null = counterfactuals(lm, posts, [_null(p) for p in posts])
    assert all(c.text == HUMAN for c in null)


def test_greedy_abduction(lm):
    greedy = generate(lm, PROMPT, key=0, sampler=Sampler(0.0), max_new_tokens=12, chat=False,
                      stop_tokens=())  # fmt: skip
    posts = _abduct(lm, greedy.tokens, Sampler(0.0), num_samples=2)
    assert counterfactual(lm, posts[0], _null(posts[0])).tokens == greedy.tokens
    with pytest.raises(ValueError, match="outside the support"):
        _abduct(lm, HUMAN, Sampler(0.0))


def test_summarize_counts_distinct_texts(lm, observed):
    (post,) = _abduct(lm, observed["t1"], Sampler(1.0), num_samples=1)
    traces = [dataclasses.replace(post, text=t) for t in ["b x", "a", "b x", "c", "b x", "a"]]
    s = summarize(traces, contains="b")
    assert s.counts == [("b x", 3), ("a", 2), ("c", 1)] and s.total == 6 and s.share == 0.5
    assert "50.0% of 6 contain 'b'" in str(s)
    assert summarize(traces).share is None
    with pytest.raises(ValueError, match="at least one trace"):
        summarize([])


def test_edit_prompt_on_an_abducted_trace(lm, observed):
    posts = _abduct(lm, observed["t1"], Sampler(1.0))
    cfs = counterfactuals(lm, posts, [EditPrompt(prompt="the sailor rowed")] * N)
    assert cfs[0].prompt == "the sailor rowed" and cfs[0].posterior == posts[0].posterior
    assert len({tuple(c.tokens) for c in cfs}) > 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(tokens=[]), "posterior.tokens must be a non-empty list"),
        (lambda p: p.pop("key"), "posterior must have the fields"),
        (lambda p: p.update(full_support="yes"), "posterior.full_support"),
        (lambda p: p.update(sampler={"temp": 1}), "unknown Sampler fields"),
        (lambda p: p.update(key=[1, 2, 3]), "posterior.key is not the raw data of a key"),
    ],
)
def test_a_corrupted_posterior_record_is_refused(lm, observed, change, message):
    (post,) = _abduct(lm, observed["t1"], Sampler(1.0), num_samples=1)
    d = json.loads(post.to_json())
    change(d["posterior"])
    with pytest.raises(ValueError, match=message):
        Trace.from_dict(d)


BAD = {
    "empty text": (dict(response=""), "observed response is empty"),
    "empty ids": (dict(response=[]), "observed response is empty"),
    "out of vocabulary": (dict(response=[5, 300]), "token id 300 at position"),
    "no round trip": (dict(response=" the captain \u20ac"), "cannot round-trip"),
    "early stop": (dict(response=[5, 2, 7], stop_tokens=(2,)), "stop token 2 at step 1"),
    "too long": (dict(response=[5] * 1100), "does not fit"),
    "mechanism": (dict(sampler=Sampler(mechanism="inverse-cdf")), "'gumbel' mechanism"),
    "samples": (dict(num_samples=0), "num_samples must be an integer >= 1"),
    "greedy full": (dict(sampler=Sampler(0.0), full_support=True), "full_support needs"),
    "short budget": (dict(max_new_tokens=3), "below the observed response"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_abduction_inputs(lm, name):
    kw, message = BAD[name]
    kw = {"response": [5, 6, 7, 8], "sampler": Sampler(1.0), **kw}
    with pytest.raises(ValueError, match=message):
        _abduct(lm, kw.pop("response"), kw.pop("sampler"), **kw)


def test_other_mechanisms_cannot_replay_abducted_noise(lm, observed):
    (post,) = _abduct(lm, observed["t1"], Sampler(1.0), num_samples=1)
    with pytest.raises(ValueError, match="replay it with the 'gumbel' mechanism"):
        counterfactual(lm, post, ChangeSampler(mechanism="gumbel-rank"))


@pytest.mark.slow
def test_smollm2_replays_posterior_samples_exactly():
    """On the real model: every posterior sample replays the observed text, for each sampler
    (truncating samplers on a text they wrote themselves, so that it lies in their support)."""
    lm = cfjax.load("smollm2-135m-instruct")
    prompt = "Tell me a short story about a ship captain named Ahab."
    human = "Captain Ahab stood at the bow of his ship, staring at the sea."
    for sampler in (Sampler(1.0), Sampler(0.7), Sampler(1.0, top_k=50), Sampler(0.8, top_p=0.9)):
        text = human
        if sampler.top_k is not None or sampler.top_p is not None:
            text = generate(lm, prompt, key=4, sampler=sampler, max_new_tokens=24).tokens
        posts = abduct(lm, prompt, text, key=0, sampler=sampler, num_samples=3)
        null = counterfactuals(lm, posts, [_null(p) for p in posts])
        assert [c.tokens for c in null] == [posts[0].tokens] * 3, sampler
    cfs = counterfactuals(lm, posts, [ReplaceTokens(16, [posts[0].tokens[17]])] * 3)
    assert all(c.tokens[:16] == posts[0].tokens[:16] for c in cfs)


def test_interventional_on_an_abducted_trace_uses_fresh_noise(lm, observed):
    from cfjax.causal import interventional

    (post,) = _abduct(lm, observed["t1"], Sampler(1.0), num_samples=1)
    edit = ReplaceTokens(12, [(observed["t1"][12] + 5) % 256])
    fresh = interventional(lm, post, edit, key=9)
    assert fresh.posterior is None and fresh.alignment["fresh_noise"] is True
    assert fresh.tokens[:12] == observed["t1"][:12]
    assert fresh.tokens != counterfactual(lm, post, edit).tokens
