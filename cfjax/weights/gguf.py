"""GGUF files (llama.cpp, ollama): config from the `llama.*` metadata, tensors dequantised.

Quantised tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ... anything `gguf.quants` can dequantise) become
float32, BF16 stays bfloat16. llama.cpp's converter permuted the q/k rows from HF's rotate-half
order to interleaved pairs (`LlamaModel.permute`, K with the KV head count); we permute them back,
as transformers' GGUF loader does. Tensor bytes are read with `pread` at the offsets the header
gives, after checking them against the file size, so a truncated file is an error up front and
memory holds one tensor at a time rather than pages of a memory-mapped file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cfjax.core import model
from cfjax.core.config import LlamaConfig, RopeScaling
from cfjax.gguf_header import Header, TensorInfo, read_header, write_metadata_only
from cfjax.weights.stream import Source, Tensor, natural_dtype

_LAYER = {
    "attn_q.weight": ("attn", "q", "kernel"),
    "attn_k.weight": ("attn", "k", "kernel"),
    "attn_v.weight": ("attn", "v", "kernel"),
    "attn_output.weight": ("attn", "o", "kernel"),
    "ffn_gate.weight": ("mlp", "gate", "kernel"),
    "ffn_up.weight": ("mlp", "up", "kernel"),
    "ffn_down.weight": ("mlp", "down", "kernel"),
    "attn_norm.weight": ("attn_norm", "scale"),
    "ffn_norm.weight": ("mlp_norm", "scale"),
}
_TOP = {
    "token_embd.weight": ("embed", "embedding"),
    "output_norm.weight": ("final_norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 frequency factors; read into the config


def _map(name: str) -> tuple | None:
    if name in _TOP:
        return _TOP[name]
    if name == _ROPE_FREQS:
        return None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return ("layers", int(parts[1]), *_LAYER[parts[2]])
    raise ValueError(f"unexpected tensor {name!r}: not part of a llama GGUF")


def gguf_path_to_name(path: tuple) -> str:
    """llama.cpp's tensor name for a param path, for messages about missing tensors."""
    for name, p in _TOP.items():
        if p == path:
            return name
    rest = next(n for n, p in _LAYER.items() if p == path[2:])
    return f"blk.{path[1]}.{rest}"


_REQUIRED = object()


def _meta(header: Header, file: Path, key: str, default=_REQUIRED):
    if key not in header.metadata:
        if default is _REQUIRED:
            raise ValueError(f"{file}: GGUF metadata has no {key}")
        return default
    value = header.metadata[key]
    if isinstance(value, float):  # stored as float32: keep the short decimal (1e-05, not 9.99e-06)
        value = float(str(np.float32(value)))
    return value


def _read(fd: int, file: Path, info: TensorInfo) -> np.ndarray:
    import gguf

    raw = os.pread(fd, info.n_bytes, info.offset)
    if len(raw) != info.n_bytes:
        raise ValueError(f"{file}: truncated while reading tensor {info.name!r}")
    T = gguf.GGMLQuantizationType
    plain = {T.F32: np.float32, T.F16: np.float16, T.BF16: jnp.bfloat16}
    if info.qtype in plain:
        # frombuffer views the read-only bytes; assemble makes the owned copy
        return np.frombuffer(raw, plain[info.qtype]).reshape(info.shape)
    try:
        blocks = np.frombuffer(raw, np.uint8).reshape(*info.shape[:-1], -1)  # bytes per row
        array = gguf.quants.dequantize(blocks, info.qtype)
    except NotImplementedError:
        raise ValueError(
            f"{file}: tensor {info.name!r} has type {info.qtype.name}, which the gguf package "
            "cannot dequantise"
        ) from None
    return array.reshape(info.shape)


def _rope_scaling(file: Path, factors: np.ndarray, config: LlamaConfig) -> RopeScaling:
    # llama.cpp stores Llama 3.1's per-frequency divisors, not the parameters that made them; its
    # converter always uses low 1, high 4 and 8192 original positions, so only `factor` varies.
    scaling = RopeScaling(factor=float(str(np.float32(factors.max()))))
    plain = model.rope_frequencies(config)
    scaled = model.rope_frequencies(config.replace(rope_scaling=scaling))
    if factors.shape != plain.shape or not np.allclose(plain / scaled, factors, rtol=1e-4):
        raise ValueError(
            f"{file}: tensor {_ROPE_FREQS!r} (shape {factors.shape}) does not match Llama 3.1 rope "
            f"scaling with factor {scaling.factor} for head_dim {config.head_dim}"
        )
    return scaling


