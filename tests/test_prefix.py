"""Prefix reuse (issue 34): a batch of edited prompts fills only the slots after the prefix each
shares with a reference prompt, and gets the plain prefill's cache bit for bit.

References: the plain prefill (`driver.prefill`) of the same batch and of each row alone, one-by-
one `counterfactual` calls, and a numpy account of which slots each row must fill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cfjax
from cfjax import EditPrompt, Sampler
from cfjax.core import attention, invariant, kernel, model
from cfjax.core.cache import KVCache
from cfjax.core.model import init_params
from cfjax.runtime import driver, prefix
from cfjax.runtime.request import padded


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def tiny(request):
    config = cfjax.preset("tiny")
    params = init_params(config, jax.random.key(0), jnp.dtype(request.param), scale=4.0)
    return cfjax.LM(config, params, model_id="tiny")


def edited(reference: list[int], vocab: int, rows: int, seed: int = 0) -> list[list[int]]:
    """Prompts that replace one token of `reference` by 0 to 3 others (removal, substitution,
    insertion), at every depth; plus the reference itself and a prompt sharing nothing."""
    rng = np.random.default_rng(seed)
    out = [list(reference), [int(t) + 1 for t in reference[:40]]]
    for cut in np.linspace(0, len(reference) - 2, rows - 2).astype(int):
        new = [int(t) for t in rng.integers(1, vocab, int(rng.integers(0, 4)))]
        out.append(reference[:cut] + new + reference[cut + 1 :])
    return out


def leaves_equal(a, b) -> bool:
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))  # fmt: skip


def test_reused_prefixes_give_the_plain_prefills_cache_bit_for_bit(tiny):
    c, params = tiny.config, tiny.params
    reference = [int(t) for t in np.random.default_rng(1).integers(1, c.vocab_size, 75)]
    prompts = edited(reference, c.vocab_size, 20)
    bucket = kernel.bucket_length(max(map(len, prompts)))
    prompt, lengths = padded(prompts, bucket)
    window = kernel.prefill_window(int(lengths.max()), bucket)
    length = kernel.cache_length(bucket, 16)
    reused = prefix.prefill(c, params, prompts, prompt, lengths, prefix.Reference(reference), length, window)  # fmt: skip
    assert reused is not None  # about half the plain prefill's slots: worth it
    plain = driver.prefill(c, params, prompt, lengths, length, window)
    assert leaves_equal(reused, plain)
    # The reference taken from a cache that holds it (a factual run's: decode layout) instead.
    ref_prompt, ref_length = padded([reference], 128)
    kept, kept_start = driver.prefill(c, params, ref_prompt, ref_length, 192, None)
    stored = prefix.Reference(reference, kept.cache, int(kept_start[0]))
    assert leaves_equal(prefix.prefill(c, params, prompts, prompt, lengths, stored, length, window), plain)  # fmt: skip
    state, _ = reused
    for b in (0, 1, 7, 19):  # the reference, a prompt sharing nothing, two edits: each alone
        one_prompt, one_length = padded([prompts[b]], bucket)
        alone, _ = driver.prefill(c, params, one_prompt, one_length, length, None)
        assert leaves_equal([x[0] for x in alone.cache.k + alone.cache.v], [x[b] for x in state.cache.k + state.cache.v])  # fmt: skip


def test_a_long_prompts_segments_are_its_causal_blocks_bit_for_bit(tiny):
    """A 1,100-token prompt: the plain prefill attends in causal blocks of queries
    (`attention.causal_attention`), the segments of the reuse each over every slot; the caches
    are one, bit for bit. (Weights of unit scale: attention spread wide enough that every
    slot a query sees moves its bits.)"""
    c = tiny.config.replace(max_seq_len=2048)
    params = init_params(c, jax.random.key(0), model.compute_dtype(tiny.params))
    reference = [int(t) for t in np.random.default_rng(2).integers(1, c.vocab_size, 1100)]
    prompts = [reference] + [reference[:cut] + [7] + reference[cut + 1 :] for cut in (700, 1000, 1090)]  # fmt: skip
    bucket = kernel.bucket_length(1100)
    prompt, lengths = padded(prompts, bucket)
    window = kernel.prefill_window(1100, bucket)
    assert window >= 2 * attention.CAUSAL_MIN  # two blocks of queries or more
    length = kernel.cache_length(bucket, 16)
    reused = prefix.prefill(c, params, prompts, prompt, lengths, prefix.Reference(reference), length, window)  # fmt: skip
    assert reused is not None
    assert leaves_equal(reused, driver.prefill(c, params, prompt, lengths, length, window))


def test_the_groups_fill_each_rows_own_slots():
    rng = np.random.default_rng(0)
    for _ in range(50):
        batch = int(rng.integers(1, 40))
        lengths = rng.integers(2, 120, batch).astype(np.int32)
        shared = np.minimum(rng.integers(0, 120, batch), lengths - 1).astype(np.int32)
        need = lengths - 1 - shared
        plan = prefix.groups(shared, lengths)
        placed = np.concatenate([rows for rows, _, _ in plan])
        assert sorted(set(placed.tolist())) == list(range(batch))  # every row, in one group
        assert len({(len(rows), segment) for rows, segment, _ in plan}) <= 2  # two programs
        assert (len(placed) - batch) * 2 < len(plan[-1][0])  # padding: under half the last group
        assert list(need[placed[:batch]]) == sorted(need, reverse=True)  # the longest first
        for rows, segment, calls in plan:
            assert len(rows) * segment >= invariant.FIXED_ROWS  # a whole matmul tile
            assert len(rows) <= prefix.ROWS and segment >= prefix.SEGMENT
            assert calls * segment >= need[rows].max() > (calls - 1) * segment


def test_shift_moves_each_rows_slots_as_a_numpy_transcription_does():
    """`kernel.shift` (how a prefilled or stored cache enters the decode's layout) against numpy:
    row b's `count` slots from `source` land from `to` on, cut at the end, zeros elsewhere."""
    config = cfjax.preset("tiny")
    rng = np.random.default_rng(1)
    batch, slots, length = 5, 24, 40
    cache = KVCache(
        [jnp.asarray(rng.standard_normal((batch, config.n_kv_heads, 3, slots)), jnp.bfloat16)],
        [jnp.asarray(rng.standard_normal((batch, config.n_kv_heads, slots, 3)), jnp.float32)],
    )
    source = np.asarray([0, 3, 0, 10, 23], np.int32)
    to = np.asarray([16, 0, 39, 5, 30], np.int32)
    count = np.asarray([24, 21, 5, 0, 1], np.int32)  # row 2 is cut at the end, row 3 moves none
    moved = jax.jit(kernel.shift, static_argnums=4)(cache, source, to, count, length)
    for got, x, axis in [(moved.k[0], cache.k[0], -1), (moved.v[0], cache.v[0], -2)]:
        x = np.moveaxis(np.asarray(x), axis, 1)
        want = np.zeros(x.shape[:1] + (length,) + x.shape[2:], x.dtype)
        for b in range(batch):
            n = min(count[b], length - to[b])
            want[b, to[b] : to[b] + n] = x[b, source[b] : source[b] + n]
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(np.moveaxis(np.asarray(got), axis, 1), want)


def test_prompts_that_share_little_take_the_plain_prefill(tiny):
    c = tiny.config
    reference = list(range(1, 70))
    prompts = [[t + 1 for t in reference], [5] * 60]  # nothing in common with the reference
    prompt, lengths = padded(prompts, 128)
    assert prefix.prefill(c, tiny.params, prompts, prompt, lengths, prefix.Reference(reference), 160, 96) is None  # fmt: skip


def test_edited_prompts_of_one_trace_are_their_plain_runs(tiny):
    """`counterfactuals` of `EditPrompt`s of one trace reuse its prompt's prefix (from the
    factual's stored cache, or filled again once the store is cleared) and equal one-by-one
    calls and `generate` of each edited prompt with the factual key (a plain prefill), tokens
    and log-probs."""
    lm = tiny
    prompt = [int(t) for t in np.random.default_rng(2).integers(1, lm.config.vocab_size, 70)]
    sampler = Sampler(1.0)
    fact = cfjax.generate(lm, [prompt], key=5, sampler=sampler, max_new_tokens=12, stop_tokens=())[0]  # fmt: skip
    prompts = edited(prompt, lm.config.vocab_size, 22, seed=3)[2:]
    edits = [EditPrompt(tokens=tuple(p)) for p in prompts]
    padded_prompts, lengths = padded(prompts, kernel.bucket_length(max(map(len, prompts))))
    window = kernel.prefill_window(int(lengths.max()), padded_prompts.shape[1])
    worth = prefix.prefill(lm.config, lm.params, prompts, padded_prompts, lengths, prefix.Reference(prompt), padded_prompts.shape[1] + 64, window)  # fmt: skip
    assert worth is not None  # the same decision the batch makes on these prompts
    batch = cfjax.counterfactuals(lm, fact, edits)
    lm.caches.clear()
    refilled = cfjax.counterfactuals(lm, fact, edits)
    plain = cfjax.generate(lm, prompts, key=[fact.key] * len(prompts), sampler=sampler, max_new_tokens=12, stop_tokens=())  # fmt: skip
    for e, got, again, want in zip(edits, batch, refilled, plain, strict=True):
        assert got.to_dict() == again.to_dict() == cfjax.counterfactual(lm, fact, e).to_dict()
        assert (got.tokens, got.logprobs) == (want.tokens, want.logprobs)
