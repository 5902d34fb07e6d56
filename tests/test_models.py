"""Interventions on the model (issue 17): steering against transformers with a forward hook,
LoRA fine-tunes against numpy, int8 variants against their dequantized weights, and coupled
generation against per-model `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_llama

import cfjax
from cfjax.causal import ChangeModel, Steer, counterfactual, coupled, generate
from cfjax.core import decode, fusion, model, quant, scm, steering
from cfjax.models import lora as ft

LAYER = 0
PROMPT = [1, 17, 33, 5, 99, 64, 23, 8]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    ref = hf_llama(folder, num_key_value_heads=2)
    return ref, cfjax.load(folder)


def _hooked(ref, vector, *, response_only_from: int | None = None):
    """The transformers model with `vector` added to block LAYER's output (by hand)."""
    import torch

    v = torch.as_tensor(np.asarray(vector, np.float32))

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        if response_only_from is None or hidden.shape[1] == 1:
            hidden += v
        else:  # the prompt's forward: only its last position is a response step
            hidden[:, response_only_from:] += v
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return ref.model.layers[LAYER].register_forward_hook(hook)


def test_steering_matches_a_hooked_transformers_forward(hf):
    import torch

    ref, lm = hf
    vector = np.random.default_rng(0).normal(size=lm.config.dim).astype(np.float32)
    tokens = np.random.default_rng(1).integers(0, 128, size=(2, 24))
    ours = model.apply(lm.config, steering.steer(lm.params, LAYER, vector, 0.7, "all"), jnp.asarray(tokens))[0]  # fmt: skip
    handle = _hooked(ref, 0.7 * vector)
    try:
        with torch.no_grad():
            theirs = ref(torch.as_tensor(tokens)).logits.numpy()
    finally:
        handle.remove()
    plain = np.asarray(cfjax.forward(lm, tokens))
    assert np.abs(np.asarray(ours) - plain).max() > 0.1, "the steering changed nothing"
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("at", ["all", "response"])
def test_steered_greedy_decoding_matches_transformers(hf, at):
    import torch

    ref, lm = hf
    vector = 2.0 * np.random.default_rng(2).normal(size=lm.config.dim).astype(np.float32)
    fact = generate(lm, PROMPT, key=0, sampler=cfjax.Sampler(0.0), max_new_tokens=12, stop_tokens=())  # fmt: skip
    cf = counterfactual(lm, fact, Steer(LAYER, vector, at=at))
    handle = _hooked(ref, vector, response_only_from=None if at == "all" else len(PROMPT) - 1)
    try:
        with torch.no_grad():
            out = ref.generate(torch.as_tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                               min_new_tokens=12, pad_token_id=0)  # fmt: skip
    finally:
        handle.remove()
    assert cf.tokens == out[0, len(PROMPT) :].tolist()
    assert cf.tokens != fact.tokens and cf.model_id.endswith("+steer")
    assert cf.interventions[0]["type"] == "Steer" and cf.interventions[0]["at"] == at


def test_model_interventions_at_zero_strength_are_the_identity(hf):
    _, lm = hf
    fact = generate(lm, PROMPT, key=3, sampler=cfjax.Sampler(1.0), max_new_tokens=16, stop_tokens=())  # fmt: skip
    zero_b = ft.merge(lm.config, lm.params, ft.init_adapters(lm.config, lm.params, 4, ("q", "v", "down"), jax.random.key(0)), 2.0)  # fmt: skip
    for iv in (
        Steer(LAYER, np.ones(lm.config.dim), scale=0.0),
        Steer(LAYER, np.ones(lm.config.dim), scale=0.0, at="all"),
        ChangeModel(zero_b),
        ChangeModel(jax.tree_util.tree_map(jnp.copy, lm.params)),
    ):
        cf = counterfactual(lm, fact, iv)
        assert cf.tokens == fact.tokens, iv
        np.testing.assert_allclose(cf.logprobs, fact.logprobs, rtol=0, atol=0)


def test_steering_vmaps_over_its_scale(hf):
    _, lm = hf
    vector = np.random.default_rng(4).normal(size=lm.config.dim).astype(np.float32)
    scales = jnp.asarray([0.0, 0.5, 1.0, 3.0])
    prompt = jnp.zeros(16, jnp.int32).at[: len(PROMPT)].set(jnp.asarray(PROMPT))

    def run(scale):
        params = steering.steer(lm.params, LAYER, vector, scale)
        return decode.sample(lm.config, params, prompt, len(PROMPT), jax.random.key(5),
                             cfjax.Sampler(0.8), max_new_tokens=10).tokens  # fmt: skip

    batched = np.asarray(jax.vmap(run)(scales))
    for s, row in zip(scales, batched, strict=True):
        assert row.tolist() == np.asarray(run(s)).tolist()
    plain = generate(lm, PROMPT, key=jax.random.key(5), sampler=cfjax.Sampler(0.8), max_new_tokens=10, stop_tokens=())  # fmt: skip
    assert batched[0].tolist() == plain.tokens
    assert len({tuple(r) for r in batched.tolist()}) > 1


