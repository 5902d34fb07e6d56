"""`cfjax.core.sample` under jit and vmap, traced samplers, one compiled program, the cache store.

References: `cfjax.generate` and `cfjax.counterfactual` (the host API over the same engine),
the one-by-one calls of `sample` itself, and the step-keyed Gumbel formula written out here.
Shapes are fixed (tiny preset, prompt bucket 32, 48 steps) so that programs are shared.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cfjax
from cfjax.core import kernel, model
from cfjax.core.cache import init_cache
from cfjax.runtime import driver
from cfjax.runtime.store import CacheStore, Stored

N = 48
PROMPT = [3, 17, 99, 5, 200, 42, 7]
KEY = jax.random.key(1)
SAMPLERS = {
    "greedy": cfjax.Sampler(temperature=0.0),
    "t0.7": cfjax.Sampler(temperature=0.7),
    "topk": cfjax.Sampler(temperature=1.0, top_k=5),
    "topp": cfjax.Sampler(temperature=1.0, top_p=0.8),
    "topk-topp": cfjax.Sampler(temperature=0.8, top_k=20, top_p=0.9),
}


@pytest.fixture(scope="module")
def lm():
    c = cfjax.preset("tiny")
    return cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=4.0), model_id="tiny")


def padded(prompt=PROMPT) -> np.ndarray:
    """The prompt in a buffer of `bucket_length` slots: the shapes `generate` runs."""
    out = np.zeros((kernel.bucket_length(len(prompt)),), np.int32)
    out[: len(prompt)] = prompt
    return out


def sample(lm, key=KEY, sampler=SAMPLERS["t0.7"], params=None, **kw):
    params = lm.params if params is None else params
    return cfjax.core.sample(
        lm.config, params, padded(), len(PROMPT), key, sampler, max_new_tokens=N, **kw
    )


@functools.cache
def compile_counter():
    """A list that grows by one entry per XLA compilation in this process."""
    seen = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    return seen


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_equals_generate(lm, name):
    sampler = SAMPLERS[name]
    want = cfjax.generate(lm, PROMPT, key=KEY, sampler=sampler, max_new_tokens=N)
    got = sample(lm, sampler=sampler)
    assert isinstance(got, cfjax.core.Sampled)
    assert got.tokens.dtype == jnp.int32 and got.tokens.shape == (N,) and int(got.length) == N
    assert got.tokens.tolist() == want.tokens
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_stop_token_length_and_zero_padding(lm):
    free = sample(lm).tokens.tolist()
    stop = free[5]
    out = sample(lm, stop_tokens=(stop,))
    n = free.index(stop) + 1
    assert int(out.length) == n and out.tokens[:n].tolist() == free[:n]
    assert not np.any(out.tokens[n:]) and not np.any(out.logprobs[n:])
    t = cfjax.generate(lm, PROMPT, key=KEY, sampler=SAMPLERS["t0.7"], max_new_tokens=N,
                       stop_tokens=(stop,))  # fmt: skip
    assert t.tokens == free[:n]


def test_nested_vmap_over_keys_and_temperatures_equals_calls_one_by_one(lm):
    keys = jax.random.split(jax.random.key(5), 4)
    temperatures = jnp.asarray([0.0, 0.5, 1.0])
    one = lambda key, t: sample(lm, key=key, sampler=cfjax.Sampler(temperature=t))
    grid = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))(
        keys, temperatures
    )
    assert grid.tokens.shape == (4, 3, N)
    for i in range(4):
        for j in range(3):
            alone = one(keys[i], float(temperatures[j]))
            assert grid.tokens[i, j].tolist() == alone.tokens.tolist(), (i, j)
            np.testing.assert_allclose(grid.logprobs[i, j], alone.logprobs, atol=1e-4)
    # τ = 0 stays greedy when traced: every key gives the same tokens.
    assert len({tuple(grid.tokens[i, 0].tolist()) for i in range(4)}) == 1
    assert len({tuple(grid.tokens[i, 2].tolist()) for i in range(4)}) == 4


def test_vmap_over_a_grid_of_samplers(lm):
    grid = cfjax.Sampler(
        temperature=jnp.asarray([0.7, 1.0, 0.9]),
        top_k=jnp.asarray([3, 50, 256]),
        top_p=jnp.asarray([1.0, 0.8, 0.95]),
    )
    out = jax.vmap(lambda s: sample(lm, sampler=s))(grid)
    for b, (t, k, p) in enumerate([(0.7, 3, 1.0), (1.0, 50, 0.8), (0.9, 256, 0.95)]):
        want = cfjax.generate(
            lm, PROMPT, key=KEY, sampler=cfjax.Sampler(t, k, p), max_new_tokens=N
        ).tokens
        assert out.tokens[b].tolist() == want, b


def test_vmap_over_prompts_lengths_and_forced_prefixes(lm):
    """Rows of other prompt lengths (one buffer of 32 slots) and other forced prefixes."""
    prompts = [PROMPT, [9, 8], list(range(40, 70))]
    buffers = np.stack([padded(p) for p in prompts])
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    forced = np.full((3, N), kernel.NOT_FORCED, np.int32)
    forced[1, :3] = [5, 6, 7]
    run = lambda prompt, n, f: cfjax.core.sample(
        lm.config, lm.params, prompt, n, KEY, SAMPLERS["t0.7"], max_new_tokens=N, forced=f
    )
    out = jax.jit(jax.vmap(run))(buffers, lengths, forced)
    for b, p in enumerate(prompts):
        alone = run(buffers[b], len(p), forced[b])
        assert out.tokens[b].tolist() == alone.tokens.tolist(), b
        if b != 1:
            want = cfjax.generate(lm, p, key=KEY, sampler=SAMPLERS["t0.7"], max_new_tokens=N)
            assert out.tokens[b].tolist() == want.tokens, b
    assert out.tokens[1, :3].tolist() == [5, 6, 7]


def test_vmap_over_stacked_params_equals_each_set(lm):
    other = model.init_params(lm.config, jax.random.key(7), scale=4.0)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), lm.params, other)
    both = jax.jit(jax.vmap(lambda p: sample(lm, params=p)))(stacked)
    for b, params in enumerate([lm.params, other]):
        alone = sample(lm, params=params)
        assert both.tokens[b].tolist() == alone.tokens.tolist()
        np.testing.assert_allclose(both.logprobs[b], alone.logprobs, atol=1e-4)
    assert both.tokens[0].tolist() != both.tokens[1].tolist()


def test_forced_tokens_and_noise_index_give_the_counterfactual(lm):
    fact = cfjax.generate(lm, PROMPT, key=KEY, sampler=SAMPLERS["t0.7"], max_new_tokens=N)
    edit = (fact.tokens[10] + 1) % lm.config.vocab_size
    cf = cfjax.counterfactual(lm, fact, cfjax.ReplaceTokens(10, [edit, 9], count=1))
    m = cf.alignment["resume_at"]
    assert m == 12 and cf.noise_index[m] == 11  # one token inserted: the noise shifted
    forced = np.full((N,), kernel.NOT_FORCED, np.int32)
    forced[:m] = cf.tokens[:m]
    out = sample(lm, forced=forced, noise_index=np.asarray(cf.noise_index[:N], np.int32))
    assert out.tokens.tolist() == cf.tokens[:N]
    np.testing.assert_allclose(out.logprobs, cf.logprobs[:N], atol=1e-4)


def test_explicit_noise_equal_to_the_key_noise_gives_the_same_tokens(lm):
    v = lm.config.vocab_size
    noise = jnp.stack([jax.random.gumbel(jax.random.fold_in(KEY, i), (v,)) for i in range(N)])
    want = sample(lm).tokens.tolist()
    assert sample(lm, noise=noise).tokens.tolist() == want
    # ... and the noise is really used: other noise, other tokens (the key is then ignored).
    other = sample(lm, key=jax.random.key(99), noise=noise).tokens.tolist()
    assert other == want
    assert sample(lm, noise=noise[::-1]).tokens.tolist() != want


def test_sample_inside_a_users_jitted_function(lm):
    """A reward averaged over samples, in the user's own jit: here the response length."""
    stop = sample(lm).tokens.tolist()[3]

    @jax.jit
    def mean_length(keys, temperature):
        run = lambda k: cfjax.core.sample(
            lm.config, lm.params, padded(), len(PROMPT), k, cfjax.Sampler(temperature),
            max_new_tokens=N, stop_tokens=(stop,),
        ).length  # fmt: skip
        return jnp.mean(jax.vmap(run)(keys).astype(jnp.float32))

    keys = jax.random.split(jax.random.key(2), 8)
    lengths = [
        len(cfjax.generate(lm, PROMPT, key=k, sampler=cfjax.Sampler(0.9), max_new_tokens=N,
                           stop_tokens=(stop,)).tokens)
        for k in keys
    ]  # fmt: skip
    assert float(mean_length(keys, 0.9)) == pytest.approx(np.mean(lengths))
    assert len(set(lengths)) > 1


