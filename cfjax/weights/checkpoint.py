"""Converted checkpoints: an orbax params checkpoint plus `cfjax.json`, in one folder.

    DST/cfjax.json   format, config (LlamaConfig.to_dict), dtype, source, model_id, tokenizer,
                     digests (CRC-32 per tensor), files (the size of each params file)
    DST/params/      orbax (tensorstore) checkpoint of the params pytree
    DST/tokenizer*   the tokenizer, copied so the folder loads on its own

Version 2 stores the fused kernels of `model.py` (attn/qkv, mlp/gate_up); version 1 folders hold
q, k, v, gate and up separately and are fused as they are restored.

Restoring against the abstract params of `model.param_shapes` gives back the exact pytree: int
layer keys, and bit-identical arrays when the dtype is unchanged (orbax casts otherwise).
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import jax
import numpy as np

from cfjax.atomic import deferred_interrupts
from cfjax.core import fusion
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
    """The folder's `cfjax.json`, checked for format, version and the fields a load reads."""
    file = Path(directory) / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{file}: unreadable cfjax checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: not a cfjax checkpoint (a JSON {type(meta).__name__}, not an object)")  # fmt: skip
    version = meta.get("version", 0)
    if meta.get("format") != FORMAT or not _is_int(version) or not 1 <= version <= VERSION:
        raise ValueError(
            f"{file}: not a cfjax checkpoint of a known version (format {meta.get('format')!r}, "
            f"version {version!r})"
        )
    for field, kind in (("config", dict), ("dtype", str), ("model_id", str)):
        if not isinstance(meta.get(field), kind):
            raise ValueError(f"{file}: field {field!r} is missing or not a JSON {kind.__name__}")
    if not isinstance(meta.get("tokenizer") or "", str) or not isinstance(meta.get("digests") or {}, dict):  # fmt: skip
        raise ValueError(f"{file}: field 'tokenizer' or 'digests' has the wrong type")
    files = meta.get("files") or {}
    if not isinstance(files, dict) or not all(_is_params_file(k) and _is_int(n) for k, n in files.items()):  # fmt: skip
        raise ValueError(f"{file}: field 'files' is not an object of sizes of files under {PARAMS}/")  # fmt: skip
    return meta


def check_replaceable(directory: Path) -> None:
    """Raise unless `directory` is a cfjax checkpoint folder and holds nothing else (its
    metadata, params and tokenizer), so that replacing it deletes no other file."""
    meta = read_meta(directory)
    if not meta.get("digests"):
        raise ValueError(f"{directory}: its {META} names no tensors; not a complete cfjax checkpoint")  # fmt: skip
    own = {META, PARAMS}
    if meta.get("tokenizer"):
        own.add(Path(meta["tokenizer"]).parts[0])
    others = sorted(p.name for p in directory.iterdir() if p.name not in own)
    if others:
        raise FileExistsError(f"{directory}: holds files that are not the checkpoint's ({', '.join(others[:3])}); not replaced")  # fmt: skip


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_params_file(name) -> bool:
    """Whether `name` is a relative path below the params folder (no `..`, nothing absolute)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    return len(parts) > 1 and parts[0] == PARAMS and ".." not in parts and "\\" not in name


def write_meta(directory: Path, meta: dict) -> None:
    """Write `cfjax.json` (format and version added, and the size of every file of the params
    written before it: see `check_files`)."""
    meta = {"format": FORMAT, "version": VERSION, **meta, "files": file_sizes(directory)}
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file of the folder's params, by its path within the folder: its size in bytes."""
    root = Path(directory)
    return {
        f.relative_to(root).as_posix(): f.stat().st_size
        for f in sorted((root / PARAMS).rglob("*"))
        if f.is_file()
    }


def check_files(directory: Path, meta: dict) -> None:
    """Raise naming the first params file that is missing or not of the size recorded at
    conversion (a truncated or unfinished copy), before orbax reads any: a read that fails
    midway leaves orbax's other reads to report on a closed event loop (stderr noise)."""
    for name, size in (meta.get("files") or {}).items():
        file = Path(directory) / name
        if not file.is_file():
            raise ValueError(f"{directory}: file {name} is missing (an incomplete copy?): convert it again")  # fmt: skip
        if (held := file.stat().st_size) != size:
            raise ValueError(
                f"{directory}: file {name} holds {held:,} bytes, {size:,} were "
                "written at conversion (a truncated or damaged copy): convert it again"
            )


