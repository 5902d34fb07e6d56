"""`cache_layout`: a run's cache from stored ones, checked against numpy transcriptions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import cfjax
from cfjax.core.cache import KEY_SLOT_AXIS, VALUE_SLOT_AXIS, KVCache, init_cache
from cfjax.runtime import cache_layout


def _random_cache(config, batch: int, length: int, dtype, seed: int) -> KVCache:
    rng = np.random.default_rng(seed)
    zeros = init_cache(config, batch, length, dtype)
    fill = lambda x: jnp.asarray(rng.standard_normal(x.shape), dtype)  # noqa: E731
    return KVCache([fill(x) for x in zeros.k], [fill(x) for x in zeros.v])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("length", [40, 64, 96])  # cut, kept, zero-padded
def test_rows_of_several_stored_caches_are_one_copy_of_the_numpy_take(dtype, length):
    """Rows of two stored batches (repeats, out of order) as one cache of `length` slots: the
    numpy take of their concatenation, cut or zero-padded; the stored caches unchanged; and one
    fused copy, with no temporary array (the concatenation is never materialised)."""
    config = cfjax.preset("tiny")
    stored = _random_cache(config, 3, 64, dtype, 0), _random_cache(config, 5, 64, dtype, 1)
    before = [[np.asarray(x.astype(jnp.float32)) for x in c.k + c.v] for c in stored]
    rows = np.asarray([4, 0, 7, 4, 2, 0])  # rows of the concatenation (3 of the first batch)
    got = cache_layout.take_rows(config, stored, jnp.asarray(rows, jnp.int32), length)

    def want(leaves, axis):
        x = np.concatenate(leaves)[rows]
        if length <= x.shape[axis]:
            return np.take(x, np.arange(length), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return np.pad(x, pad)

    for layer in range(config.n_layers):
        for got_x, name, axis in ((got.k, "k", KEY_SLOT_AXIS), (got.v, "v", VALUE_SLOT_AXIS)):
            leaves = [np.asarray(getattr(c, name)[layer].astype(jnp.float32)) for c in stored]
            np.testing.assert_array_equal(np.asarray(got_x[layer].astype(jnp.float32)), want(leaves, axis))  # fmt: skip
    assert got.length == length and got.batch == len(rows)
    after = [[np.asarray(x.astype(jnp.float32)) for x in c.k + c.v] for c in stored]
    for b, a in zip(before, after, strict=True):
        for x, y in zip(b, a, strict=True):
            np.testing.assert_array_equal(x, y)
    compiled = cache_layout.take_rows.lower(config, stored, jnp.asarray(rows, jnp.int32), length).compile()  # fmt: skip
    assert compiled.memory_analysis().temp_size_in_bytes == 0