def test_steering_vector_is_the_mean_difference_of_transformers_activations(hf):
    import torch

    ref, lm = hf
    rng = np.random.default_rng(6)
    positive = [rng.integers(3, 128, size=n).tolist() for n in (5, 9, 12)]
    negative = [rng.integers(3, 128, size=n).tolist() for n in (7, 4)]
    ours = cfjax.steering_vector(lm, positive, negative, LAYER)

    def mean(texts):
        with torch.no_grad():
            acts = [ref(torch.as_tensor([t]), output_hidden_states=True).hidden_states[LAYER + 1][0].numpy().mean(0) for t in texts]  # fmt: skip
        return np.mean(acts, axis=0)

    np.testing.assert_allclose(ours, mean(positive) - mean(negative), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 2\\)"):
        cfjax.steering_vector(lm, positive, negative, 2)
    with pytest.raises(ValueError, match="vector must have shape \\(64,\\)"):
        counterfactual(lm, generate(lm, PROMPT, max_new_tokens=2), Steer(0, np.ones(3)))


def test_finetune_learns_and_merges_as_lora(hf):
    _, lm = hf
    rng = np.random.default_rng(7)
    texts = [[1, *rng.integers(3, 128, size=12).tolist()] for _ in range(4)]
    tune = cfjax.finetune(lm, texts, rank=4, targets=("q", "v", "down"), steps=40,
                          learning_rate=1e-2, batch_size=4, alpha=8.0, key=1, progress=False)  # fmt: skip
    assert tune.losses[-1] < 0.7 * tune.losses[0], tune.losses[::10]
    base = fusion.split_params(lm.config, lm.params)
    merged = fusion.split_params(lm.config, tune.params)
    for i in base["layers"]:
        for mod, name in (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"),
                          ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")):  # fmt: skip
            w = np.asarray(base["layers"][i][mod][name]["kernel"], np.float64)
            got = np.asarray(merged["layers"][i][mod][name]["kernel"], np.float64)
            if name in tune.targets:
                ab = tune.adapters[i][name]
                want = w + 2.0 * np.asarray(ab["a"], np.float64) @ np.asarray(ab["b"], np.float64)
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
                assert np.abs(got - w).max() > 1e-3
            else:
                np.testing.assert_array_equal(got, w)
    assert jax.tree_util.tree_structure(tune.params) == jax.tree_util.tree_structure(lm.params)


def test_a_finetune_counterfactual_keeps_the_tokens_before_its_first_change(hf):
    _, lm = hf
    rng = np.random.default_rng(8)
    texts = [[1, *rng.integers(3, 128, size=10).tolist()] for _ in range(3)]
    tune = cfjax.finetune(lm, texts, steps=15, learning_rate=3e-3, batch_size=2, key=2, progress=False)  # fmt: skip
    sampler = cfjax.Sampler(1.0)
    fact = generate(lm, PROMPT, key=9, sampler=sampler, max_new_tokens=24, stop_tokens=())
    cf = counterfactual(lm, fact, ChangeModel(tune.params, name="lora"))
    # By hand: the fine-tuned model's Gumbel-max choice on the factual prefix, step by step.
    seq = jnp.asarray([PROMPT + fact.tokens], jnp.int32)
    logits = model.apply(lm.config, tune.params, seq)[0][0, len(PROMPT) - 1 :]
    first = None
    for t in range(len(fact.tokens)):
        z = scm.sampler_logits(logits[t], sampler)
        choice = int(jnp.argmax(z + scm.noise(fact.key, t, lm.config.vocab_size)))
        if choice != fact.tokens[t]:
            first = t
            break
    assert first is not None, "the fine-tune changed no token: strengthen it"
    assert cf.tokens[:first] == fact.tokens[:first] and cf.tokens[first] == choice
    assert cf.model_id.endswith("+lora")


def test_int8_is_its_dequantized_weights(hf, tmp_path):
    _, lm = hf
    q = cfjax.quantize(lm, "int8")
    assert q.model_id == f"{lm.model_id}@int8" and q.dtype == jnp.float32
    leaves = jax.tree_util.tree_leaves(q.params)
    # qkv, o, gate_up, down per layer, the embedding and the LM head
    assert sum(x.dtype == jnp.int8 for x in leaves) == 4 * lm.config.n_layers + 2
    assert quant.param_bytes(q.params) < 0.3 * quant.param_bytes(lm.params)
    # Round to nearest with a per-channel scale: every weight within half a step.
    deq = quant.dequantize(q.params)
    for (path, w), d in zip(jax.tree_util.tree_flatten_with_path(lm.params)[0], jax.tree_util.tree_leaves(deq), strict=True):  # fmt: skip
        w, d = np.asarray(w), np.asarray(d)
        if w.ndim == 2:
            axis = 1 if "embedding" in jax.tree_util.keystr(path) else 0
            step = np.abs(w).max(axis=axis, keepdims=True) / 127
            assert np.all(np.abs(w - d) <= step / 2 + 1e-7)
        else:
            np.testing.assert_array_equal(w, d)
    # The int8 model decodes exactly as the float model of its dequantized weights.
    a = generate(q, PROMPT, key=4, max_new_tokens=16, stop_tokens=())
    b = generate(lm.replace(params=deq), PROMPT, key=4, max_new_tokens=16, stop_tokens=())
    assert a.tokens == b.tokens
    # ... also as a ChangeModel of the float model, which a bfloat16 variant is too.
    fact = generate(lm, PROMPT, key=4, max_new_tokens=16, stop_tokens=())
    assert counterfactual(lm, fact, ChangeModel(q.params, name="int8")).tokens == a.tokens
    bf = cfjax.quantize(lm, "bfloat16")
    assert bf.dtype == jnp.bfloat16 and counterfactual(lm, fact, ChangeModel(bf.params)).tokens
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        cfjax.quantize(lm, "int4")


def test_load_names_an_int8_variant(tmp_path):
    hf_llama(tmp_path / "m")
    q = cfjax.load(f"{tmp_path / 'm'}@int8")
    assert q.model_id.endswith("@int8") and quant.is_quantized(q.params)


def test_coupled_equals_generate_per_model(hf):
    _, lm = hf
    other = lm.replace(params=model.init_params(lm.config, jax.random.key(11), scale=4.0), model_id="other")  # fmt: skip
    twin = lm.replace(model_id="twin")  # the same params: must agree on every token
    bf = cfjax.quantize(lm, "bfloat16")  # another dtype: runs on its own
    prompts = [PROMPT, PROMPT[:5], [1, 9, 9, 9]]
    sampler = cfjax.Sampler(0.9, top_k=40)
    out = coupled([lm, other, twin, bf], prompts, key=21, sampler=sampler, max_new_tokens=12, stop_tokens=(2,))  # fmt: skip
    assert [len(r) for r in out] == [4 - 1] * 4
    for m, rows in zip([lm, other, twin, bf], out, strict=True):
        alone = generate(m, prompts, key=21, sampler=sampler, max_new_tokens=12, stop_tokens=(2,))
        for a, b in zip(rows, alone, strict=True):
            assert a.tokens == b.tokens and a.model_id == m.model_id
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    assert [t.tokens for t in out[0]] == [t.tokens for t in out[2]]
    assert [t.tokens for t in out[0]] != [t.tokens for t in out[1]]
    small = cfjax.LM(cfjax.preset("tiny"), model.init_params(cfjax.preset("tiny"), jax.random.key(0)))  # fmt: skip
    with pytest.raises(ValueError, match="coupled models must share the vocabulary"):
        coupled([lm, small], prompts, key=0)


def test_a_saved_finetune_loads_as_a_model(hf, tmp_path):
    _, lm = hf
    tune = cfjax.finetune(lm, [PROMPT * 2], steps=3, batch_size=1, progress=False)
    path = cfjax.save(lm.replace(params=tune.params, model_id="tiny-lora"), tmp_path / "ft")
    back = cfjax.load(path)
    assert back.model_id == "tiny-lora"
    for a, b in zip(jax.tree_util.tree_leaves(tune.params), jax.tree_util.tree_leaves(back.params), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="already exists"):
        cfjax.save(back, path)
    with pytest.raises(ValueError, match="a steered model"):
        cfjax.save(back.replace(params=steering.steer(back.params, 0, np.ones(64))), tmp_path / "s")  # fmt: skip
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_int8_smollm2_is_close_to_float32():
    """The stated bound (README): on SmolLM2, int8 logits within 3.5 of float32 (logits span
    ±32), mean KL below 0.02 nats, the same argmax at 85% of the positions or more."""
    lm = cfjax.load("smollm2-135m-instruct")
    q = cfjax.load("smollm2-135m-instruct@int8")
    text = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published "
            "four papers that changed physics, among them special relativity.")  # fmt: skip
    tokens = np.asarray([[lm.tokenizer.bos_id, *lm.tokenizer.encode(text)]])
    a, b = np.asarray(cfjax.forward(lm, tokens)), np.asarray(cfjax.forward(q, tokens))
    la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    print(
        f"int8 vs float32: max |dlogit| {np.abs(a - b).max():.3f}, KL {kl:.4f}, argmax {agree:.3f}"
    )
    assert np.abs(a - b).max() < 3.5 and kl < 0.02 and agree >= 0.85
