"""Quantized variants of a model's params: weight-only int8 with per-channel scales.

A quantized matrix is stored as `{"kernel": int8 [in, out], "qscale": f32 [1, out]}` (the tied
embedding as `{"embedding": int8 [V, D], "qscale": f32 [V, 1]}`: one scale per token, which is an
output channel of the LM head): `w ≈ kernel * qscale`, with `qscale = max |w| / 127` over the
channel and the kernel rounded to nearest. Norm scales stay in the source dtype, which is the
dtype the network computes in. `model.apply` dequantizes on entry, so a quantized model runs
through the same decode step as every other (under jit the int8 arrays are what is stored and
passed; the widening is part of the compiled program).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import invariant

KINDS = ("int8", "bfloat16")
_QMAX = 127.0
_WEIGHTS = {"kernel": 0, "embedding": 1}  # leaf name -> the axis the scale is shared along


def _is_quantized_leaf(d: Any) -> bool:
    return isinstance(d, dict) and "qscale" in d


def is_quantized(params: dict) -> bool:
    """Whether any matrix of `params` is stored as int8."""

    def any_quantized(d: Any) -> bool:
        return isinstance(d, dict) and ("qscale" in d or any(map(any_quantized, d.values())))

    return any_quantized(params)


def quantize_int8(params: dict) -> dict:
    """Every matrix (attention, MLP, embedding, LM head) to int8 with per-channel scales."""

    def walk(d: dict) -> dict:
        out = {}
        for name, v in d.items():
            if isinstance(v, dict):
                out[name] = walk(v)
            elif name in _WEIGHTS and v.ndim == 2:
                axis = _WEIGHTS[name]
                w = jnp.asarray(v, jnp.float32)
                scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / _QMAX
                scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
                out[name] = jnp.clip(jnp.round(w / scale), -_QMAX, _QMAX).astype(jnp.int8)
                out["qscale"] = scale
            else:
                out[name] = v
        return out

    if is_quantized(params):
        raise ValueError("the params are already quantized")
    return walk(params)


def dequantize(params: dict, dtype: Any = None) -> dict:
    """Float params from quantized ones (unchanged if not quantized), in `dtype` (default: the
    dtype of the norm scales, i.e. the source's)."""
    if not is_quantized(params):
        return params
    dtype = dtype or params["final_norm"]["scale"].dtype

    def walk(d: dict) -> dict:
        if _is_quantized_leaf(d):
            name = next(n for n in _WEIGHTS if n in d)
            w = d[name].astype(jnp.float32) * d["qscale"]
            return {k: v for k, v in d.items() if k not in (name, "qscale")} | {
                name: invariant.round_to(w, dtype)  # kept rounded where a dot widens it again
            }
        return {k: walk(v) if isinstance(v, dict) else v for k, v in d.items()}

    return walk(params)


def to_dtype(params: dict, dtype: Any) -> dict:
    """Every float leaf cast to `dtype` (e.g. a bfloat16 variant)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def quantize_params(params: dict, kind: str) -> dict:
    """`params` as the variant `kind` ("int8" or "bfloat16")."""
    if kind == "int8":
        return quantize_int8(params)
    if kind == "bfloat16":
        return to_dtype(dequantize(params), jnp.bfloat16)
    raise ValueError(f"unknown quantization {kind!r}; valid: {', '.join(KINDS)}")


def param_bytes(params: dict) -> int:
    """Bytes the params occupy."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
