"""Plain generation in JAX, written from scratch: the yardstick for what cfjax's machinery costs.

A textbook Llama decode of the kind a JAX user writes without cfjax (gpt-fast's shape): prefill
the prompt, then one jitted `lax.scan` over the steps on a `[B, S, KV, head_dim]` KV cache,
sampling with the Gumbel-max trick under cfjax's noise contract (step t of a row with key k adds
`jax.random.gumbel(jax.random.fold_in(k, t), (V,))` to the logits). It has none of what
counterfactuals need: no per-row starts or padding, no forced tokens, no stop tokens, no chunks,
no trace. It shares only the parameter pytree with cfjax (the fused `qkv` / `gate_up` kernels, so
both sides read the same bytes per step), not a line of the model.

`decode.py` times it beside cfjax `generate` (the price of the counterfactual engine over plain
generation), and the tests check that cfjax samples exactly its tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def _rope(x, positions, inv_freq):
    """Rotate-half RoPE of x `[B, T, heads, D]` at integer `positions` `[T]`."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _qkv(c, p, x, positions, inv_freq):
    """A block's queries `[B, T, KV, G, head_dim]` (float32) and new keys and values `[B, T, KV,
    head_dim]` from `x` `[B, T, dim]`."""
    b, t, _ = x.shape
    hd, kv = c.head_dim, c.n_kv_heads
    h = _rms_norm(x, p["attn_norm"]["scale"], c.norm_eps)
    q, k, v = jnp.split(h @ p["attn"]["qkv"]["kernel"], [c.n_heads * hd, (c.n_heads + kv) * hd], -1)
    q = _rope(q.reshape(b, t, c.n_heads, hd), positions, inv_freq)
    k = _rope(k.reshape(b, t, kv, hd), positions, inv_freq)
    return q.reshape(b, t, kv, -1, hd).astype(jnp.float32), k, v.reshape(b, t, kv, hd)


def _rest(c, p, x, q, keys, values, visible):
    """The rest of a block: attention of `q` over the layer's cache `[B, S, KV, head_dim]`,
    then the MLP; the new `x`."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(jnp.float32)) / np.sqrt(c.head_dim)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(jnp.float32))
    x = x + out.reshape(*x.shape[:2], -1).astype(x.dtype) @ p["attn"]["o"]["kernel"]
    h = _rms_norm(x, p["mlp_norm"]["scale"], c.norm_eps)
    gate, up = jnp.split(h @ p["mlp"]["gate_up"]["kernel"], 2, -1)
    return x + (jax.nn.silu(gate) * up) @ p["mlp"]["down"]["kernel"]


def stack_layers(params: dict) -> dict:
    """`params` with its layers as one pytree of `[n_layers, ...]` arrays (a copy), for the
    `lax.scan` over layers of `generate`."""
    layers = [params["layers"][i] for i in range(len(params["layers"]))]
    return {**params, "layers": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *layers)}


def _forward(config, params, tokens, cache, pos):
    """Logits f32 `[B, T, V]` of `tokens` `[B, T]` at positions pos.., and the updated cache.

    Layers unrolled: `cache` is a list of per-layer `(keys, values)` `[B, S, KV, head_dim]`.
    Layers stacked (`stack_layers`): one `(keys, values)` `[L, B, S, KV, head_dim]`, and a
    `lax.scan` over the layers writes each layer's new slots in place: a program of one block
    (what XLA compiles), reading each layer's weights and cache as slices."""
    c = config
    hd, t = c.head_dim, tokens.shape[1]
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    positions = pos + jnp.arange(t)
    slots = jax.tree_util.tree_leaves(cache)[0].shape[-3]
    visible = jnp.arange(slots)[None, :] <= positions[:, None]  # [T, S]: causal over the cache
    x = params["embed"]["embedding"][tokens]
    if isinstance(cache, tuple):

        def block(carry, layer):
            x, keys, values = carry
            p, i = layer
            q, k, v = _qkv(c, p, x, positions, inv_freq)
            keys = jax.lax.dynamic_update_slice(keys, k[None], (i, 0, pos, 0, 0))
            values = jax.lax.dynamic_update_slice(values, v[None], (i, 0, pos, 0, 0))
            return (_rest(c, p, x, q, keys[i], values[i], visible), keys, values), None

        (x, *new_cache), _ = jax.lax.scan(block, (x, *cache), (params["layers"], jnp.arange(c.n_layers)))  # fmt: skip
        new_cache = tuple(new_cache)
    else:
        new_cache = []
        for i in range(c.n_layers):
            p = params["layers"][i]
            q, k, v = _qkv(c, p, x, positions, inv_freq)
            ck, cv = (jax.lax.dynamic_update_slice(a, new, (0, pos, 0, 0)) for a, new in zip(cache[i], (k, v), strict=True))  # fmt: skip
            x = _rest(c, p, x, q, ck, cv, visible)
            new_cache.append((ck, cv))
    x = _rms_norm(x, params["final_norm"]["scale"], c.norm_eps)
    head = params["embed"]["embedding"].T if c.tie_embeddings else params["lm_head"]["kernel"]
    return (x @ head).astype(jnp.float32), new_cache


@functools.partial(jax.jit, static_argnums=(0, 4))
def generate(config, params, prompts, keys, steps: int):
    """int32 `[B, steps]` tokens sampled at temperature 1 after `prompts` `[B, P]` (no padding).

    `keys` `[B]` are the rows' typed PRNG keys; token t of row b is
    `argmax(logits + gumbel(fold_in(keys[b], t), (V,)))`. With `stack_layers(params)` each
    step is a `lax.scan` over the layers instead of the layers unrolled: the same arithmetic.
    """
    if config.rope_scaling is not None:
        raise ValueError(f"plain_scan does not implement RoPE scaling ({config.name})")
    b, p = prompts.shape
    shape = (b, p + steps, config.n_kv_heads, config.head_dim)
    dtype = params["embed"]["embedding"].dtype
    if "attn" in params["layers"]:  # stacked (`stack_layers`): one cache array per k and v
        cache = (jnp.zeros((config.n_layers, *shape), dtype),) * 2
    else:
        cache = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)]

    def sample(logits, t):
        noise = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, t), logits.shape[-1:]))
        return jnp.argmax(logits + noise(keys), axis=-1).astype(jnp.int32)

    logits, cache = _forward(config, params, prompts, cache, 0)
    first = sample(logits[:, -1], 0)

    def step(carry, t):
        token, cache = carry
        logits, cache = _forward(config, params, token[:, None], cache, p + t - 1)
        nxt = sample(logits[:, 0], t)
        return (nxt, cache), nxt

    _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, steps))
    return jnp.concatenate([first[:, None], rest.T], axis=1)
