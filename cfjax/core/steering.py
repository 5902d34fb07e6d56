"""Activation steering as data: a vector added to the residual stream after a block.

A steered model is its params with an entry `"steer": {"delta": [n_layers, dim], "prompt": []}`:
`delta[i]` is added to the residual stream after block i at every response step (the decode
steps, from the one that feeds the last prompt token), and `prompt` (0 or 1) says whether the
prompt's positions are steered too. Being data, a steering is traced like any param: `vmap` over
its scale runs one program, and a zero delta is exactly the unsteered model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

AT = ("response", "all")


def split(params: Any) -> tuple[Any, dict | None]:
    """(the params without the steering, the steering or None)."""
    if "steer" not in params:
        return params, None
    rest = {k: v for k, v in params.items() if k != "steer"}
    return rest, params["steer"]


def steer(params: dict, layer: int, vector: Any, scale: Any = 1.0, at: str = "response") -> dict:
    """`params` steered by `scale * vector` after block `layer` (added to any steering already
    there). `scale` may be traced; `layer` and `at` are Python values."""
    base, current = split(params)
    n_layers, dim = len(base["layers"]), base["final_norm"]["scale"].shape[0]
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"Steer: layer must be an int in [0, {n_layers}), got {layer!r}")
    vector = jnp.asarray(vector, jnp.float32)
    if vector.shape != (dim,):
        raise ValueError(f"Steer: the vector must have shape ({dim},), got {vector.shape}")
    if not isinstance(vector, jax.core.Tracer) and not bool(jnp.isfinite(vector).all()):
        bad = int(jnp.argmin(jnp.isfinite(vector)))
        raise ValueError(f"Steer: the vector holds {float(vector[bad])} at index {bad} (it must be finite)")  # fmt: skip
    if at not in AT:
        raise ValueError(f"Steer: at must be one of {AT}, got {at!r}")
    delta = jnp.zeros((n_layers, dim), jnp.float32).at[layer].set(scale * vector)
    prompt = jnp.float32(at == "all")
    if current is not None:
        try:
            mixed = bool(current["prompt"] != prompt)
        except jax.errors.TracerBoolConversionError:  # traced: the caller's to keep consistent
            mixed = False
        if mixed:
            raise ValueError("Steer: steerings with different `at` cannot be combined")
        delta = delta + current["delta"]
    return {**base, "steer": {"delta": delta, "prompt": prompt}}