def digests(params: dict) -> dict[str, str]:
    """CRC-32 of every param's bytes, by tree path: recorded at conversion, checked on load, so
    that a damaged file names its tensor instead of loading as other weights."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        data = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
        out[jax.tree_util.keystr(path)] = f"{zlib.crc32(data):08x}"
    return out


def verify(params: dict, expected: dict[str, str], directory: Path) -> None:
    """Raise naming the first tensor whose bytes differ from those written at conversion."""
    for name, digest in digests(params).items():
        if expected.get(name) != digest:
            raise ValueError(
                f"{directory}: tensor {name} does not match the checksum recorded at conversion "
                "(the checkpoint is damaged): convert it again"
            )


def save_params(directory: Path, params: dict) -> dict[str, str]:
    """Write the params pytree (jax arrays) as an orbax checkpoint under `directory`; returns
    their `digests`."""
    import orbax.checkpoint as ocp

    # Bounded in-flight bytes: orbax would otherwise stage a host copy of every array at once
    # (2.3x the model in RSS). Uncompressed: zstd shrinks bf16 weights ~20% but halves the
    # speed of both save and restore, and a fast restore is what the copy is for.
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, save_device_host_concurrent_gb=1, use_compression=False
    )
    # An interrupt under orbax's writer threads aborts the process and leaves the folder
    # behind: it is held until the save is done, then raised for the caller to clean up.
    with deferred_interrupts(), ocp.Checkpointer(handler) as ckptr:
        ckptr.save((directory / PARAMS).resolve(), args=ocp.args.PyTreeSave(params))
    return digests(params)


def _quiet_abandoned_reads() -> None:
    """Drop the reports of the reads a failed restore leaves in flight. Each finishes after
    orbax closed its event loop and reports `RuntimeError: Event loop is closed` (raised in
    `call_soon_threadsafe`, called from tensorstore's threads) to `sys.unraisablehook`: a
    traceback on stderr, before or after the readable error. Installed before the restore, as
    the first reports can come before the failure reaches Python; every other report goes on
    to the hook in place before."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_abandoned_reads", False):
        return

    def hook(report) -> None:
        e, tb = report.exc_value, report.exc_traceback
        abandoned = (type(e) is RuntimeError and str(e) == "Event loop is closed" and report.object is None
                     and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")  # fmt: skip
        if not abandoned:
            previous(report)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook


def restore_params(
    directory: str | Path, config: LlamaConfig, dtype, meta: dict, mesh: Any = None
) -> dict:
    """Restore params as jax arrays in `dtype` (on the default device, or with a `mesh` each
    read straight onto its shards by the rules of `cfjax.sharding`), int layer keys kept.

    `meta` is the folder's `read_meta(directory)`: its version says the layout, and its
    digests (folders converted since they were added) are checked against the bytes read, in
    the stored dtype, before any cast.
    """
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    split = meta.get("version", 1) < 2
    expected = meta.get("digests")
    read_as = np.dtype(meta["dtype"] if expected else dtype).name
    shapes = expected_shapes(config, read_as, split=split)
    if mesh is not None and not split:
        from cfjax.sharding import param_shardings

        placed = param_shardings(config, shapes, mesh)
    else:
        placed = jax.tree.map(lambda _: sharding, shapes)
    abstract = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, placed
    )
    restore = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )
    check_files(Path(directory), meta)
    path = (Path(directory) / PARAMS).resolve()
    _quiet_abandoned_reads()
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=1)) as ckptr:
            params = ckptr.restore(path, args=restore)
    except Exception as e:
        # The first line of orbax's / tensorstore's message, up to the object reprs it
        # carries ("See full TensorStore details: <bound method ...>").
        line = str(e).splitlines()[0] if str(e) else ""
        msg = re.split(r"<|See full TensorStore", line)[0].strip(" .:")[:200]
        raise ValueError(
            f"{path}: corrupt or incomplete cfjax checkpoint ({type(e).__name__}: {msg})"
        ) from None
    if expected:
        verify(params, expected, Path(directory))
        if read_as != np.dtype(dtype).name:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
    if split:  # a version-1 (split layout) folder: fused here, then placed
        params = fusion.fuse_layers_in_place(params)
        if mesh is not None:
            from cfjax.sharding import shard_params

            params = shard_params(config, params, mesh)
    return params
