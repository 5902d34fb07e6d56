"""The floor under any XLA decode step: the step's weight matmuls alone.

One jitted `lax.scan` whose step multiplies a `[B, dim]` activation through every layer's kernels
(qkv, o, gate/up, down) and the LM head, in the model's order and shapes, reading the very param
buffers cfjax decodes with. Nothing else: no attention, RoPE, cache, sampling. Each matmul's
input depends on the one before, so XLA can neither skip nor batch them. A decode step at batch 1
is bound by reading these weights, so `decode.py` reports cfjax against this floor: what is left
to gain outside the matmuls, and what only faster matrix-vector products could give.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _squash(x):
    # Keeps the activation bounded (no overflow or denormals over many steps) at the cost of
    # one elementwise pass, a fraction of an RMSNorm.
    return x / (1.0 + jnp.max(jnp.abs(x), axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=(0, 3))
def run(config, params, x, steps: int):
    """`steps` steps of the matmul chain from `x` `[B, dim]`; returns the final activation."""
    c = config
    layers = [params["layers"][i] for i in range(c.n_layers)]
    head = params["embed"]["embedding"].T if c.tie_embeddings else params["lm_head"]["kernel"]
    q = c.n_heads * c.head_dim

    def step(x, _):
        for p in layers:
            qkv = _squash(x) @ p["attn"]["qkv"]["kernel"]
            x = x + qkv[:, :q] @ p["attn"]["o"]["kernel"]
            gate_up = _squash(x) @ p["mlp"]["gate_up"]["kernel"]
            x = x + gate_up[:, : c.ffn_dim] @ p["mlp"]["down"]["kernel"]
        logits = _squash(x) @ head
        return _squash(x + jnp.max(logits, axis=-1, keepdims=True)), None

    return jax.lax.scan(step, x, None, length=steps)[0]


def inputs(config, params, batch: int) -> jax.Array:
    """A `[batch, dim]` activation of the params' dtype."""
    return jnp.full((batch, config.dim), 0.01, params["embed"]["embedding"].dtype)
