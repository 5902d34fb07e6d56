"""The NNX Llama port against HF transformers, the cached path against the plain forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_llama, hf_logits
from flax import nnx

import cfjax
from cfjax.core import model
from cfjax.core.cache import init_cache
from cfjax.core.config import LlamaConfig

LLAMA31 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the scaling changes the frequencies seen by a 320-token prompt.
    "original_max_position_embeddings": 64,
}

CASES = {
    "mha-theta1e4-untied": dict(num_key_value_heads=4),
    "gqa-theta5e5-tied": dict(
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
    ),
    "mqa-llama31-scaling": dict(num_key_value_heads=1, rope_parameters=LLAMA31),
    "gqa-headdim-llama31-tied": dict(
        num_key_value_heads=2, head_dim=24, rope_parameters=LLAMA31, tie_word_embeddings=True
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(tmp_path, case):
    ref = hf_llama(tmp_path, **CASES[case])
    lm = cfjax.load(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 128, size=(2, 320))
    ours = np.asarray(cfjax.forward(lm, tokens))
    theirs = hf_logits(ref, tokens)
    assert ours.shape == theirs.shape == (2, 320, 128)
    assert np.abs(theirs).max() > 1.0, "logits too flat to test anything"
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_config_spellings_agree(tmp_path):
    """Real Llama 3.1 `rope_theta` + `rope_scaling` and transformers 5 `rope_parameters`."""
    base = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
    )
    scaling = {k: v for k, v in LLAMA31.items() if k != "rope_theta"}
    scaling["original_max_position_embeddings"] = 8192
    old = LlamaConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": scaling}, name="x")
    new = LlamaConfig.from_hf(
        {**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}}, name="x"
    )
    assert old == new == cfjax.preset("llama3.1-8b").replace(name="x")
    assert hash(old) == hash(new)


def test_meta_params_json():
    params = {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    c = LlamaConfig.from_meta(params, name="llama3.1-8b")
    assert c == cfjax.preset("llama3.1-8b")
    l2 = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05}
    assert LlamaConfig.from_meta({**l2, "vocab_size": -1}, vocab_size=32000, name="llama2-7b") == (
        cfjax.preset("llama2-7b")
    )


def test_bad_config_and_tokens():
    with pytest.raises(ValueError, match="n_heads 6 is not a multiple of n_kv_heads 4"):
        cfjax.preset("tiny").replace(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="not a Llama-architecture"):
        LlamaConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unknown preset"):
        cfjax.preset("llama9")
    c = cfjax.preset("tiny")
    lm = cfjax.LM(c, model.init_params(c, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"token id 256 at position \(0, 2\) is outside"):
        cfjax.forward(lm, [[1, 2, 256]])
    with pytest.raises(ValueError, match="longer than the model's max_seq_len 1024"):
        cfjax.forward(lm, np.zeros((1, 1025), np.int32))


@pytest.fixture(scope="module")
def tiny_lm():
    c = cfjax.preset("tiny")
    return cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=4.0))


def test_prefill_then_decode_matches_forward(tiny_lm):
    """Prefill a prompt into the cache, then decode token by token: same logits as `forward`."""
    c, p = tiny_lm.config, tiny_lm.params
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (2, 48)), jnp.int32)
    full = cfjax.forward(tiny_lm, tokens)
    step = jax.jit(model.apply, static_argnums=0)
    cache = init_cache(c, 2, 64)
    start = jnp.zeros((2,), jnp.int32)
    logits, cache = step(c, p, tokens[:, :32], start, cache, 0)
    # The cached path sums in `invariant`'s fixed orders, the whole-text forward in XLA's: up to
    # 1.3e-4 apart on these logits (weights x4, magnitude ~5).
    np.testing.assert_allclose(logits, full[:, :32], atol=3e-4, rtol=0)
    for t in range(32, 48):
        logits, cache = step(c, p, tokens[:, t : t + 1], start, cache, t)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=3e-4, rtol=0)


def test_static_index_attends_over_the_filled_slots_only(tiny_lm):
    """A static `index` (the prefill's) skips the slots past `index + T`: same logits, same cache
    (in the slots of real tokens) as a traced index, which attends over the whole cache."""
    c, p = tiny_lm.config, tiny_lm.params
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab_size, (2, 48)), jnp.int32)
    full = cfjax.forward(tiny_lm, tokens)
    start = jnp.asarray([5, 0], jnp.int32)
    static = jax.jit(model.apply, static_argnums=(0, 5))
    traced = jax.jit(model.apply, static_argnums=0)
    caches = {}
    for name, fn in {"static": static, "traced": traced}.items():
        cache = init_cache(c, 2, 64)
        for lo, hi in ((0, 32), (32, 48)):
            logits, cache = fn(c, p, tokens[:, lo:hi], start, cache, lo)
            np.testing.assert_allclose(logits[1], full[1, lo:hi], atol=1e-4, rtol=0)
        caches[name] = cache
    # Row 0's first 5 slots are padding (invisible, their content arbitrary); row 1 has none.
    for layer in range(c.n_layers):
        for kind, axis in (("k", 3), ("v", 2)):
            a, b = (np.asarray(getattr(caches[n], kind)[layer]) for n in ("static", "traced"))
            for row, lo in ((0, 5), (1, 0)):
                real = np.arange(lo, 48)
                np.testing.assert_allclose(
                    np.take(a[row], real, axis - 1), np.take(b[row], real, axis - 1), atol=1e-5
                )


def test_left_padding_does_not_change_real_logits(tiny_lm):
    """A row left-padded to the batch's length yields the logits it has alone."""
    c, p = tiny_lm.config, tiny_lm.params
    rng = np.random.default_rng(2)
    short = rng.integers(0, c.vocab_size, 20)
    long = rng.integers(0, c.vocab_size, 32)
    alone = cfjax.forward(tiny_lm, short[None])[0]
    garbage = rng.integers(0, c.vocab_size, 12)  # padding content must not matter
    batch = jnp.asarray(np.stack([np.concatenate([garbage, short]), long]), jnp.int32)
    start = jnp.asarray([12, 0], jnp.int32)
    logits, _ = jax.jit(model.apply, static_argnums=0)(c, p, batch, start)
    np.testing.assert_allclose(logits[0, 12:], alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1], cfjax.forward(tiny_lm, long[None])[0], atol=1e-4, rtol=0)


