"""Batch invariance (issue 30, DESIGN.md §3): a row's tokens and log-probs are bit-identical
whatever batch it runs in — its size, its other rows (other prompts, lengths that change the
prompt bucket, other samplers, forced rows) and the row's place in it — in float32 and
bfloat16. Each row of every batch is compared with its own one-row run."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import inlined_count

import cfjax
from cfjax import Sampler
from cfjax.core import decode, kernel, model

STEPS = 12


def _tiny(dtype: str) -> cfjax.LM:
    c = cfjax.preset("tiny")
    lm = cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=3.0))
    return lm if dtype == "float32" else cfjax.quantize(lm, "bfloat16")


def _same(row: cfjax.Trace, alone: cfjax.Trace, where: str) -> None:
    assert row.tokens == alone.tokens, where
    assert np.asarray(row.logprobs).tobytes() == np.asarray(alone.logprobs).tobytes(), where


def _rows(n: int, seed: int) -> tuple[list[list[int]], list[Sampler]]:
    """`n` prompts of 2 to 45 tokens (two prompt buckets) and a mix of samplers."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 250, int(rng.integers(2, 46))).tolist() for _ in range(n)]
    kinds = [Sampler(0.8), Sampler(1.0, top_k=5), Sampler(0.7, top_p=0.9), Sampler(0.0)]
    return prompts, [kinds[i % len(kinds)] for i in range(n)]


