"""Converted checkpoints: an orbax params checkpoint plus `cfjax.json`, in one folder.

    DST/cfjax.json   format, config (LlamaConfig.to_dict), dtype, source, model_id, tokenizer
    DST/params/      orbax (tensorstore) checkpoint of the params pytree
    DST/tokenizer*   the tokenizer, copied so the folder loads on its own

Version 2 stores the fused kernels of `model.py` (attn/qkv, mlp/gate_up); version 1 folders hold
q, k, v, gate and up separately and are fused as they are restored.

Restoring against the abstract params of `model.param_shapes` gives back the exact pytree: int
layer keys, and bit-identical arrays when the dtype is unchanged (orbax casts otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from cfjax.core import model
from cfjax.core.config import LlamaConfig
from cfjax.weights.stream import expected_shapes

FORMAT = "cfjax-checkpoint"
VERSION = 2
META = "cfjax.json"
PARAMS = "params"


def is_converted(path: str | Path) -> bool:
    """Whether `path` is a converted cfjax checkpoint folder."""
    return (Path(path) / META).is_file()


def read_meta(directory: str | Path) -> dict:
    """The folder's `cfjax.json`, checked for format and version."""
    file = Path(directory) / META
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable cfjax checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(
            f"{file}: not a cfjax checkpoint of a known version (format {meta.get('format')!r}, "
            f"version {meta.get('version')!r})"
        )
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    """Write `cfjax.json` (format and version added)."""
    meta = {"format": FORMAT, "version": VERSION, **meta}
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")


def save_params(directory: Path, params: dict) -> None:
    """Write the params pytree (jax arrays) as an orbax checkpoint under `directory`."""
    import orbax.checkpoint as ocp

    # Bounded in-flight bytes: orbax would otherwise stage a host copy of every array at once
    # (2.3x the model in RSS). Uncompressed: zstd shrinks bf16 weights ~20% but halves the
    # speed of both save and restore, and a fast restore is what the copy is for.
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, save_device_host_concurrent_gb=1, use_compression=False
    )
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save((directory / PARAMS).resolve(), args=ocp.args.PyTreeSave(params))


def restore_params(
    directory: str | Path, config: LlamaConfig, dtype, version: int = VERSION
) -> dict:
    """Restore params as jax arrays in `dtype` (on the default device), int layer keys kept.

    `version` is the folder's format version (`read_meta(directory)["version"]`).
    """
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    split = version < 2
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        expected_shapes(config, np.dtype(dtype).name, split=split),
    )
    restore = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )
    path = (Path(directory) / PARAMS).resolve()
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=1)) as ckptr:
            params = ckptr.restore(path, args=restore)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: corrupt or incomplete cfjax checkpoint ({msg})") from None
    return model.fuse_layers_in_place(params) if split else params