@pytest.mark.slow  # ~15 s: a gradient program and central differences per checked weight
def test_grad_matches_finite_difference(tiny_lm):
    c = tiny_lm.config
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, c.vocab_size, (1, 16)), jnp.int32)

    def loss(params):
        logits = model.apply(c, params, tokens[:, :-1])[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    # The model computes norms, attention and logits in float32 by design, so the finite
    # difference uses a step large enough for float32 rounding to be negligible (~0.2%).
    params = tiny_lm.params
    g = jax.grad(loss)(params)["layers"][1]["mlp"]["down"]["kernel"][3, 5]
    eps = 1e-2

    def shifted(delta):
        new = jax.tree_util.tree_map(lambda x: x, params)
        leaf = new["layers"][1]["mlp"]["down"]["kernel"]
        new["layers"][1]["mlp"]["down"]["kernel"] = leaf.at[3, 5].add(delta)
        return loss(new)

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(float(g)) > 1e-6
    np.testing.assert_allclose(float(g), float(fd), rtol=2e-2)


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_the_graph_is_the_one_a_traced_model_has(name):
    """`graphdef` builds the network with shapes for matrices (no trace): the same graph as the
    network built under `nnx.eval_shape`, with every attribute and param of it."""
    config = cfjax.preset(name)
    traced = nnx.eval_shape(lambda: model.Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert model.graphdef(config, "bfloat16") == nnx.split(traced)[0]