def test_new_sampler_values_compile_nothing(lm):
    compiles = compile_counter()
    samplers = [cfjax.Sampler(0.7, 5, 0.9), cfjax.Sampler(1.3, 11, 0.6), cfjax.Sampler(0.0, 2, 1.0)]
    cfjax.generate(lm, PROMPT, key=KEY, sampler=samplers[0], max_new_tokens=N)
    sample(lm, sampler=samplers[0])
    before = len(compiles)
    outs = [cfjax.generate(lm, PROMPT, key=KEY, sampler=s, max_new_tokens=N) for s in samplers]
    outs += [sample(lm, sampler=s) for s in samplers]
    assert len(compiles) == before
    assert len({tuple(o.tokens if isinstance(o, cfjax.Trace) else o.tokens.tolist())
                for o in outs}) == 3  # fmt: skip
    jax.jit(lambda x: x + 1)(jnp.arange(3))  # the counter does see a compilation
    assert len(compiles) > before


def test_counterfactuals_mixing_four_samplers_is_one_batch_equal_to_one_by_one(lm, monkeypatch):
    fact = cfjax.generate(lm, PROMPT, key=KEY, sampler=SAMPLERS["t0.7"], max_new_tokens=N)
    edit = cfjax.ReplaceTokens(20, [(fact.tokens[20] + 3) % lm.config.vocab_size])
    changes = [
        cfjax.ChangeSampler(temperature=0.4),
        cfjax.ChangeSampler(top_k=4),
        cfjax.ChangeSampler(top_p=0.7),
        cfjax.ChangeSampler(temperature=0.0),
    ]
    runs = []
    real = driver.run
    monkeypatch.setattr(driver, "run", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    batched = cfjax.counterfactuals(lm, fact, [[c, edit] for c in changes])
    assert len(runs) == 1  # one batch, though the samplers differ
    monkeypatch.undo()
    for c, b in zip(changes, batched, strict=True):
        one = cfjax.counterfactual(lm, fact, [c, edit])
        assert b.tokens == one.tokens and b.sampler == one.sampler == c.apply(fact.sampler)
        np.testing.assert_allclose(b.logprobs, one.logprobs, atol=1e-4)
    assert len({tuple(b.tokens) for b in batched}) == 4


def test_a_pickled_trace_holds_no_device_state(lm):
    t = cfjax.generate(lm, PROMPT, key=KEY, sampler=SAMPLERS["topk"], max_new_tokens=N)
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if f.name == "key":
            assert jnp.issubdtype(value.dtype, jax.dtypes.prng_key) and value.shape == ()
        else:
            leaves = jax.tree_util.tree_leaves(value)
            assert not any(isinstance(x, jax.Array) for x in leaves), f.name
    blob = pickle.dumps(t)
    assert len(blob) < 8_000  # tokens, log-probs, a key: no cache, no params
    back = pickle.loads(blob)
    assert back.tokens == t.tokens and back.to_dict() == t.to_dict()


def test_cache_store_is_bounded_and_keyed_by_params_and_tokens(lm):
    cache = init_cache(lm.config, 2, 40)
    stored = lambda params: Stored(cache, np.zeros(2, np.int32), 32, 8, params)
    one = stored(lm.params).nbytes
    store = CacheStore(max_bytes=2 * one)
    store.put(stored(lm.params), [([1, 2], [3]), ([1, 2], [4])])
    assert store.get(lm.params, [1, 2], [4]).row == 1
    assert store.get(dict(lm.params), [1, 2], [4]) is None  # other params object: not theirs
    assert store.get(lm.params, [1, 2], [5]) is None
    store.put(stored(lm.params), [([7], [8]), ([9], [9])])
    store.put(stored(lm.params), [([5], [6]), ([9], [9])])  # evicts the oldest batch
    assert len(store) == 2 and store.nbytes == 2 * one
    assert store.get(lm.params, [1, 2], [3]) is None and store.get(lm.params, [5], [6]) is not None
    assert store.get(lm.params, [9], [9]).stored is store.get(lm.params, [5], [6]).stored
    store.max_bytes = one - 1
    store.put(stored(lm.params), [([0], [0])])  # larger than the bound: not kept
    assert store.get(lm.params, [0], [0]) is None
    store.clear()
    assert len(store) == 0 and store.nbytes == 0


def test_a_counterfactual_without_a_stored_cache_recomputes_the_same(lm, monkeypatch):
    fact = cfjax.generate(lm, PROMPT, key=KEY, sampler=SAMPLERS["t0.7"], max_new_tokens=N)
    edit = cfjax.ReplaceTokens(30, [(fact.tokens[30] + 1) % lm.config.vocab_size])
    reused = cfjax.counterfactual(lm, fact, edit)
    lm.caches.clear()
    calls = []
    real = driver.run
    monkeypatch.setattr(
        driver, "run", lambda *a, **kw: calls.append(kw["resume"]) or real(*a, **kw)
    )
    again = cfjax.counterfactual(lm, fact, edit)
    assert calls == [None] and again.tokens == reused.tokens


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(forced=np.zeros(3, np.int32)), r"forced must have shape \(48,\)"),
        (dict(noise=np.zeros((N, 3), np.float32)), r"noise must have shape \(48, 256\)"),
        (dict(prompt_length=40), r"prompt_length 40 is outside \[1, 32\]"),
    ],
)
def test_sample_bad_arguments(lm, kwargs, match):
    args = dict(max_new_tokens=N, prompt_length=len(PROMPT)) | kwargs
    n = args.pop("prompt_length")
    with pytest.raises(ValueError, match=match):
        cfjax.core.sample(lm.config, lm.params, padded(), n, KEY, SAMPLERS["t0.7"], **args)


def test_traced_sampler_values_are_validated_when_concrete():
    with pytest.raises(ValueError, match="temperature must be 0 \\(greedy\\) or a finite number"):
        cfjax.Sampler(temperature=jnp.asarray([0.5, -1.0]))
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        cfjax.Sampler(top_k=jnp.asarray([0, 3]))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        cfjax.Sampler(top_p=np.asarray([0.5, 1.5]))
    # Traced values pass through (checked where they were concrete).
    assert jax.jit(lambda t: cfjax.Sampler(temperature=t).temperature * 2)(1.5) == 3.0
