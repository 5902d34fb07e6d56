"""Meta checkpoints: `params.json` + `consolidated.NN.pth` (one per model-parallel rank).

Each rank holds a slice of the column-parallel weights (wq, wk, wv, w1, w3, output: split along
dim 0 of the PyTorch weight), of the row-parallel ones (wo, w2: dim 1) and of the embedding (Llama
2's ParallelEmbedding splits the embedding dim, Llama 3's VocabParallelEmbedding the vocabulary;
the slice shape tells which), while norms are replicated. Shards are memory-mapped and merged one
tensor at a time. Meta's q/k rows pair RoPE features interleaved; they are permuted to rotate-half
exactly as transformers' convert_llama_weights_to_hf.py does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cfjax.core.config import LlamaConfig
from cfjax.weights.stream import Source, Tensor, natural_dtype

# Meta layer tensor -> (our path, merge axis of the PyTorch weight or None if replicated)
_LAYER = {
    "attention.wq.weight": (("attn", "q", "kernel"), 0),
    "attention.wk.weight": (("attn", "k", "kernel"), 0),
    "attention.wv.weight": (("attn", "v", "kernel"), 0),
    "attention.wo.weight": (("attn", "o", "kernel"), 1),
    "feed_forward.w1.weight": (("mlp", "gate", "kernel"), 0),
    "feed_forward.w3.weight": (("mlp", "up", "kernel"), 0),
    "feed_forward.w2.weight": (("mlp", "down", "kernel"), 1),
    "attention_norm.weight": (("attn_norm", "scale"), None),
    "ffn_norm.weight": (("mlp_norm", "scale"), None),
}
_TOP = {
    "tok_embeddings.weight": (("embed", "embedding"), "embed"),
    "norm.weight": (("final_norm", "scale"), None),
    "output.weight": (("lm_head", "kernel"), 0),
}
_IGNORED = {"rope.freqs"}  # Llama 2 stores its RoPE frequencies; they follow from the config


def _map(name: str) -> tuple[tuple, object] | None:
    if name in _TOP:
        return _TOP[name]
    if name in _IGNORED:
        return None
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and ".".join(parts[2:]) in _LAYER:
        path, axis = _LAYER[".".join(parts[2:])]
        return ("layers", int(parts[1]), *path), axis
    raise ValueError(f"unexpected tensor {name!r}: not part of a Meta Llama checkpoint")


def meta_path_to_name(path: tuple) -> str:
    """Meta's tensor name for a param path, for messages about missing tensors."""
    for name, (p, _) in _TOP.items():
        if p == path:
            return name
    rest = next(n for n, (p, _) in _LAYER.items() if p == path[2:])
    return f"layers.{path[1]}.{rest}"


def _numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits, no upcast copy
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def _release(t) -> None:
    # Pages of a memory-mapped file count in the process's RSS until reclaimed, so converting
    # an 8B model would show 16 GB of file pages beside the 16 GB of params. MADV_PAGEOUT
    # (Linux >= 5.4) reclaims them now; unlike MADV_DONTNEED it is only a hint that keeps the
    # contents, so it is harmless even if a tensor were not file-backed.
    try:
        import ctypes
        import mmap

        page = mmap.PAGESIZE
        start = t.data_ptr() // page * page
        end = t.data_ptr() + t.numel() * t.element_size()
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 21)
    except (OSError, AttributeError):  # not Linux: the kernel still reclaims under pressure
        pass


def is_meta_dir(directory: Path) -> bool:
    """Whether `directory` looks like a Meta checkpoint."""
    return (directory / "params.json").is_file() and any(directory.glob("consolidated.*.pth"))


def open_meta(directory: str | Path) -> Source:
    """Open a Meta directory: memory-map every shard (validating it), read no tensor yet."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading Meta .pth checkpoints needs PyTorch: pip install torch "
            "(or use the HF safetensors or a GGUF of the same model)"
        ) from None
    directory = Path(directory)
    files = sorted(directory.glob("consolidated.*.pth"))
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"{f}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg}"
            ) from None
    names = list(shards[0])
    for f, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))[:3]
            raise ValueError(f"{f}: holds different tensors than {files[0].name}: {diff}")
    for name in names:
        try:
            _map(name)
        except ValueError as e:
            raise ValueError(f"{files[0]}: {e}") from None
    params = json.loads((directory / "params.json").read_text())
    dim = params["dim"]
    emb = shards[0]["tok_embeddings.weight"]
    # A vocabulary split leaves whole rows of `dim` features on each rank.
    embed_axis = 0 if emb.shape[1] == dim and len(shards) > 1 else 1
    vocab = emb.shape[0] * (len(shards) if embed_axis == 0 else 1)
    config = LlamaConfig.from_meta(params, vocab_size=vocab, name=directory.resolve().name)
    if config.vocab_size != vocab:
        raise ValueError(
            f"{directory / 'params.json'}: vocab_size {config.vocab_size} but tensor "
            f"'tok_embeddings.weight' has {vocab} rows"
        )
    if "output.weight" not in names:
        config = config.replace(tie_embeddings=True)
    matrices = [_numpy(shards[0][n][:1, :1]).dtype for n in names if shards[0][n].ndim == 2]

    def tensors() -> Iterator[Tensor]:
        for name in names:
            mapped = _map(name)
            if mapped is None:
                continue
            path, axis = mapped
            axis = embed_axis if axis == "embed" else axis
            pieces = [_numpy(s[name]) for s in shards]
            if axis is None or len(pieces) == 1:
                array = pieces[0]
            else:
                try:
                    array = np.concatenate(pieces, axis=axis)
                except ValueError:
                    shapes = [tuple(p.shape) for p in pieces]
                    raise ValueError(
                        f"{directory}: tensor {name!r} has shard shapes {shapes}, which do not "
                        f"merge along dim {axis}"
                    ) from None
            heads = {("attn", "q"): config.n_heads, ("attn", "k"): config.n_kv_heads}
            heads = heads.get(path[-3:-1], 0)
            yield Tensor(path, array, name, str(directory), path[-1] == "kernel", heads)
            del array, pieces
            for shard in shards:  # assemble has copied it: drop its pages of the mapped file
                _release(shard[name])

    tokenizer = directory / "tokenizer.model"

    def save_tokenizer(dst: Path) -> str | None:
        if not tokenizer.is_file():
            return None
        shutil.copy2(tokenizer, dst / "tokenizer.model")
        return "tokenizer.model"

    return Source(
        kind="meta",
        path=directory,
        config=config,
        dtype=natural_dtype(matrices),
        tensors=tensors,
        n_tensors=len(names),
        expected_name=meta_path_to_name,
        tokenizer_spec=str(tokenizer) if tokenizer.is_file() else None,
        save_tokenizer=save_tokenizer,
    )