def open_gguf(file: str | Path) -> Source:
    """Open a GGUF file: parse metadata and tensor index, check sizes; read no weight yet."""
    import gguf

    file = Path(file)
    header = read_header(file)
    arch = _meta(header, file, "general.architecture", "")
    if arch != "llama":
        raise ValueError(
            f"{file}: general.architecture is {arch!r}; cfjax loads Llama-architecture GGUFs only"
        )
    size = file.stat().st_size
    infos = header.tensors
    for t in infos:
        if t.offset + t.n_bytes > size:
            raise ValueError(
                f"{file}: truncated GGUF file: tensor {t.name!r} ends at byte "
                f"{t.offset + t.n_bytes}, the file has {size}"
            )
        try:
            _map(t.name)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
    by_name = {i.name: i for i in infos}
    n_heads = _meta(header, file, "llama.attention.head_count")
    dim = _meta(header, file, "llama.embedding_length")
    embd = by_name.get("token_embd.weight")
    vocab = _meta(header, file, "llama.vocab_size", None) or (embd.shape[0] if embd else 0)
    head_dim = _meta(header, file, "llama.attention.key_length", None)
    rope_dims = _meta(header, file, "llama.rope.dimension_count", None)
    scaling_type = _meta(header, file, "llama.rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise ValueError(f"{file}: rope scaling type {scaling_type!r} is not supported")
    config = LlamaConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=_meta(header, file, "llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=_meta(header, file, "llama.attention.head_count_kv", n_heads),
        ffn_dim=_meta(header, file, "llama.feed_forward_length"),
        head_dim=head_dim,
        norm_eps=_meta(header, file, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=float(_meta(header, file, "llama.rope.freq_base", 10000.0)),
        max_seq_len=_meta(header, file, "llama.context_length", 4096),
        tie_embeddings="output.weight" not in by_name,
        name=str(file),  # a bad value's error names the file; the model's name is the stem
    ).replace(name=file.stem)
    if rope_dims is not None and rope_dims != config.head_dim:
        raise ValueError(f"{file}: partial rotary embedding ({rope_dims} dims) is not supported")
    with open(file, "rb") as f:
        if _ROPE_FREQS in by_name:
            factors = _read(f.fileno(), file, by_name[_ROPE_FREQS]).astype(np.float32)
            config = config.replace(rope_scaling=_rope_scaling(file, factors, config))
    T = gguf.GGMLQuantizationType
    matrices = [
        jnp.bfloat16 if i.qtype == T.BF16 else np.float32 for i in infos if len(i.shape) == 2
    ]
    has_tokenizer = "tokenizer.ggml.tokens" in header.metadata

    def tensors() -> Iterator[Tensor]:
        with open(file, "rb") as f:
            for info in sorted(infos, key=lambda i: i.offset):
                path = _map(info.name)
                if path is None:
                    continue
                heads = {("attn", "q"): config.n_heads, ("attn", "k"): config.n_kv_heads}
                heads = heads.get(path[-3:-1], 0)
                array = _read(f.fileno(), file, info)
                yield Tensor(path, array, info.name, str(file), path[-1] == "kernel", heads)

    def save_tokenizer(dst: Path) -> str | None:
        if not has_tokenizer:
            return None
        # Only general.* and tokenizer.* entries, copied byte for byte: a few MB instead of a
        # copy of the whole GGUF, and cfjax.tokenizer.load reads it like any GGUF.
        keys = [k for k in header.spans if k.startswith(("general.", "tokenizer."))]
        write_metadata_only(file, header, keys, dst / "tokenizer.gguf")
        return "tokenizer.gguf"

    return Source(
        kind="gguf",
        path=file,
        config=config,
        dtype=natural_dtype(matrices),
        tensors=tensors,
        n_tensors=len(infos),
        expected_name=gguf_path_to_name,
        tokenizer_spec=str(file) if has_tokenizer else None,
        save_tokenizer=save_tokenizer,
    )
