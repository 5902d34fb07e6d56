"""Meshes, shardings and multi-host start-up, with JAX's own SPMD machinery.

    mesh = cfjax.sharding.mesh(data=2, model=4)        # named axes over the devices present
    lm = cfjax.load("llama3-8b-instruct", mesh=mesh)   # each tensor placed on its shards as read
    trace = cfjax.generate(lm, "...")                  # runs under the mesh (GSPMD)

Params, the KV cache and the batch get `NamedSharding`s from one rule table
(`cfjax.core.spec.RULES`: heads, KV heads, MLP features and the vocabulary over `model`, rows
over `data`) applied to the leaf descriptions of `cfjax.core.spec`. The engine finds the mesh on
the params: rows and tokens are placed on it, the cache is pinned to the rules inside the
compiled programs, and XLA partitions the rest. `initialize()` starts a multi-host run
(`jax.distributed.initialize`), after which `mesh()` spans every host's devices.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cfjax.core import spec
from cfjax.core.checks import count
from cfjax.core.config import LlamaConfig
from cfjax.core.spec import mesh_of


def mesh(data: int | None = None, model: int = 1, *, devices: Any = None, **axes: Any) -> Mesh:
    """A `Mesh` with axes (`data`, `model`) over `devices` (default: all, of every host).

    `data` defaults to the devices left over by `model`. Unknown axis names, sizes that do not
    multiply to the devices used, or more devices than present are clear errors.
    """
    if axes:
        raise ValueError(
            f"unknown mesh axis {sorted(axes)[0]!r}: the axes are {', '.join(spec.MESH_AXES)}"
        )
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("model", model), ("data", data)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"mesh: {name} must be an integer >= 1, got {n!r}")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"mesh: model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(
            f"mesh: data={data} x model={model} needs {data * model} devices; "
            f"{len(devices)} are present"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD propagates the shardings of the inputs
    return Mesh(grid, spec.MESH_AXES, axis_types=auto)


def _info_at(table: dict, path: tuple, leaf: Any) -> spec.ArrayInfo:
    """The logical axes of a params leaf (`table`: `spec.param_spec`), quantization scales and
    steerings included."""
    if path[0] == "steer":  # [n_layers, dim] deltas and a flag: small, replicated
        return spec.ArrayInfo(leaf.shape, leaf.dtype, ("layers", "embed")[: leaf.ndim])
    if path[-1] == "qscale":  # the scale of its sibling matrix's output channels
        sibling = "embedding" if path[-2] == "embed" else "kernel"
        axes = spec.leaf_info(table, (*path[:-1], sibling)).axes
        axes = (axes[0], "channel") if sibling == "embedding" else ("channel", axes[1])
        return spec.ArrayInfo(leaf.shape, leaf.dtype, axes)
    return spec.leaf_info(table, path)


def _path(key_path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)


def check_mesh(mesh: Any) -> None:
    """A clear error for anything but a `Mesh` with the axes (data, model)."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != spec.MESH_AXES:
        axes = f" with axes {tuple(mesh.axis_names)}" if isinstance(mesh, Mesh) else ""
        raise ValueError(
            f"mesh must be a Mesh with axes {spec.MESH_AXES} (cfjax.sharding.mesh), got a "
            f"{type(mesh).__name__}{axes}"
        )


def param_shardings(config: LlamaConfig, params: Any, mesh: Mesh) -> Any:
    """A `NamedSharding` for every leaf of `params` (float, quantized or steered)."""
    spec.check_divisible(config, mesh.shape["model"])
    table = spec.param_spec(config)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(mesh, _info_at(table, _path(kp), x).partition()), params
    )


def shard_params(config: LlamaConfig, params: Any, mesh: Mesh) -> Any:
    """`params` placed on `mesh` by the rules (a copy per shard, never a whole one per device)."""
    return jax.tree_util.tree_map(spec.put, params, param_shardings(config, params, mesh))


def placer(config: LlamaConfig, mesh: Mesh):
    """`place(path, array)` for a loader: puts one host tensor (split or fused layout) on its
    shards."""
    spec.check_divisible(config, mesh.shape["model"])
    columns = lambda out: spec.column_axes(config, out)  # noqa: E731
    split = {
        ("attn", "q"): columns("heads"), ("attn", "k"): columns("kv_heads"),
        ("attn", "v"): columns("kv_heads"), ("mlp", "gate"): columns("ffn"),
        ("mlp", "up"): columns("ffn"),
    }  # fmt: skip
    table = spec.param_spec(config)

    def place(path: tuple, array: np.ndarray) -> jax.Array:
        if path[0] == "layers" and tuple(path[2:4]) in split:
            info = spec.ArrayInfo(array.shape, array.dtype, split[tuple(path[2:4])])
        else:
            info = spec.leaf_info(table, path)
        return spec.put(array, NamedSharding(mesh, info.partition()))

    return place


def memory(
    config: LlamaConfig,
    *,
    batch: int,
    context: int,
    dtype: Any = "bfloat16",
    data: int = 1,
    model: int = 1,
) -> dict:
    """Bytes per device of the params and the KV cache of `batch` rows of `context` slots on a
    (data, model) mesh, by the rules (a replicated leaf counts whole on every device)."""
    batch, context = count(batch, "batch"), count(context, "context")
    data, model = count(data, "data"), count(model, "model")
    spec.check_divisible(config, model)
    sizes = {"data": data, "model": model}
    rules = {**spec.RULES, "batch": spec.batch_axis(batch, data)}

    def per_device(info: spec.ArrayInfo) -> int:
        parts = [sizes[m] for m in (rules[a] for a in info.axes) if m is not None]
        return math.prod(info.shape) * info.dtype.itemsize // math.prod(parts)

    leaves = lambda tree: jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, spec.ArrayInfo)
    )  # noqa: E731
    params = sum(per_device(i) for i in leaves(spec.param_spec(config, dtype)))
    cache = sum(per_device(i) for i in leaves(spec.cache_spec(config, batch, context, dtype)))
    return {"devices": data * model, "params_bytes": params, "cache_bytes": cache,
            "total_bytes": params + cache}  # fmt: skip


def initialize(*, cpu: bool = False, **kwargs: Any) -> None:
    """Start a multi-host run: `jax.distributed.initialize(**kwargs)` (on TPU pods and SLURM or
    Open MPI GPU clusters the arguments are found in the environment; elsewhere give
    `coordinator_address`, `num_processes` and `process_id`). Call it before anything else
    touches jax; then `mesh()` spans the devices of every process. `cpu=True` selects gloo for
    the collectives between CPU processes (XLA:CPU has none by default)."""
    if cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


__all__ = [
    "PartitionSpec",
    "initialize",
    "memory",
    "mesh",
    "mesh_of",
    "param_shardings",
    "placer",
    "shard_params",
]
