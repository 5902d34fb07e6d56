"""The core every checkpoint reader shares: a one-pass stream of source tensors -> checked params.

A reader (hf, meta, gguf, checkpoint) opens a checkpoint as a `Source`:
its config plus a generator of `Tensor`s in the source's own layout. `assemble` checks each tensor
against `fusion.split_shapes(config)` as it arrives (errors name file, tensor and both shapes),
converts it to cfjax's layout (`model.py`: kernels `[in, out]`, rotate-half q/k) and to the target
dtype, and drops the source copy before the next one is read: the host holds the growing result
plus one source tensor, never two copies of the model. At the end each layer's q, k, v and gate,
up are joined into the fused kernels, one layer at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import fusion, model
from cfjax.core.config import LlamaConfig

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


class Tensor(NamedTuple):
    """One source tensor on its way into the params pytree."""

    path: tuple  # where it goes in the params pytree, e.g. ("layers", 0, "attn", "q", "kernel")
    array: np.ndarray  # in the source's layout (PyTorch `[out, in]` for linear weights)
    name: str  # the source's tensor name, for messages
    file: str = ""  # the file it came from, for messages
    transpose: bool = False  # PyTorch `[out, in]` -> our `[in, out]`
    rope_heads: int = 0  # > 0: rows pair RoPE features interleaved over this many heads


@dataclasses.dataclass
class Source:
    """An opened checkpoint: config and a one-pass tensor stream; nothing large is read yet."""

    kind: str  # "hf", "meta", "gguf" or "cfjax"
    path: Path
    config: LlamaConfig
    dtype: np.dtype  # natural params dtype: bfloat16 for a bf16 checkpoint, else float32
    tensors: Callable[[], Iterator[Tensor]]
    n_tensors: int
    expected_name: Callable[[tuple], str]  # our param path -> the source's tensor name
    tokenizer_spec: str | None  # what `cfjax.tokenizer.load` takes; None: no tokenizer files
    save_tokenizer: Callable[[Path], str | None]  # copy it into a converted dir -> relative spec
    model_id: str = ""

    def __post_init__(self) -> None:
        if not self.model_id:
            self.model_id = f"{self.kind}:{self.path.resolve()}"


def resolve_dtype(dtype, natural: np.dtype) -> np.dtype:
    """The params dtype to use: `dtype` if given (bfloat16 or float32), else the source's own."""
    if dtype is None:
        return np.dtype(natural)
    try:
        d = np.dtype(jnp.dtype(dtype))
    except TypeError:
        d = None
    if d not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype!r}: use bfloat16 or float32")
    return d


def natural_dtype(dtypes) -> np.dtype:
    """bfloat16 when every source matrix is bfloat16 (keeps 8B models at 16 GB), else float32."""
    dtypes = {np.dtype(d) for d in dtypes}
    return DTYPES["bfloat16"] if dtypes == {DTYPES["bfloat16"]} else DTYPES["float32"]


def to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k `[out, in]` from interleaved RoPE pairs (Meta, GGUF) to rotate-half (HF).

    This is `permute()` of transformers' convert_llama_weights_to_hf.py and the inverse of
    llama.cpp's `LlamaModel.permute`; for K, `n_heads` is the number of KV heads.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=16)
def expected_shapes(config: LlamaConfig, dtype_name: str, split: bool = False) -> dict:
    """`model.param_shapes` (or `split_shapes`), cached: tracing a 30-layer model takes a second.

    The result is shared: do not mutate it.
    """
    shapes = fusion.split_shapes if split else model.param_shapes
    return shapes(config, np.dtype(dtype_name))


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _progress(total: int | None, enabled: bool | None, desc: str):
    # A bar only for a person watching a terminal: logs and CI stay clean.
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def assemble(
    config: LlamaConfig,
    tensors: Iterator[Tensor | tuple],
    dtype=jnp.float32,
    source: str = "",
    *,
    expected_name: Callable[[tuple], str] | None = None,
    total: int | None = None,
    progress: bool | None = False,
    place: Callable[[tuple, np.ndarray], Any] | None = None,
) -> dict:
    """Build a params pytree from a tensor stream, checking every shape as it arrives.

    `place(path, array)` puts each host tensor on its device(s) (default: `jax.device_put`, the
    default device; `cfjax.sharding.placer` puts it on its shards). The parts of a fused kernel
    (q, k, v; gate, up) wait on the host until their layer has all of them, then are fused and
    placed: the host holds at most one layer's parts beyond the tensor being read.
    `expected_name` maps a param path back to the source's name for "missing" errors;
    `progress` shows a bar (None: on a terminal).
    """
    place = place or (lambda _path, array: jax.device_put(array))
    target = np.dtype(jnp.dtype(dtype))
    expected = expected_shapes(config, target.name, split=True)
    params: dict = {}
    pending: dict[tuple, dict[str, np.ndarray]] = {}  # fused kernels waiting for their parts
    seen: dict[tuple, str] = {}
    bar = _progress(total, progress, f"loading {Path(source).name or 'weights'}")
    try:
        for item in tensors:
            t = item if isinstance(item, Tensor) else Tensor(*item)
            where = t.file or source
            if bar is not None:
                bar.update()
            if config.tie_embeddings and t.path[0] == "lm_head":
                continue  # some tied checkpoints still store a copy of the embedding
            try:
                want = tuple(_get(expected, t.path).shape)
            except (KeyError, TypeError):
                raise ValueError(
                    f"{where}: tensor {t.name!r} maps to unknown parameter {'/'.join(map(str, t.path))}"
                ) from None
            want_src = want[::-1] if t.transpose else want
            if tuple(t.array.shape) != want_src:
                raise ValueError(
                    f"{where}: tensor {t.name!r} has shape {tuple(t.array.shape)}, expected "
                    f"{want_src} ({'/'.join(map(str, t.path))} of config {config.name})"
                )
            if t.path in seen:
                raise ValueError(f"{where}: tensor {t.name!r} duplicates {seen[t.path]!r}")
            array = to_rotate_half(t.array, t.rope_heads) if t.rope_heads else t.array
            if t.transpose:
                array = array.T
            # Always an owned, contiguous copy: never a view that pins a memory-mapped file.
            array = np.array(array, dtype=target, order="C")
            seen[t.path] = t.name
            group = _fused_group(t.path)
            if group is None:
                _set(params, t.path, place(t.path, array))
                continue
            parts = pending.setdefault(group, {})
            parts[t.path[3]] = array
            names = fusion.FUSED[group[2:]]
            if len(parts) == len(names):  # the layer's q, k, v (or gate, up) are all here
                fused_path = (*group, "kernel")
                fused = np.concatenate([parts[n] for n in names], axis=1)
                _set(params, fused_path, place(fused_path, fused))
                del pending[group], parts, fused
    finally:
        if bar is not None:
            bar.close()
    paths = [
        tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(expected)[0]
    ]
    missing = [p for p in paths if p not in seen]
    if missing:
        name = expected_name or (lambda p: "/".join(map(str, p)))
        listed = ", ".join(
            f"{name(p)} (cfjax {'/'.join(map(str, p))} {tuple(_get(expected, p).shape)})"
            for p in missing[:3]
        )
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor {listed}{more}")
    return params


def _fused_group(path: tuple) -> tuple | None:
    """("layers", i, module, fused name) for a part of a fused kernel, else None."""
    if len(path) == 5 and path[0] == "layers":
        for (mod, fused), names in fusion.FUSED.items():
            if path[2] == mod and path[3] in names:
                return ("layers", path[1], mod, fused)
    return None
