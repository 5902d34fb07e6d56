"""The decoding engine (core.decode, runtime.driver, cfjax.generate, cfjax.Trace), tiny preset.

References are independent of the scan: the plain no-cache `cfjax.forward`, a numpy transcription
of the sampler masks with noise drawn straight from `jax.random`, an eager Python-loop decode,
and a from-scratch textbook JAX decode that shares no model code (`benchmarks/plain_scan.py`).
Every run uses a few fixed shapes (batch 1 or 8, bucket 32 or 64, 48 steps in chunks of 16) so
that compiled programs are shared between tests.
"""

from __future__ import annotations

import functools
import json
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ref_keep

import cfjax
from cfjax.causal.factual import STREAM_EVERY, generate
from cfjax.causal.trace import Trace
from cfjax.core import kernel, model, scm
from cfjax.core.cache import init_cache
from cfjax.core.scm import Sampler
from cfjax.runtime import driver
from cfjax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
N = 48  # max_new_tokens of most runs
CHUNK = 16
PROMPT = [3, 17, 99, 5, 200, 42, 7]
SEED = 1
KEY = jax.random.key(SEED)
V = 256  # tiny preset vocab


@pytest.fixture(scope="module")
def lm():
    c = cfjax.preset("tiny")
    assert c.vocab_size == V
    return cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=4.0), model_id="tiny")


def gen(lm, prompt=PROMPT, **kw):
    kw.setdefault("key", KEY)
    kw.setdefault("max_new_tokens", N)
    kw.setdefault("chunk", CHUNK)
    return generate(lm, prompt, **kw)


@pytest.fixture(scope="module")
def base(lm):
    """The reference run: τ = 1, one row, no stop token."""
    return gen(lm)


# --- independent references -------------------------------------------------------------------


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x[np.isfinite(x)])
    return x - m - np.log(np.sum(np.exp(x - m)))