# bfloat16 in `make test` (where batches flipped tokens before, issue 30); float32 (~30 s) slow.
@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "bfloat16"])
def test_every_row_of_every_batch_is_its_one_row_run(dtype):
    lm = _tiny(dtype)
    prompts, samplers = _rows(64, seed=1)
    keys = jax.random.split(jax.random.key(5), 64)
    gen = lambda idx: cfjax.generate(  # noqa: E731
        lm, [prompts[i] for i in idx], key=keys[np.asarray(idx)], chat=False,
        sampler=[samplers[i] for i in idx], max_new_tokens=STEPS,
    )  # fmt: skip
    alone = {i: gen([i])[0] for i in range(64)}
    assert len({tuple(t.tokens) for t in alone.values()}) > 32  # the rows do differ
    # Sizes 1, 2, 3, 8 and 64; row 7 first, in the middle and last; other prompts and lengths.
    batches = [[7, 3], [0, 7, 1], [9, 10, 11, 7, 12, 13, 14, 15], list(range(8, 64)) + list(range(8))]  # fmt: skip
    for idx in batches:
        for pos, row in enumerate(gen(idx)):
            _same(row, alone[idx[pos]], f"row {idx[pos]} at {pos} of {len(idx)}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_counterfactual_rows_forced_among_free_rows(dtype):
    """A batch of counterfactuals (rows forced to different edited prefixes, then free) equals
    each counterfactual alone, and the null edit among them reproduces the factual run."""
    lm = _tiny(dtype)
    fact = cfjax.generate(lm, [5, 9, 17, 33, 2], key=3, chat=False, sampler=Sampler(0.9), max_new_tokens=STEPS)  # fmt: skip
    edits = [cfjax.ReplaceTokens(position=p, tokens=[t]) for p, t in [(2, 40), (5, 41), (0, 42), (8, 43)]]  # fmt: skip
    edits.append(cfjax.ReplaceTokens(position=4, tokens=[fact.tokens[4]]))  # null edit
    batch = cfjax.counterfactuals(lm, fact, edits, reuse_cache=False)
    for edit, row in zip(edits, batch, strict=True):
        _same(row, cfjax.counterfactual(lm, fact, edit, reuse_cache=False), repr(edit))
    _same(batch[-1], fact, "null edit")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_resumed_from_several_stored_batches_are_their_recomputed_runs(dtype):
    """Counterfactuals of traces from two `generate` calls resume as one batch from both
    stored caches (one take of their rows); each row is bit for bit its counterfactual alone
    computed from the prompt, and the stored caches serve again afterwards."""
    lm = _tiny(dtype)
    facts = [cfjax.generate(lm, p, key=k, chat=False, sampler=Sampler(0.9), max_new_tokens=STEPS)
             for p, k in (([5, 9, 17, 33, 2], 3), ([8, 1, 40], 4))]  # fmt: skip
    rows = [(f.prompt_tokens, f.tokens) for f in facts]
    resume = lm.caches.resume(lm.params, rows, 6, [f.tokens[5] for f in facts])
    assert len(resume.cache) == 2  # the caches of two stored batches
    edits = [cfjax.ReplaceTokens(7, [44]), cfjax.ReplaceTokens(6, [45])]
    for _ in range(2):
        batch = cfjax.counterfactuals(lm, facts, edits)
        for f, edit, row in zip(facts, edits, batch, strict=True):
            _same(row, cfjax.counterfactual(lm, f, edit, reuse_cache=False), repr(edit))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_core_sample_under_vmap_is_each_call_alone(dtype):
    lm = _tiny(dtype)
    prompt = np.zeros(kernel.bucket_length(6), np.int32)
    prompt[:6] = [3, 14, 15, 92, 65, 35]
    sample = lambda key, t: decode.sample(lm.config, lm.params, prompt, 6, key, Sampler(t), max_new_tokens=STEPS)  # noqa: E731  # fmt: skip
    keys = jax.random.split(jax.random.key(2), 9)
    temps = np.linspace(0.3, 1.2, 9).astype(np.float32)
    many = jax.jit(jax.vmap(sample))(keys, temps)
    for i in (0, 4, 8):
        one = jax.jit(sample)(keys[i], temps[i])
        assert np.asarray(one.tokens).tolist() == np.asarray(many.tokens[i]).tolist()
        assert np.asarray(one.logprobs).tobytes() == np.asarray(many.logprobs[i]).tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_batches_are_their_rows(dtype):
    """The issue's case (SmolLM2 in bfloat16: a row's tokens changed from step 3 in a batch of
    two), in both dtypes, in bfloat16 a batch of eight chat prompts, and in both a batch of 64
    (past `invariant.WIDE_ROWS`: the down projection in two tiles), three of its rows checked."""
    lm = cfjax.load("smollm2-135m-instruct", dtype=dtype)
    prompts = ["Name a fruit.", "Write one sentence about rain.", "What is two plus two?",
               "Say hello.", "Describe a cat.", "Tell me a joke.", "Why is the sky blue?",
               "Count to five."]  # fmt: skip
    run = lambda ps, key: cfjax.generate(lm, ps, key=key, sampler=Sampler(0.8), max_new_tokens=24)  # noqa: E731  # fmt: skip
    for ps in (prompts[:2], prompts) if dtype == "bfloat16" else (prompts[:2],):
        batch = run(ps, jax.random.key(9))
        for i, row in enumerate(batch):
            _same(row, run([ps[i]], row.key[None])[0], f"{ps[i]!r} at {i} of {len(ps)}")
    wide = run(prompts * 8, jax.random.key(10))
    for i in (0, 37, 63):
        _same(wide[i], run([prompts[i % 8]], wide[i].key[None])[0], f"row {i} of 64")


# --- batch_invariant=False: XLA's own ops, for speed --------------------------------------------


def _lowered_step(lm: cfjax.LM, batch: int) -> str:
    """The decode step's program (one token per row of `batch`, a 64-slot cache), as text."""
    from cfjax.core.cache import init_cache

    cache = init_cache(lm.config, batch, 64, model.compute_dtype(lm.params))
    args = (lm.params, np.zeros((batch, 1), np.int32), np.zeros(batch, np.int32), cache, 32)
    return jax.jit(model.apply, static_argnums=0).lower(lm.config, *args).as_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_batch_variant_mode_keeps_the_causal_guarantees(dtype):
    """`lm.replace(batch_invariant=False)`: XLA's own sums and one dot per weight (no tiles, no
    rounding barriers), results within rounding of the invariant mode, and a null edit still
    reproduces its factual run exactly when both run alone (in a batch a row may round
    otherwise: what this mode gives up)."""
    lm = _tiny(dtype)
    fast = lm.replace(batch_invariant=False)
    assert fast.config.batch_invariant is False and fast.caches is not lm.caches
    invariant_step, plain_step = _lowered_step(lm, 64), _lowered_step(fast, 64)
    dots = lambda text: inlined_count(text, "stablehlo.dot_general")  # noqa: E731
    # 64 rows: two tiles of 32 per weight matmul, and the invariant scores are one dot a layer
    assert dots(invariant_step) == 2 * dots(plain_step) + lm.config.n_layers
    assert inlined_count(plain_step, "stablehlo.select") < inlined_count(invariant_step, "stablehlo.select")  # fmt: skip
    prompts, samplers = _rows(8, seed=2)
    run = lambda m: cfjax.generate(m, prompts, key=4, chat=False, sampler=samplers, max_new_tokens=STEPS)  # noqa: E731  # fmt: skip
    exact, quick = run(lm), run(fast)
    if dtype == "float32":
        agree = [(a, b) for a, b in zip(exact, quick, strict=True) if a.tokens == b.tokens]
        assert len(agree) >= 6
        for a, b in agree:
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    fact = cfjax.generate(fast, prompts[1], key=4, chat=False, sampler=samplers[1], max_new_tokens=STEPS)  # fmt: skip
    null = cfjax.counterfactual(fast, fact, cfjax.ReplaceTokens(4, [fact.tokens[4]]), reuse_cache=False)  # fmt: skip
    _same(null, fact, "null edit, batch-variant mode")


def test_batch_invariance_is_an_execution_choice_not_a_model_property():
    c = cfjax.preset("tiny").replace(batch_invariant=False)
    assert "batch_invariant" not in c.to_dict()  # never written to a checkpoint
    assert cfjax.LlamaConfig.from_dict(c.to_dict()).batch_invariant is True
    with pytest.raises(ValueError, match="batch_invariant must be true or false"):
        cfjax.preset("tiny").replace(batch_invariant="no")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_prefill_window_changes_no_bit(dtype):
    """The host's prefill computes only the first whole blocks that hold the prompts
    (`kernel.prefill_window`: 96 of a buffer of 128 slots here); every real slot's keys and
    values, in every layer, are those of a prefill of the whole buffer, bit for bit."""
    from cfjax.runtime import driver
    from cfjax.runtime.request import padded

    lm = _tiny(dtype)
    prompts = [list(range(1, 71)), list(range(3, 40)), [5, 6], list(range(2, 90))]
    prompt, lengths = padded(prompts, 128)  # wider than the 96 slots of their bucket
    bucket = prompt.shape[1]
    window = kernel.prefill_window(int(lengths.max()), bucket)
    assert (bucket, window) == (128, 96)
    whole, start = driver.prefill(lm.config, lm.params, prompt, lengths, bucket + 64, None)
    part, start_w = driver.prefill(lm.config, lm.params, prompt, lengths, bucket + 64, window)
    assert np.array_equal(start, start_w) and np.array_equal(whole.last, part.last)
    for a, b in zip(whole.cache.k + whole.cache.v, part.cache.k + part.cache.v, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        slots = 3 if a.shape[3] == bucket + 64 else 2  # keys [B,KV,D,S], values [B,KV,S,D]
        for row, first in enumerate(np.asarray(start)):
            real = [slice(None)] * 3
            real[slots - 1] = slice(int(first), bucket)
            assert np.asarray(a[row][tuple(real)]).tobytes() == np.asarray(b[row][tuple(real)]).tobytes()  # fmt: skip


def test_buckets_and_prefill_windows():
    """A bucket: the first quarters (whole 32-slot blocks at least) of the power of two that
    hold the prompt, so two buckets per power of two; a prefill window: the first quarters that
    hold every `prompt[:-1]`, at most three programs per buffer."""
    assert [kernel.bucket_length(n) for n in (1, 32, 33, 64, 65, 96, 97, 129, 600, 1272)] == [
        32, 32, 64, 64, 96, 96, 128, 192, 768, 1536
    ]  # fmt: skip
    assert [kernel.prefill_window(n, 32) for n in (1, 2, 20, 32)] == [32] * 4
    assert [kernel.prefill_window(n, 64) for n in (33, 34, 64)] == [32, 64, 64]
    assert [kernel.prefill_window(n, 128) for n in (65, 66, 97, 98, 128)] == [64, 96, 96, 128, 128]
    for size in (256, 1024, 4096):
        lengths = range(size // 2 + 1, size + 1)
        assert {kernel.bucket_length(n) for n in lengths} == {3 * size // 4, size}
        for n in lengths:
            bucket = kernel.bucket_length(n)
            window = kernel.prefill_window(n, bucket)
            assert n <= bucket and n - 1 <= window <= bucket and window % 32 == bucket % 32 == 0
        windows = {kernel.prefill_window(n, size) for n in lengths}  # a buffer of the power of two
        assert windows == {size // 2, 3 * size // 4, size}, (size, windows)


_EXCESS_PRECISION_CHILD = """
import hashlib, jax, numpy as np, cfjax
from cfjax.core import model
c = cfjax.preset("tiny")
lm = cfjax.quantize(cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=3.0)), "bfloat16")
h = hashlib.sha256()
for m in (lm, cfjax.quantize(lm, "int8")):  # the int8 one dequantizes to bfloat16
    rows = cfjax.generate(m, [[1, 5, 17, 33], list(range(2, 60))], key=9, sampler=cfjax.Sampler(0.8), max_new_tokens=12, stop_tokens=())
    for t in rows + [cfjax.counterfactual(m, rows[0], cfjax.ReplaceTokens(2, [7]))]:
        h.update(np.asarray(t.tokens, np.int64).tobytes() + np.asarray(t.logprobs, np.float32).tobytes())
h.update(np.asarray(cfjax.forward(lm, [[1, 5, 17, 33, 64]])).tobytes())
print(h.hexdigest())
"""


@pytest.mark.slow  # 20-60 s: in `make test-slow`, which CI runs too
def test_bfloat16_bits_are_written_in_the_program_not_left_to_xla():
    """Every bfloat16 rounding of the network is explicit (`invariant.round_to`), so XLA's
    excess-precision rewrites (`--xla_allow_excess_precision`, on by default, applied where a
    program's fusions allow) change no bit: runs with the flag on and off are identical. Before,
    they were not, and which roundings XLA kept could differ from one program to another."""
    import os
    import subprocess
    import sys

    def run(xla_flags: str) -> str:
        env = {**os.environ, "XLA_FLAGS": xla_flags, "CFJAX_COMPILATION_CACHE": ""}
        out = subprocess.run([sys.executable, "-c", _EXCESS_PRECISION_CHILD], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    assert run("") == run("--xla_allow_excess_precision=false")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_rows_round_alike_in_every_tile(dtype):
    """`invariant.dense`, as the decode step (tiles of 2..32 rows, of up to 60 where the dot
    contracts 1,024 features or more, of up to 256 against a tied head's second axis) and as
    the prefill (tiles of 64 to `PREFILL_ROWS` rows) run it: a row's result is bit-identical
    whatever the rows beside it (1 to 300: one tile, several, a padded last one; in the prefill
    also one more than a tile holds) and within rounding of float64 numpy."""
    from cfjax.core import invariant

    rng = np.random.default_rng(0)
    # SmolLM2's: one tile per 32 rows; per 60 (`WIDE`: 61 rows is another kernel on a Zen 3);
    # a tied head `[V, D]`, per 256
    for features, contract in ((576, 0), (1536, 0), (576, 1)):
        x = rng.standard_normal((invariant.PREFILL_ROWS + 1, features)).astype(dtype)
        w = (rng.standard_normal((features, 320)) / 30).astype(dtype)
        expected = np.asarray(x, np.float64)[:1] @ np.asarray(w, np.float64)
        w = w if contract == 0 else np.ascontiguousarray(w.T)  # stored as `[V, D]`
        for prefill in (False, True):

            def run(x, w, prefill=prefill, contract=contract):  # traced in its own mode
                with invariant.batch_invariance(True, prefill=prefill):
                    return invariant.dense(x, w, contract)

            counts = (1, 2, 3, 32, 33, 61, 64, 100, 300) + ((len(x),) if prefill else ())
            first = {m: np.asarray(jax.jit(run)(x[:m], w), np.float32)[0] for m in counts}
            assert all(v.tobytes() == first[1].tobytes() for v in first.values()), (features, contract, prefill)  # fmt: skip
            np.testing.assert_allclose(first[1], expected[0], rtol=2e-2 if dtype == "bfloat16" else 1e-4, atol=2e-2 if dtype == "bfloat16" else 1e-4)  # fmt: skip


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_attention_rows_ignore_batch_positions_and_cache_length(dtype, prefill):
    """`attention.attention_tiles` (the CPU's form), as the decode step and as the prefill
    (fixed tiles, score dots of one shape, weighted values by slot-block dots) run it: a query
    row's attention is bit-identical whatever the batch beside it, the number of positions
    scored with it (1 query row, 5 as in a speculative pass, 70 as in a prefill: one tile,
    several unrolled, a loop of tiles) and the cache's length (96 or 112 slots as a prefill
    and its segments see, masked slots past `SCORE_SLOTS`, which score in a second chunk), and
    within rounding of a float64 numpy attention."""
    from cfjax.core import attention, invariant

    def attend(*args):  # a fresh function: traced in its own mode
        with invariant.batch_invariance(True, prefill=prefill):
            return attention.attention_tiles(*args)

    rng = np.random.default_rng(0)
    b, kv, g, d, visible = 3, 2, 3, 64, 90  # SmolLM2's head shapes
    big = attention.SCORE_SLOTS + 128
    q = rng.standard_normal((b, kv, g, 70, d)).astype(np.float32)
    keys = rng.standard_normal((b, kv, d, big)).astype(dtype)
    values = rng.standard_normal((b, kv, big, d)).astype(dtype)
    allowed = (rng.random((b, 1, 1, 70, big)) < 0.8) & (np.arange(big) < visible)
    run = jax.jit(attend)
    outputs = {}
    for rows in (1, 3):
        for t in (1, 5, 70):
            for slots in (96, 112, big):
                got = run(q[:rows, :, :, :t], keys[:rows, ..., :slots], values[:rows, :, :slots],
                          allowed[:rows, ..., :t, :slots], np.float32(d**-0.5))  # fmt: skip
                outputs[rows, t, slots] = np.asarray(got)[0, :, :, 0]
    first = outputs[1, 1, 96]
    assert all(out.tobytes() == first.tobytes() for out in outputs.values())
    k64, v64 = np.asarray(keys, np.float64), np.asarray(values, np.float64)
    scores = np.einsum("kgd,kds->kgs", q[0, :, :, 0], k64[0]) * d**-0.5
    scores = np.where(allowed[0, :, :, 0], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("kgs,ksd->kgd", weights / weights.sum(-1, keepdims=True), v64[0])
    np.testing.assert_allclose(first, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_long_prefill_attends_in_causal_blocks_bit_for_bit(dtype):
    """`attention.causal_attention` (a long prefill's queries in blocks, each over the slots up
    to its last query: two blocks at 1,100 queries, three at 1,600) gives every bit of
    `cached_attention` over all the slots, from slot 0 and from a later static slot, in the
    prefill's form (its queries are anchored at slot 0: each sees slot 0 on); and within
    rounding of numpy."""
    from cfjax.core import attention, invariant

    def run(blocked: bool, first: int, *args):
        with invariant.batch_invariance(True, prefill=True):
            if blocked:
                return attention.causal_attention(*args, first)
            return attention.cached_attention(*args)

    rng = np.random.default_rng(0)
    b, kv, g, d = 2, 2, 2, 8
    for t, first in ((1100, 0), (1600, 37)):
        s = first + t
        q = rng.standard_normal((b, kv, g, t, d)).astype(np.float32)
        keys = rng.standard_normal((b, kv, d, s)).astype(dtype)
        values = rng.standard_normal((b, kv, s, d)).astype(dtype)
        slot, query = np.arange(s)[None, None, :], first + np.arange(t)[None, :, None]
        mask = np.broadcast_to(slot <= query, (b, t, s))[:, None, None]  # [B, 1, 1, T, S]
        args = (q, keys, values, mask, np.float32(d**-0.5))
        blocked = jax.jit(run, static_argnums=(0, 1))(True, first, *args)
        whole = jax.jit(run, static_argnums=(0, 1))(False, first, *args)
        assert np.asarray(blocked).tobytes() == np.asarray(whole).tobytes(), t
        scores = np.einsum("bkgtd,bkds->bkgts", q, np.asarray(keys, np.float64)) * d**-0.5
        weights = np.exp(np.where(mask, scores, -np.inf) - scores.max(-1, keepdims=True))
        expected = np.einsum("bkgts,bksd->bkgtd", weights / weights.sum(-1, keepdims=True), np.asarray(values, np.float64))  # fmt: skip
        np.testing.assert_allclose(np.asarray(blocked), expected, rtol=2e-5, atol=2e-5)


# --- padded batches: few programs for many batch sizes --------------------------------------------


def test_batch_sizes_run_padded_to_few_programs():
    """Batches above 16 rows run padded to 8 sizes per power of two (32 programs for 1..64 rows,
    at most an eighth more rows), and a padded run is the unpadded one bit for bit."""
    from cfjax.runtime import driver

    sizes = [driver.padded_rows(n) for n in range(1, 129)]
    assert sizes[:16] == list(range(1, 17)) and sizes[16:24] == [18, 18, 20, 20, 22, 22, 24, 24]
    assert sizes[32:40] == [36] * 4 + [40] * 4 and sizes[64:72] == [72] * 8
    assert all(n <= p <= 1.125 * n for n, p in enumerate(sizes, 1)) and sizes == sorted(sizes)
    assert len(set(sizes[:64])) == 32 and len(set(sizes)) == 40


@pytest.mark.slow  # ~25 s a dtype: 17- and 18-row programs of their own
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_padded_batch_is_the_unpadded_one_and_compiles_once(dtype):
    """17 rows run as 18 (the stored cache has 18 rows, the results 17): the same bits as 17
    unpadded rows, for factual rows, counterfactuals resumed from the stored cache (rows
    forced among free ones) and a speculative draft; 18 rows then compile nothing."""
    from cfjax.runtime import driver

    lm = _tiny(dtype)
    exact = lm.replace(pad_batch=False, caches=type(lm.caches)())
    prompts, samplers = _rows(18, seed=6)
    keys = {n: jax.random.split(jax.random.key(8), 18)[:n] for n in (17, 18)}
    run = lambda m, n, **kw: cfjax.generate(m, prompts[:n], key=keys[n], chat=False, sampler=samplers[:n], max_new_tokens=STEPS, **kw)  # noqa: E731  # fmt: skip
    padded, unpadded = run(lm, 17), run(exact, 17)
    for a, b in zip(padded, unpadded, strict=True):
        _same(a, b, "padded factual row")
    assert lm.caches.get(lm.params, padded[16].prompt_tokens, padded[16].tokens).stored.cache.k[0].shape[0] == 18  # fmt: skip
    assert exact.caches.get(exact.params, unpadded[16].prompt_tokens, unpadded[16].tokens).stored.cache.k[0].shape[0] == 17  # fmt: skip
    edits = [cfjax.ReplaceTokens(b % 4, [(b * 37) % 256]) if b % 3 else cfjax.ChangeSampler(temperature=0.5) for b in range(17)]  # fmt: skip
    stored = jax.tree.leaves(lm.caches.get(lm.params, padded[0].prompt_tokens, padded[0].tokens).stored.cache)  # fmt: skip
    kept = [jnp.copy(x) for x in stored]  # (on the device: a host view would pin the buffers)
    for a, b in zip(cfjax.counterfactuals(lm, padded, edits), cfjax.counterfactuals(exact, unpadded, edits), strict=True):  # fmt: skip
        _same(a, b, "padded counterfactual row")
        assert a.alignment == b.alignment
    # The resumed run took its (padded) rows of the stored cache as its own copy, which the
    # decode donates: the stored cache is still there, bit for bit.
    assert not any(x.is_deleted() for x in stored)
    assert all(bool(jnp.array_equal(k, x)) for k, x in zip(kept, stored, strict=True))
    for a, b in zip(run(lm, 17, draft=cfjax.quantize(lm, "int8")), unpadded, strict=True):
        _same(a, b, "padded speculative row")
    # The engine's programs for 18 rows are the padded 17's: an 18-row run compiles nothing.
    request = driver.Request(prompts, keys[18], samplers, STEPS)
    compiles = []
    listen = lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None  # noqa: E731  # fmt: skip
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        whole = driver.run(lm.config, lm.params, request, stop_tokens=())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert (
        compiles == []
        and len(whole.tokens) == 18
        and whole.tokens[:17] == [t.tokens for t in padded]
    )


@pytest.mark.slow  # 17- and 18-row programs of their own: ~23 s (CI runs it)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_coupled_prompts_run_padded_and_compile_once(dtype, caplog):
    """Models of one signature answer 17 prompts in one program of 18 rows: each model's rows
    bit-identical to the unpadded program's; 18 prompts then compile no program of the models."""
    lm = _tiny(dtype)
    twin = lm.replace(params=jax.tree_util.tree_map(lambda x: (x * 1.1).astype(x.dtype), lm.params))
    prompts = [p[:30] for p in _rows(18, seed=9)[0]]  # one prompt bucket
    run = lambda models, n: cfjax.coupled(models, prompts[:n], key=4, sampler=Sampler(0.9), chat=False, max_new_tokens=STEPS)  # noqa: E731  # fmt: skip
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        padded = run([lm, twin], 17)
        first = _compiled(caplog)
        caplog.clear()
        whole = run([lm, twin], 18)  # (its keys are split and indexed by small programs)
        again = _compiled(caplog)
    assert [m for m in first if "_stacked_sample" in m] and not [m for m in again if "_stacked_sample" in m], again  # fmt: skip
    unpadded = run([m.replace(pad_batch=False) for m in (lm, twin)], 17)
    for rows, exact in zip(padded, unpadded, strict=True):
        assert len(rows) == 17
        for a, b in zip(rows, exact, strict=True):
            _same(a, b, "padded coupled row")
    assert [t.tokens for t in padded[0]] != [t.tokens for t in padded[1]]
    assert [t.tokens for t in whole[1][:17]] == [t.tokens for t in padded[1]]


def _compiled(caplog) -> list[str]:
    """The programs `jax.log_compiles` reported compiling."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
