"""Load Llama weights into cfjax's params pytree (layout described in model.py).

Every source is mapped tensor by tensor onto `model.param_shapes(config)`: each tensor is checked
against its expected shape as it arrives (the error names file, tensor and both shapes), and a
missing or unexpected tensor is an error, never a silent default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import model
from cfjax.config import LlamaConfig
from cfjax.lm import LM

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


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def assemble(
    config: LlamaConfig,
    tensors: Iterator[tuple[tuple, np.ndarray, str]],
    dtype=jnp.float32,
    source: str = "",
) -> dict:
    """Build a params pytree from `(path, array, tensor name)` items, checking every shape.

    Arrays are converted to `dtype` one at a time, so the host holds at most one source tensor
    beside the growing result.
    """
    expected = model.param_shapes(config, dtype)
    params: dict = {}
    seen: set[tuple] = set()
    for path, array, name in tensors:
        if config.tie_embeddings and path[0] == "lm_head":
            continue  # some tied checkpoints still store a copy of the embedding
        try:
            want = _get(expected, path).shape
        except (KeyError, TypeError):
            raise ValueError(
                f"{source}: tensor {name!r} maps to unknown parameter {path}"
            ) from None
        if tuple(array.shape) != tuple(want):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(want)} "
                f"for {'/'.join(map(str, path))}"
            )
        _set(params, path, jnp.asarray(array, dtype=dtype))
        seen.add(path)
    expected_paths = [
        tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(expected)[0]
    ]
    missing = ["/".join(map(str, p)) for p in expected_paths if p not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    return params


def _safetensors_files(directory: Path) -> list[Path]:
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


def _iter_hf(directory: Path) -> Iterator[tuple[tuple, np.ndarray, str]]:
    from safetensors import safe_open

    for file in _safetensors_files(directory):
        try:
            handle = safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                mapped = hf_name_to_path(name)
                if mapped is None:
                    continue
                path, transpose = mapped
                try:
                    array = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(
                        f"{file}: tensor {name!r} is truncated or corrupt ({e})"
                    ) from e
                yield path, (array.T if transpose else array), f"{file.name}:{name}"


def load_hf(directory: str | Path, dtype=jnp.float32) -> LM:
    """Load an HF directory (`config.json` + `model.safetensors` or a sharded index)."""
    directory = Path(directory)
    config = LlamaConfig.from_hf(directory, name=directory.name)
    params = assemble(config, _iter_hf(directory), dtype, source=str(directory))
    return LM(config=config, params=params, tokenizer=None, model_id=f"hf:{directory.resolve()}")


def load(spec: str | Path, dtype=None) -> LM:
    """Load a model from a path (HF directory) with params in `dtype` (default float32)."""
    dtype = jnp.dtype(dtype or jnp.float32)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path, dtype)
    raise FileNotFoundError(f"{spec}: not a model directory with config.json")
