"""HF checkpoints: `config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`.

The safetensors files are read with plain `pread`s driven by their JSON header rather than
mmap: every header is validated against its file's size before any tensor is read (a truncated
or corrupt download is an error up front), and memory holds only the tensor being converted.
HF's q/k rows are already in cfjax's rotate-half layout; linear weights are transposed.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cfjax.core.config import LlamaConfig
from cfjax.weights.stream import Source, Tensor, natural_dtype

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "F64": np.dtype(np.float64),
}
# Files a tokenizer may need; copied beside a converted checkpoint so that it loads on its own.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# HF tensor name (layer index as {i}) -> (our path, transpose?)
_HF_LAYER = {
    "self_attn.q_proj.weight": (("attn", "q", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o", "kernel"), True),
    "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down", "kernel"), True),
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
}
_HF_TOP = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
_HF_NAME = {path: name for name, (path, _) in _HF_TOP.items()}


def hf_name_to_path(name: str) -> tuple[tuple, bool] | None:
    """Map an HF tensor name to (params path, transpose?); None for tensors we do not use."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in _HF_LAYER:
            path, transpose = _HF_LAYER[rest]
            return ("layers", int(parts[2]), *path), transpose
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected tensor {name!r}: not part of a Llama checkpoint")


def hf_path_to_name(path: tuple) -> str:
    """Inverse of `hf_name_to_path`, for messages about missing tensors."""
    if path in _HF_NAME:
        return _HF_NAME[path]
    rest = next(n for n, (p, _) in _HF_LAYER.items() if p == path[2:])
    return f"model.layers.{path[1]}.{rest}"


def read_header(file: Path) -> tuple[int, dict]:
    """Parse and validate a safetensors header: (data start offset, {name: entry})."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(
                f"{file}: truncated or not a safetensors file (header of {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    start, end = 8 + n, 8 + n
    for name, entry in header.items():
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(
                f"{file}: tensor {name!r} has dtype {entry.get('dtype')}; cfjax reads "
                f"{', '.join(_DTYPES)}"
            )
        b, e = entry["data_offsets"]
        if e - b != int(np.prod(entry["shape"])) * dtype.itemsize:
            raise ValueError(f"{file}: tensor {name!r} has a corrupt header entry {entry}")
        end = max(end, start + e)
    if end > size:
        raise ValueError(
            f"{file}: truncated safetensors file: its header needs {end} bytes, the file has {size}"
        )
    return start, header


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory, single or sharded (index checked)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (directory / f).exists():
                raise FileNotFoundError(f"{index}: lists shard {f}, which does not exist")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_tensor(file: Path, handle, start: int, entry: dict) -> np.ndarray:
    """Read one tensor described by a validated header entry from an open file."""
    b, e = entry["data_offsets"]
    buf = np.empty(e - b, np.uint8)
    handle.seek(start + b)
    if handle.readinto(memoryview(buf)) != e - b:
        raise ValueError(f"{file}: truncated while reading tensor data")
    return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def open_hf(directory: str | Path) -> Source:
    """Open an HF directory: parse config and every header; read no tensor yet."""
    directory = Path(directory)
    try:
        config = LlamaConfig.from_hf(directory, name=directory.resolve().name)
    except KeyError as e:
        raise ValueError(f"{directory / 'config.json'}: missing key {e}") from None
    except ValueError as e:
        raise ValueError(f"{directory / 'config.json'}: {e}") from None
    headers = [(file, *read_header(file)) for file in safetensors_files(directory)]
    for file, _, header in headers:  # an unexpected tensor is an error before anything is read
        for name in header:
            try:
                hf_name_to_path(name)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
    matrices = [
        _DTYPES[e["dtype"]] for _, _, h in headers for e in h.values() if len(e["shape"]) == 2
    ]

    def tensors() -> Iterator[Tensor]:
        for file, start, header in headers:
            with open(file, "rb") as handle:
                # In file order, so reads are sequential.
                for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
                    mapped = hf_name_to_path(name)
                    if mapped is None:
                        continue
                    path, transpose = mapped
                    array = read_tensor(file, handle, start, entry)
                    yield Tensor(path, array, name, str(file), transpose)

    # What cfjax.tokenizer.load reads from a model folder; HF repos of Meta's models keep the
    # tiktoken/sentencepiece file under original/.
    vocab_files = [directory / "tokenizer.json", directory / "tokenizer.model"]
    vocab_files += [directory / "original" / "tokenizer.model"]
    has_tokenizer = any(f.is_file() for f in vocab_files)

    def save_tokenizer(dst: Path) -> str | None:
        if not has_tokenizer:
            return None
        files = [directory / f for f in TOKENIZER_FILES if (directory / f).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
            files.append(vocab_files[2])
        (dst / "tokenizer").mkdir()
        for f in files:
            shutil.copy2(f, dst / "tokenizer" / f.name)
        return "tokenizer"

    return Source(
        kind="hf",
        path=directory,
        config=config,
        dtype=natural_dtype(matrices),
        tensors=tensors,
        n_tensors=sum(len(h) for _, _, h in headers),
        expected_name=hf_path_to_name,
        tokenizer_spec=str(directory) if has_tokenizer else None,
        save_tokenizer=save_tokenizer,
    )
