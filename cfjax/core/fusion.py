"""The two layouts of the layer matrices: fused (q, k, v and gate, up concatenated along their
output columns, what `model.apply` takes: one matmul each) and split (one matrix each, the
layout of every checkpoint format and the handy one to edit a single matrix)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import model
from cfjax.core.config import LlamaConfig

# Fused kernel -> the checkpoint matrices it concatenates (along its output columns, in order).
FUSED = {("attn", "qkv"): ("q", "k", "v"), ("mlp", "gate_up"): ("gate", "up")}


def _part_widths(config: LlamaConfig) -> dict[tuple, tuple[int, ...]]:
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {("attn", "qkv"): (q, kv, kv), ("mlp", "gate_up"): (config.ffn_dim, config.ffn_dim)}


def split_params(config: LlamaConfig, params: dict) -> dict:
    """The params with each fused kernel split into its matrices (q, k, v; gate, up).

    This is the layout of every checkpoint format, and the handy one to edit a single matrix;
    `fuse_params` turns it back into what `apply` takes. Other leaves are shared, not copied.
    """
    widths = _part_widths(config)
    layers = {}
    for i, layer in params["layers"].items():
        layer = {k: dict(v) for k, v in layer.items()}
        for (mod, fused), parts in FUSED.items():
            kernel = layer[mod].pop(fused)["kernel"]
            cuts = np.cumsum(widths[(mod, fused)])[:-1].tolist()
            xp = np if isinstance(kernel, np.ndarray) else jnp
            for name, w in zip(parts, xp.split(kernel, cuts, axis=1), strict=True):
                layer[mod][name] = {"kernel": w}
        layers[i] = layer
    return {**params, "layers": layers}


def fuse_layer(layer: dict) -> dict:
    """One layer of `split_params` layout -> the fused layout (q, k, v and gate, up joined)."""
    layer = {k: dict(v) for k, v in layer.items()}
    for (mod, fused), parts in FUSED.items():
        kernels = [layer[mod].pop(name)["kernel"] for name in parts]
        xp = np if all(isinstance(k, np.ndarray) for k in kernels) else jnp
        layer[mod][fused] = {"kernel": xp.concatenate(kernels, axis=1)}
    return layer


def fuse_params(params: dict) -> dict:
    """Inverse of `split_params`: concatenate q, k, v and gate, up into the fused kernels."""
    return {**params, "layers": {i: fuse_layer(layer) for i, layer in params["layers"].items()}}


def fuse_layers_in_place(params: dict) -> dict:
    """`fuse_params` for a loader: each layer's parts are replaced (and freed) as soon as its
    fused kernels exist, so host memory never holds a second copy of the model."""
    layers = params["layers"]
    for i in layers:
        layers[i] = fuse_layer(layers[i])
    return params


def split_shapes(config: LlamaConfig, dtype=jnp.float32) -> dict:
    """`param_shapes` in the split (checkpoint) layout of `split_params`."""
    return jax.eval_shape(
        functools.partial(split_params, config), model.param_shapes(config, dtype)
    )
