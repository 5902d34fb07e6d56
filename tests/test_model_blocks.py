"""`model_blocks` (issue 30): each weight matmul of the batch-invariant engine as fixed blocks
along the axis a model-parallel mesh splits, so that a mesh whose model axis divides the blocks
computes one device's bits. The meshes themselves are checked on 8 fake devices
(tests/sharded_checks.py, `test_sharded_runs_on_eight_devices`); here, on one device: the
blocked matmul against its definition, batch invariance with blocks, the rules and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import cfjax
from cfjax import sharding
from cfjax.core import invariant, model, spec

TINY = cfjax.preset("tiny")
BLOCKS = 8
DTYPES = [jnp.float32, jnp.bfloat16]


def _bits(a) -> bytes:
    return np.asarray(jnp.asarray(a).astype(jnp.float32)).tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_a_blocked_contraction_is_its_block_dots_added_in_block_order(dtype):
    """contract=0: block i of `x @ w` is a dot of x's features [8i, 8i+8) with those rows of
    `w`, in float32; the partials are added in block order (transcribed here in numpy) and
    rounded once to the dtype. This is what a device holding some of the blocks computes."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 64)), dtype)
    w = jnp.asarray(rng.standard_normal((64, 48)), dtype)
    got = jax.jit(lambda x, w: invariant.blocked_matmul(x, w, 0, False, BLOCKS))(x, w)
    n = 64 // BLOCKS
    block = jax.jit(lambda x, w: invariant.matmul(x, w, 0, wide=True))
    parts = [np.asarray(block(x[:, i * n : (i + 1) * n], w[i * n : (i + 1) * n])) for i in range(BLOCKS)]  # fmt: skip
    total = parts[0]
    for part in parts[1:]:
        total = total + part  # float32, in block order
    assert got.dtype == dtype
    assert _bits(got) == _bits(jnp.asarray(total).astype(dtype))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    tolerance = 1e-4 if dtype == jnp.float32 else 4e-2
    np.testing.assert_allclose(
        np.asarray(got, np.float64), exact, rtol=tolerance, atol=tolerance * 8
    )


def test_a_blocked_tied_head_gives_each_block_of_logits_by_its_own_dot():
    """contract=1 (a tied head `[V, D]`, split over the vocabulary): the logits of block i are
    the dot with rows [V/8 i, V/8 (i+1)) alone, bit for bit."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    got = np.asarray(jax.jit(lambda x, h: invariant.blocked_matmul(x, h, 1, True, BLOCKS))(x, head))  # fmt: skip
    one = jax.jit(lambda x, h: invariant.matmul(x, h, 1, wide=True))
    n = 256 // BLOCKS
    for i in range(BLOCKS):
        want = np.asarray(one(x, head[i * n : (i + 1) * n]))
        assert got[:, i * n : (i + 1) * n].tobytes() == want.tobytes(), i
    np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(head).T, rtol=1e-5, atol=1e-4)


def _lm(config, dtype):
    params = model.init_params(config, jax.random.key(0))
    return cfjax.LM(config, jax.tree_util.tree_map(lambda x: x.astype(dtype), params))


# Two buckets; the 170-token prompt prefills 5+ tiles of rows (the matmul's loop of tiles).
PROMPTS = [[1, 5, 17, 33], [1, 9, 3], list(range(2, 172)), [2, 4, 6, 8, 10, 12]]


@pytest.mark.slow  # ~25 s a dtype: blocked programs of four batch shapes of their own
@pytest.mark.parametrize(("dtype", "tied"), [(jnp.float32, False), (jnp.bfloat16, True)],
                         ids=["float32", "bfloat16-tied-head"])  # fmt: skip
def test_blocked_rows_are_their_one_row_runs_and_differ_only_by_rounding(dtype, tied):
    config = TINY.replace(tie_embeddings=tied)
    lm = _lm(config, dtype)
    blocked = lm.replace(model_blocks=BLOCKS)
    assert blocked.config.model_blocks == BLOCKS and blocked.caches is not lm.caches
    samplers = [cfjax.Sampler(0.9), cfjax.Sampler(0.7, top_k=20), cfjax.Sampler(0.0), cfjax.Sampler(1.0, top_p=0.9)]  # fmt: skip
    kw = dict(max_new_tokens=12, stop_tokens=())
    rows = cfjax.generate(blocked, PROMPTS, key=3, sampler=samplers, **kw)
    for i, row in enumerate(rows):
        alone = cfjax.generate(blocked, PROMPTS[i], key=row.key, sampler=samplers[i], **kw)
        assert alone.tokens == row.tokens, i
        assert _bits(alone.logprobs) == _bits(row.logprobs), i
    plain = cfjax.generate(lm, PROMPTS, key=3, sampler=samplers, **kw)
    if dtype == jnp.float32:  # blocks only reorder the float32 additions
        for a, b in zip(rows, plain, strict=True):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-4)


def test_model_blocks_is_checked_and_not_part_of_the_model():
    with pytest.raises(ValueError, match="model_blocks 3 does not divide the 64 dim"):
        TINY.replace(model_blocks=3)
    for bad in (0, True, 2.5, "8"):
        with pytest.raises(ValueError, match="model_blocks must be an integer >= 1"):
            TINY.replace(model_blocks=bad)
    tied = TINY.replace(tie_embeddings=True, vocab_size=260)
    with pytest.raises(ValueError, match="does not divide the 260 vocab_size"):
        tied.replace(model_blocks=8)
    with pytest.raises(ValueError, match="model_blocks must be an integer >= 1, got 0"):
        cfjax.load("no/such/model", model_blocks=0)  # refused before anything is read
    config = TINY.replace(model_blocks=BLOCKS)
    assert "model_blocks" not in config.to_dict()
    assert cfjax.LlamaConfig.from_dict(config.to_dict()) == TINY


def test_the_rules_split_the_column_kernels_by_whole_blocks():
    config = TINY.replace(model_blocks=BLOCKS)
    table = spec.param_spec(config)
    layer = table["layers"][0]
    for info in (layer["attn"]["qkv"]["kernel"], layer["mlp"]["gate_up"]["kernel"], table["lm_head"]["kernel"]):  # fmt: skip
        assert info.partition() == PartitionSpec("model", None)
    assert layer["attn"]["o"]["kernel"].partition() == PartitionSpec("model", None)
    assert spec.param_spec(TINY)["layers"][0]["attn"]["qkv"]["kernel"].partition() == PartitionSpec(None, "model")  # fmt: skip
    # A device holds whole blocks, or the mesh is refused.
    with pytest.raises(ValueError, match=r"model axis \(4\) does not divide model_blocks \(2\)"):
        spec.check_divisible(TINY.replace(model_blocks=2), 4)
    one = sharding.memory(TINY, batch=1, context=32, model=2)
    blocked = sharding.memory(config, batch=1, context=32, model=2)
    assert blocked["params_bytes"] == one["params_bytes"]  # the same share per device