def response_logits(lm, prompt, tokens) -> np.ndarray:
    """f32[len(tokens), V]: row i = forward(prompt + tokens[:i])[-1] (one causal no-cache pass)."""
    seq = list(prompt) + list(tokens)
    logits = np.asarray(cfjax.forward(lm, [seq]))[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def check_contract(lm, prompt, tokens, logprobs, key, sampler, noise_index=None, forced=()):
    """tokens[i] == argmax(mask(forward(prompt + tokens[:i])[-1] / τ) + gumbel(fold_in(key, j)))
    with j = noise_index[i], and logprobs[i] == log_softmax(masked tempered logits)[tokens[i]].
    Returns the number of steps at which the mask changed the choice.

    Steps listed in `forced` are not sampled: only their log-prob is checked. A mismatch is
    tolerated only at a near-tie (top two scores within 1e-4, where float rounding of the cached
    vs uncached forward may decide), and there may be at most one such step.
    """
    rows = response_logits(lm, prompt, tokens)
    noise_index = list(range(len(tokens))) if noise_index is None else noise_index
    near_ties = mask_mattered = 0
    for i, tok in enumerate(tokens):
        row = rows[i]
        if sampler.greedy:
            score = row.astype(np.float32)
            want_lp = log_softmax64(row)[tok]
        else:
            z = row.astype(np.float32) / np.float32(sampler.temperature)
            keep, margin = ref_keep(z, sampler.top_k, sampler.top_p)
            assert margin > 1e-5, f"step {i}: nucleus edge too close to p to test"
            zm = np.where(keep, z, np.float32(-np.inf)).astype(np.float32)
            g = np.asarray(
                jax.random.gumbel(jax.random.fold_in(key, noise_index[i]), (V,), jnp.float32)
            )
            score = zm + g
            want_lp = log_softmax64(zm)[tok]
            mask_mattered += int(np.argmax(z + g) != np.argmax(score))
        np.testing.assert_allclose(logprobs[i], want_lp, atol=1e-4, err_msg=f"step {i}")
        if i in forced:
            continue
        want = int(np.argmax(score))
        if tok != want:
            top2 = np.sort(score)[-2:]
            assert top2[1] - top2[0] < 1e-4 and score[tok] == top2[0], (i, tok, want)
            near_ties += 1
    assert near_ties <= 1
    return mask_mattered


# --- the mechanism contract -------------------------------------------------------------------

SAMPLERS = {
    "t1": Sampler(),
    "t0.7-topk5": Sampler(temperature=0.7, top_k=5),
    "topp0.9": Sampler(top_p=0.9),
    "greedy": Sampler(temperature=0.0),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_mechanism_contract_against_forward(lm, base, name):
    sampler = SAMPLERS[name]
    t = base if name == "t1" else gen(lm, sampler=sampler)
    assert len(t.tokens) == len(t.logprobs) == N and t.noise_index == list(range(N))
    mask_mattered = check_contract(lm, PROMPT, t.tokens, t.logprobs, KEY, sampler)
    if not sampler.greedy:
        # The noise matters: greedy decoding of the same logits disagrees somewhere...
        rows = response_logits(lm, PROMPT, t.tokens)
        assert np.any(np.argmax(rows, axis=-1) != np.asarray(t.tokens))
        # ...and so does another key's noise, so the check above can tell keys apart.
        with pytest.raises(AssertionError):
            check_contract(lm, PROMPT, t.tokens, t.logprobs, jax.random.key(99), sampler)
    if sampler.top_k is not None or sampler.top_p is not None:
        # The truncation was active: at some step the unmasked argmax lay outside the kept set.
        assert mask_mattered > 0


def test_causal_rows_equal_prefix_forwards(lm, base):
    """The one-pass reference above equals forward(prompt + tokens[:i])[-1] literally."""
    rows = response_logits(lm, PROMPT, base.tokens)
    for i in (0, 21):
        alone = np.asarray(cfjax.forward(lm, [PROMPT + base.tokens[:i]]))[0, -1]
        np.testing.assert_allclose(rows[i], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mechanism", ["inverse-cdf", "gumbel-rank"])
def test_comparison_mechanisms_against_forward(lm, base, mechanism):
    sampler = Sampler(mechanism=mechanism)
    t = gen(lm, sampler=sampler)
    rows = jnp.asarray(response_logits(lm, PROMPT, t.tokens))
    choose = jax.jit(jax.vmap(functools.partial(scm.choose, sampler=sampler), in_axes=(0, None, 0)))
    want, want_lp = choose(rows, KEY, jnp.arange(N))
    assert t.tokens == np.asarray(want).tolist()
    np.testing.assert_allclose(t.logprobs, want_lp, atol=1e-4)
    assert t.tokens != base.tokens  # a different mechanism maps the same key to other tokens


def test_forced_tokens_and_noise_index_inside_the_scan(lm, base):
    """Forced steps are fed to the cache; later steps sample with the given noise index."""
    sampler = Sampler()
    forced = np.full((1, N), kernel.NOT_FORCED, np.int32)
    forced[0, :3] = base.tokens[:3]
    forced[0, 3] = (base.tokens[3] + 1) % V  # an edit: the rest of the response changes
    shift = np.arange(N, dtype=np.int32)[None] + 5
    out = _decode(lm, sampler, forced=forced, noise_index=shift)
    toks = out.tokens[0]
    assert toks[:4] == forced[0, :4].tolist() and toks != base.tokens
    check_contract(
        lm, PROMPT, toks, out.logprobs[0], KEY, sampler, noise_index=shift[0], forced=range(4)
    )


@pytest.mark.parametrize("sampler", [Sampler(), Sampler(temperature=0.0)], ids=["t1", "greedy"])
def test_forcing_the_factual_tokens_changes_nothing(lm, sampler):
    """A null intervention at decode level: same tokens and same log-probs, greedy included."""
    free = _decode(lm, sampler)
    forced = np.full((1, N), kernel.NOT_FORCED, np.int32)
    forced[0, :20] = free.tokens[0][:20]
    again = _decode(lm, sampler, forced=forced)
    assert again.tokens == free.tokens
    np.testing.assert_array_equal(again.logprobs, free.logprobs)


def _decode(lm, sampler, *, prompt=PROMPT, stop_tokens=(), on_chunk=None, steps=N, resume=None,
            report_every=None, **kw):  # fmt: skip
    request = driver.Request([prompt], KEY[None], [sampler], steps, **kw)
    return driver.run(lm.config, lm.params, request, stop_tokens=stop_tokens, chunk=CHUNK,
                      on_chunk=on_chunk, resume=resume, report_every=report_every)  # fmt: skip


# --- determinism ------------------------------------------------------------------------------


def test_same_key_same_tokens(lm, base):
    again = gen(lm)
    assert again.tokens == base.tokens and again.logprobs == base.logprobs
    assert gen(lm, key=SEED + 1).tokens != base.tokens


@pytest.mark.parametrize("chunk", [20, 48])  # 20: the last chunk runs past N
def test_chunk_size_changes_no_token(lm, base, chunk):
    t = gen(lm, chunk=chunk)
    assert t.tokens == base.tokens
    # Another scan length is another XLA program: logits may round differently (seen: 1e-5).
    np.testing.assert_allclose(t.logprobs, base.logprobs, atol=1e-4)


@pytest.mark.slow
def test_jit_scan_equals_eager_step_by_step(lm, base):
    """A Python loop of un-jitted single steps on an unpadded cache, choosing with scm.choose."""
    c, p, steps = lm.config, lm.params, 24
    cache = init_cache(c, 1, len(PROMPT) + steps)
    logits, cache = model.apply(c, p, jnp.asarray([PROMPT], jnp.int32), None, cache, 0)
    tokens, lps = [], []
    for i in range(steps):
        tok, lp = scm.choose(logits[0, -1], KEY, i, Sampler())
        tokens.append(int(tok))
        lps.append(float(lp))
        feed = jnp.asarray([[tokens[-1]]], jnp.int32)
        logits, cache = model.apply(c, p, feed, None, cache, len(PROMPT) + i)
    assert tokens == base.tokens[:steps]
    np.testing.assert_allclose(lps, base.logprobs[:steps], atol=1e-4)


# Rows of a batch of 8: other prompt lengths (1 token; longer than a bucket of 32, so the batch
# pads row 0 differently from a solo run), and per-row keys given in three forms.
OTHER_PROMPTS = [
    [9],
    [250, 1],
    [5] * 12,
    list(range(40, 73)),
    [77] * 20,
    list(range(100, 140)),
    [8],
]


def _row_keys():
    keys = [KEY] + [jax.random.key(100 + b) for b in range(1, 8)]
    given = list(keys)
    given[2] = np.asarray(jax.random.key_data(keys[2]))  # raw uint32 key data
    given[3] = 103  # an int seed: jax.random.key(103)
    return keys, given


@pytest.fixture(scope="module")
def batch(lm):
    keys, given = _row_keys()
    return gen(lm, [PROMPT, *OTHER_PROMPTS], key=given), keys


def test_batch_rows_equal_their_solo_runs(lm, base, batch):
    traces, keys = batch
    assert len(traces) == 8
    assert traces[0].tokens == base.tokens
    # Other padding and batch shape, other XLA program: logits may round differently (seen 2e-5).
    np.testing.assert_allclose(traces[0].logprobs, base.logprobs, atol=1e-4)
    for b, (t, prompt) in enumerate(zip(traces, [PROMPT, *OTHER_PROMPTS], strict=True)):
        np.testing.assert_array_equal(jax.random.key_data(t.key), jax.random.key_data(keys[b]))
        assert t.prompt_tokens == prompt
        if b:
            assert gen(lm, prompt, key=keys[b]).tokens == t.tokens, b
    assert len({tuple(t.tokens) for t in traces}) == 8


def test_single_key_for_a_batch_is_split(lm, base, batch):
    """Observed: one key for B rows becomes `jax.random.split(key, B)`, one per row, so row 0
    does NOT reproduce a solo run with that key (pass `[key, ...]` per row for that)."""
    traces = gen(lm, [PROMPT, *OTHER_PROMPTS], key=KEY)
    split = jax.random.split(KEY, 8)
    for b, t in enumerate(traces):
        np.testing.assert_array_equal(jax.random.key_data(t.key), jax.random.key_data(split[b]))
    again = gen(lm, [PROMPT, *OTHER_PROMPTS], key=list(split))
    assert [t.tokens for t in traces] == [t.tokens for t in again]
    assert traces[0].tokens != base.tokens


def test_key_forms(lm, base):
    assert gen(lm, key=SEED).tokens == base.tokens
    assert gen(lm, key=np.asarray(jax.random.key_data(KEY))).tokens == base.tokens
    assert gen(lm, key=[KEY]).tokens == base.tokens
    assert gen(lm, key=KEY[None]).tokens == base.tokens
    assert jnp.issubdtype(base.key.dtype, jax.dtypes.prng_key)
    with pytest.raises(ValueError, match="got 3 keys for a batch of 2 prompts"):
        gen(lm, [PROMPT, PROMPT], key=jax.random.split(KEY, 3))


def test_tokens_equal_a_textbook_jax_decode(lm, batch):
    """cfjax samples exactly the tokens of `benchmarks/plain_scan.py`: a from-scratch JAX decode
    (its own attention, RoPE, cache and scan) that only applies the noise contract
    `argmax(logits + gumbel(fold_in(key_b, t), (V,)))`, with each row's own key; and so does
    its form with a `lax.scan` over stacked layers (gpu_check's compile-time yardstick)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plain_scan

    keys = jnp.stack(batch[1])
    traces = gen(lm, [PROMPT] * len(keys), key=keys)
    prompts = jnp.asarray([PROMPT] * len(keys), jnp.int32)
    plain = np.asarray(plain_scan.generate(lm.config, lm.params, prompts, keys, N))
    assert plain.shape == (8, N) and len({tuple(row) for row in plain}) == 8
    np.testing.assert_array_equal(np.array([t.tokens for t in traces]), plain)
    stacked = plain_scan.stack_layers(lm.params)
    assert stacked["layers"]["mlp"]["down"]["kernel"].shape[0] == lm.config.n_layers
    scanned = plain_scan.generate(lm.config, stacked, prompts, keys, N)
    np.testing.assert_array_equal(np.asarray(scanned), plain)


def test_array_prompts(lm, base, batch):
    assert gen(lm, np.asarray(PROMPT)).tokens == base.tokens
    assert gen(lm, jnp.asarray(PROMPT, jnp.int32)).tokens == base.tokens
    rows = [jnp.asarray(p, jnp.int32) for p in [PROMPT, *OTHER_PROMPTS]]
    assert [t.tokens for t in gen(lm, rows, key=batch[1])] == [t.tokens for t in batch[0]]


# --- a growing cache (by default for batches of GROW_MIN_BATCH rows or more on the CPU) --------


WIDE = driver.GROW_MIN_BATCH


def _wide_request(steps=N, **kw):
    """WIDE rows of different prompt lengths (one bucket) and keys."""
    prompts = [PROMPT[: 2 + i % 6] for i in range(WIDE)]
    return driver.Request(prompts, jax.random.split(KEY, WIDE), [Sampler()] * WIDE, steps, **kw)


def _wide(lm, request=None, **kw):
    request = _wide_request() if request is None else request
    return driver.run(lm.config, lm.params, request, stop_tokens=(), chunk=CHUNK, **kw)


@pytest.mark.slow  # 20-60 s: in `make test-slow`, which CI runs too
def test_a_growing_cache_changes_no_token(lm):
    """A growing cache is grown a chunk before each chunk needs it: the tokens of attending over
    every slot from the first step, and the stored cache has every slot (on any backend: the
    policy is an argument)."""
    grown = _wide(lm, grow_cache=True)
    b = grown.bucket
    assert grown.slots == [b + CHUNK, b + 2 * CHUNK, b + 3 * CHUNK]
    full = _wide(lm, grow_cache=False)
    assert full.slots == [b + 3 * CHUNK] * 3 and grown.tokens == full.tokens
    # Another cache length is another XLA program: logits may round differently (seen: 1.4e-5).
    np.testing.assert_allclose(grown.logprobs, full.logprobs, atol=1e-4)
    assert grown.cache.length == full.cache.length == kernel.cache_length(b, N, CHUNK)
    np.testing.assert_allclose(grown.cache.k[0], full.cache.k[0], atol=1e-5)
    # A cache sized for more steps than run is padded to all of them at the end.
    more = _wide(lm, _wide_request(steps=20, cache_steps=N), grow_cache=True)
    assert more.cache.length == kernel.cache_length(b, N, CHUNK)
    assert [t[:20] for t in grown.tokens] == more.tokens
    # The backend default: grown on the CPU from GROW_MIN_BATCH rows.
    assert driver.grows_by_default(WIDE, None, None) == (jax.default_backend() == "cpu")
    assert not driver.grows_by_default(WIDE - 1, None, None)


def test_a_run_resumed_from_a_grown_cache_repeats_the_factual_steps_exactly(lm):
    """Resumed mid-chunk from the stored cache, a growing run computes each step with the cache
    length the factual run had at that step: the same tokens and bit-equal log-probs."""
    factual = _wide(lm, grow_cache=True)
    first = CHUNK + 5
    resume = driver.Resume(
        jax.tree_util.tree_map(jnp.copy, factual.cache), factual.start, factual.bucket, first,
        [t[first - 1] for t in factual.tokens], CHUNK,
    )  # fmt: skip
    again = _wide(lm, resume=resume, grow_cache=True)
    assert again.resumed and again.slots == [factual.bucket + 2 * CHUNK, factual.bucket + 3 * CHUNK]  # fmt: skip
    assert again.tokens == [t[first:] for t in factual.tokens]
    np.testing.assert_array_equal(again.logprobs, [p[first:] for p in factual.logprobs])
    assert again.cache.length == factual.cache.length and again.index == factual.index


# --- stop tokens and padding --------------------------------------------------------------------


def _truncate(tokens: list[int], stops) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


@pytest.fixture(scope="module")
def stops(base, spm_free):
    """Stop tokens the model really emits (5th token of two free runs); one set for the stop
    tests, so that they share one compiled program."""
    return (base.tokens[4], spm_free.tokens[4])


def test_stop_token_ends_the_row(lm, base, stops):
    want = _truncate(base.tokens, set(stops))
    assert len(want) <= 5
    t = gen(lm, stop_tokens=stops)
    assert t.tokens == want and t.stopped and t.stop_tokens == stops
    np.testing.assert_allclose(t.logprobs, base.logprobs[: len(want)], atol=1e-6)
    assert t.noise_index == list(range(len(want)))
    # The engine stops once every row is done: one chunk instead of three.
    calls = []
    out = _decode(lm, Sampler(), stop_tokens=stops, on_chunk=calls.append)
    assert out.tokens == [want] and len(calls) == 1
    # ... and that chunk ended at the stop: exactly len(want) steps ran (cache slots written).
    assert out.index == kernel.bucket_length(len(PROMPT)) + len(want)


def test_reporting_every_few_steps_changes_no_bit(lm):
    """`report_every` runs each chunk's program on shifted windows: the host hears of tokens
    every few steps, and the tokens, log-probs and cache are those of whole chunks."""
    whole = _decode(lm, Sampler())
    seen = []
    out = _decode(lm, Sampler(), on_chunk=lambda rows: seen.append(len(rows[0])), report_every=5)
    assert out.tokens == whole.tokens
    np.testing.assert_array_equal(out.logprobs, whole.logprobs)
    np.testing.assert_array_equal(out.cache.k[0], whole.cache.k[0])
    assert seen == [5, 10, 15, 16, 21, 26, 31, 32, 37, 42, 47, 48]  # never across a chunk


def test_a_short_last_chunk_runs_only_the_steps_left(lm, base):
    bucket = kernel.bucket_length(len(PROMPT))
    for steps in (5, CHUNK + 3):
        out = _decode(lm, Sampler(), steps=steps)
        assert out.tokens == [base.tokens[:steps]]
        assert out.index == bucket + steps  # no step past the last one ran


def test_a_stored_cache_of_another_layout_is_not_used(lm, base):
    """A write past the cache's end would be clamped onto its last slot: a stored cache shorter
    than the run's steps need is not resumed; the run prefills and gives the same tokens."""
    bucket = kernel.bucket_length(len(PROMPT))
    short = init_cache(lm.config, 1, bucket + 4)
    resume = driver.Resume(short, np.asarray([bucket - len(PROMPT) + 1]), bucket, 0, [PROMPT[-1]], CHUNK)  # fmt: skip
    out = _decode(lm, Sampler(), steps=5, resume=resume)
    assert not out.resumed and out.tokens == [base.tokens[:5]]


def test_rows_stopping_early_do_not_affect_others(lm, batch):
    free, keys = batch
    stops = {free[0].tokens[4], free[3].tokens[20]}
    traces = gen(lm, [PROMPT, *OTHER_PROMPTS], key=keys, stop_tokens=sorted(stops))
    want = [_truncate(t.tokens, stops) for t in free]
    assert [t.tokens for t in traces] == want
    lengths = [len(w) for w in want]
    assert len(set(lengths)) >= 3 and min(lengths) <= 5  # rows stop at different steps
    for t, f, w in zip(traces, free, want, strict=True):
        assert t.logprobs == pytest.approx(f.logprobs[: len(w)], abs=1e-6)
        assert t.stopped == (w[-1] in stops)


# --- tokenizers: text prompts, streaming --------------------------------------------------------


@pytest.fixture(scope="module")
def spm_lm(lm, tmp_path_factory):
    """The tiny model with a sentencepiece BPE vocabulary of exactly 256 ids trained here."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm256")
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6)))
        for _ in range(400)
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "t"),
        vocab_size=V,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    tok = cfjax.tokenizer.load(folder / "t.model")
    assert tok.vocab_size == V and tok.stop_tokens == (2,)
    return lm.replace(tokenizer=tok)


class ByteTokenizer(Tokenizer):
    """One token per byte: random tokens split UTF-8 characters and leave invalid bytes."""

    def __init__(self):
        super().__init__(
            name="bytes", spec="bytes", vocab_size=V, special_tokens={}, bos_id=None, eos_id=None
        )

    def _encode_plain(self, text):
        return list(text.encode())

    def _token_bytes(self, token_id):
        return bytes([token_id])


@pytest.fixture(scope="module")
def spm_free(spm_lm):
    return gen(spm_lm, "abc def", chat=False, stop_tokens=())


def test_text_prompt_stream_and_no_padding_in_text(spm_lm, spm_free, stops):
    tok, free = spm_lm.tokenizer, spm_free
    assert free.prompt_tokens == [tok.bos_id, *tok.encode("abc def")]
    assert free.prompt == "abc def" and free.text == tok.decode(free.tokens)
    pieces = []
    t = gen(spm_lm, "abc def", chat=False, stop_tokens=stops, stream=pieces.append)
    want = _truncate(free.tokens, set(stops))
    assert t.tokens == want and t.stopped and len(want) <= 5
    assert t.text == tok.decode(want[:-1])  # the stop token is not text; nothing after it is
    assert "".join(pieces) == t.text
    # Long generation streams: pieces arrive every few steps (not chunk by chunk), in order,
    # and streaming changes no bit of the result.
    pieces = []
    t = gen(spm_lm, "abc def", chat=False, stop_tokens=(), stream=pieces.append)
    assert t.tokens == free.tokens and t.logprobs == free.logprobs
    assert N // CHUNK < len(pieces) <= N // STREAM_EVERY
    assert "".join(pieces) == t.text == free.text


def test_stream_with_split_utf8_characters(lm):
    """The streamed pieces concatenate to the final text even when it ends in U+FFFD."""
    blm = lm.replace(tokenizer=ByteTokenizer())
    ends_replaced = 0
    for seed in range(8):
        pieces = []
        t = gen(blm, [97, 98], key=seed, stream=pieces.append)
        assert t.text == bytes(t.tokens).decode("utf-8", errors="replace")
        assert "".join(pieces) == t.text, seed
        ends_replaced += t.text.endswith("\ufffd")
    assert ends_replaced >= 1  # the case that needs the final flush was exercised


def test_on_chunk_rows_grow_to_the_final_tokens(lm, base):
    seen = []
    out = _decode(lm, Sampler(), on_chunk=lambda rows: seen.append([list(r) for r in rows]))
    assert out.tokens == [base.tokens]
    assert [len(s[0]) for s in seen] == [16, 32, 48]
    assert all(s[0] == base.tokens[: len(s[0])] for s in seen)


def test_text_prompt_needs_a_tokenizer(lm):
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        gen(lm, "hello")


# --- traces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["stopped", "topk"])
def test_trace_json_round_trip_and_replay(spm_lm, stops, tmp_path, which):
    if which == "stopped":
        t = gen(spm_lm, "abc def", chat=False, stop_tokens=stops)
        assert t.stopped and t.text
    else:
        t = gen(spm_lm, "abc def", chat=False, sampler=SAMPLERS["t0.7-topk5"], stop_tokens=())
        t.logprobs[1] = float("-inf")  # e.g. a forced impossible token: serialised as null
    text = t.to_json(tmp_path / "t.json")
    assert json.loads(text)["key"] == np.asarray(jax.random.key_data(t.key)).tolist()
    for back in (Trace.from_json(text), Trace.from_json(tmp_path / "t.json")):
        for f in (
            "model_id prompt_tokens tokens sampler max_new_tokens noise_index logprobs text "
            "prompt system chat stop_tokens interventions alignment"
        ).split():
            assert getattr(back, f) == getattr(t, f), f
        assert back.key.dtype == t.key.dtype
        np.testing.assert_array_equal(jax.random.key_data(back.key), jax.random.key_data(t.key))
        assert back.to_json() == text
    # Replay from the deserialised trace alone reproduces the response.
    again = generate(
        spm_lm,
        back.prompt_tokens,
        key=back.key,
        sampler=back.sampler,
        max_new_tokens=back.max_new_tokens,
        stop_tokens=back.stop_tokens,
        chunk=CHUNK,
    )
    assert again.tokens == t.tokens and again.text == t.text


def test_trace_json_non_ascii_text(lm, tmp_path):
    t = gen(lm.replace(tokenizer=ByteTokenizer()), [97, 98], key=3)
    assert any(ord(ch) > 127 for ch in t.text)
    back = Trace.from_json(t.to_json(tmp_path / "u.json"))
    assert back.text == t.text and back.tokens == t.tokens


# --- compilation ------------------------------------------------------------------------------


def test_new_prompt_length_in_bucket_does_not_recompile(lm):
    gen(lm, [4] * 10)  # warm: bucket 32
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        t = gen(lm, [6] * 30)  # another length, same bucket
        assert len(t.tokens) == N and compiles == []
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(5))  # the listener does see compilations
        assert len(compiles) >= 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature must be 0 \\(greedy\\) or a finite number"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
    ],
)
def test_bad_sampler(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)


def test_bad_requests(lm):
    room = lm.config.max_seq_len - len(PROMPT)
    with pytest.raises(ValueError, match=r"\(7 tokens\) \+ max_new_tokens 1018 exceeds .* 1024"):
        gen(lm, max_new_tokens=room + 1)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        gen(lm, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        gen(lm, [])
    with pytest.raises(ValueError, match="empty"):
        gen(lm, [PROMPT, []])
    with pytest.raises(ValueError, match=r"token id 256 at position \(1,\) is outside"):
        gen(lm, [1, 256])
    with pytest.raises(ValueError, match=r"prompt of row 1: token id -3 at position \(0,\)"):
        gen(lm, [PROMPT, [-3, 4]])


def test_response_may_fill_the_context(lm):
    """A request exactly at max_seq_len runs (the cache's pad slots and chunk rounding are not
    positions), one token more is refused."""
    short = lm.replace(config=lm.config.replace(max_seq_len=64))
    t = gen(short, max_new_tokens=64 - len(PROMPT))
    assert len(t.tokens) == 64 - len(PROMPT)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        gen(short, max_new_tokens=64 - len(PROMPT) + 1)


def test_generate_importable():
    assert cfjax.generate is generate and sys.modules["cfjax.causal.factual"].generate is generate
