"""One description of every param and KV-cache leaf: shape, dtype, logical axes, initializer.

In the manner of jax-llm-examples' llama3 (`ArrayInfo` per leaf): `init_params`, `param_shapes`,
the loaders' expected shapes and the shardings derive from it. Logical axes name what an axis is ("embed",
"heads", "ffn", "vocab", "batch", ...); one rule table (`RULES`) maps them to the axes of a
device mesh ("data", "model"), so the whole placement of a run is that table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cfjax.core.config import LlamaConfig

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated). Heads, kv heads, the MLP's hidden features and
# the vocabulary are split over `model` (tensor parallelism); rows over `data`.
RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "qkv": "model",  # the fused q|k|v columns (whole heads per shard: see `check_divisible`)
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "ffn": "model",
    "gate_up": "model",  # the fused gate|up columns
    "cache_seq": None,
    "layers": None,
    "channel": None,  # a quantization scale's size-1 axis
    # With `config.model_blocks > 1` the column kernels (qkv, gate_up, an untied head) are split
    # over `model` by their contraction instead, in whole blocks (`invariant.blocked_matmul`).
    "blocks": "model",
    "columns": None,
}


# Initializers of random params (`model.init_params`), one object each so that two specs compare
# equal: the usual fan-in scaling, i.e. unit-variance activations at every layer's input.
KERNEL_INIT = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=1)  # [in, out]
EMBED_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
ONES_INIT = jax.nn.initializers.ones


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One leaf: its shape, dtype, the logical name of each axis, and (for a param) the
    initializer `init(key, shape, dtype)` of a random model."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]
    init: Callable | None = None

    def partition(self, rules: dict[str, str | None] = RULES) -> PartitionSpec:
        """Its `PartitionSpec` under `rules`."""
        return PartitionSpec(*(rules[a] for a in self.axes))


def _leaf(shape, dtype, *axes, init: Callable | None = None) -> ArrayInfo:
    return ArrayInfo(tuple(int(s) for s in shape), jnp.dtype(dtype), tuple(axes), init)


def param_spec(config: LlamaConfig, dtype: Any = jnp.float32) -> dict:
    """The params pytree (fused layout, as `model.init_params` makes it) as `ArrayInfo`s."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    columns = lambda out: column_axes(c, out)  # noqa: E731
    norm = lambda: {"scale": _leaf((c.dim,), dtype, "embed", init=ONES_INIT)}  # noqa: E731
    kernel = lambda shape, *axes: {"kernel": _leaf(shape, dtype, *axes, init=KERNEL_INIT)}  # noqa: E731
    layer = {
        "attn_norm": norm(),
        "attn": {
            "qkv": kernel((c.dim, q + 2 * kv), *columns("qkv")),
            "o": kernel((q, c.dim), "heads", "embed"),
        },
        "mlp_norm": norm(),
        "mlp": {
            "gate_up": kernel((c.dim, 2 * c.ffn_dim), *columns("gate_up")),
            "down": kernel((c.ffn_dim, c.dim), "ffn", "embed"),
        },
    }
    embedding = _leaf((c.vocab_size, c.dim), dtype, "vocab", "embed", init=EMBED_INIT)
    spec = {
        "embed": {"embedding": embedding},
        "layers": {i: jax.tree_util.tree_map(lambda x: x, layer) for i in range(c.n_layers)},
        "final_norm": norm(),
    }
    if not c.tie_embeddings:
        spec["lm_head"] = kernel((c.dim, c.vocab_size), *columns("vocab"))
    return spec


def column_axes(config: LlamaConfig, out: str) -> tuple[str, str]:
    """The logical axes of a kernel `[dim, out]` whose output columns the rules split
    (`("embed", out)`), or, with `model_blocks > 1`, whose contraction they split in whole
    blocks (`("blocks", "columns")`)."""
    return ("blocks", "columns") if config.model_blocks > 1 else ("embed", out)


def cache_spec(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> dict:
    """A KV cache's leaves (per layer keys `[B, KV, D, S]`, values `[B, KV, S, D]`)."""
    c = config
    k = _leaf((batch, c.n_kv_heads, c.head_dim, length), dtype, "batch", "kv_heads", "head_dim", "cache_seq")  # fmt: skip
    v = _leaf((batch, c.n_kv_heads, length, c.head_dim), dtype, "batch", "kv_heads", "cache_seq", "head_dim")  # fmt: skip
    return {"k": [k] * c.n_layers, "v": [v] * c.n_layers}


def shapes(spec: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of a spec tree."""
    return jax.tree_util.tree_map(
        lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), spec, is_leaf=_is_info
    )


def initialize(spec: Any, key: jax.Array) -> Any:
    """Random arrays of a spec tree: each leaf's initializer with its own key (split from `key`
    in the tree's leaf order)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_info)
    for path, info in leaves:
        if info.init is None:
            raise ValueError(f"spec leaf {jax.tree_util.keystr(path)} has no initializer")
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten(
        [i.init(k, i.shape, i.dtype) for (_, i), k in zip(leaves, keys, strict=True)]
    )


def _is_info(x: Any) -> bool:
    return isinstance(x, ArrayInfo)


def leaf_info(spec: dict, path: tuple) -> ArrayInfo:
    """The `ArrayInfo` at `path` (dict keys) of a spec tree."""
    node: Any = spec
    for k in path:
        node = node[k]
    return node


def check_divisible(config: LlamaConfig, model: int) -> None:
    """Clear errors for a mesh whose model axis cannot split this model along the rules."""
    if model > 1:
        if config.model_blocks > 1 and config.model_blocks % model:
            raise ValueError(
                f"the mesh's model axis ({model}) does not divide model_blocks "
                f"({config.model_blocks}): each device must hold whole blocks"
            )
        for name, n in (("KV heads", config.n_kv_heads), ("attention heads", config.n_heads),
                        ("MLP features (ffn_dim)", config.ffn_dim),
                        ("vocabulary entries", config.vocab_size)):  # fmt: skip
            if n % model:
                raise ValueError(
                    f"the mesh's model axis ({model}) does not divide the {n} {name} of "
                    f"{config.name or 'this model'}: choose a model axis that does"
                )


def batch_axis(batch: int, data: int) -> str | None:
    """The mesh axis a batch of `batch` rows is split over: `data` when it divides the rows,
    else none (replicated)."""
    return "data" if data > 1 and batch % data == 0 else None


def mesh_of(tree: Any) -> Any:
    """The `Mesh` a pytree's leaves are sharded over (None on a single device)."""
    leaves = jax.tree_util.tree_leaves(tree)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def put(x: Any, sharding: Any) -> jax.Array:
    """`x` placed by `sharding`, also one that spans other processes' devices (every process
    passes the same value; each supplies its own devices' shards)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their key data
        data = put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(x: Any) -> np.ndarray:
    """A device array as a host numpy array, also one spread over several processes."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def constrain_cache(cache: Any, config: LlamaConfig) -> Any:
    """Inside jit under `jax.set_mesh`: pin a cache's leaves to the rules (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return cache
    b, s = cache.k[0].shape[0], cache.v[0].shape[2]
    info = cache_spec(config, b, s, cache.k[0].dtype)
    rules = {**RULES, "batch": batch_axis(b, mesh.shape["data"])}
    constrain = jax.lax.with_sharding_constraint
    return type(cache)(
        [constrain(x, info["k"][0].partition(rules)) for x in cache.k],
        [constrain(x, info["v"][0].partition(rules)) for x in cache.v],
    )
