"""The Llama network in Flax NNX, and a functional core over a plain parameter pytree.

Layout choices (every weight loader converts to these):
- Linear kernels are `[in, out]` (the transpose of PyTorch's `weight`).
- q, k and v live in one kernel `attn/qkv` `[dim, (n_heads + 2 n_kv_heads) head_dim]` and gate and
  up in one `mlp/gate_up` `[dim, 2 ffn_dim]`, columns in that order: a decode step is bound by
  reading weights, and one wide matmul streams them faster than three narrow ones (~25% on the
  CPU) with fewer kernels. `split_params` gives the per-matrix view (q, k, v, gate, up) that
  checkpoints use, and `fuse_params` takes it back, e.g. to edit one matrix.
- q/k projections use the rotate-half RoPE layout of HF transformers: within each head the
  first half of the features pairs with the second half. Meta and GGUF checkpoints (interleaved
  pairs) are permuted on load.

Numerics (DESIGN.md §2): RMSNorm statistics, RoPE angles, attention logits and softmax, and the
LM head output are float32 whatever the parameter dtype, so factual and counterfactual runs
round identically.

Sequences are left-padded: `start[b]` is the slot of row b's first real token; slots before it
are invisible to every query and positions count from it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfjax.core import invariant, quant, spec, steering, trace_mode
from cfjax.core.attention import NEG, cached_attention, causal_attention
from cfjax.core.cache import KEY_SLOT_AXIS, VALUE_SLOT_AXIS, KVCache, write
from cfjax.core.config import LlamaConfig


def _pure(state) -> dict:
    return nnx.to_pure_dict(state)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum` with a float32 result, from operands of any float dtype (`invariant.f32_dot`)."""
    dot = lambda a, b, out: jnp.einsum(spec, a, b, preferred_element_type=out)  # noqa: E731
    return invariant.f32_dot(dot, a, b)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim / 2]` in float32, with Llama 3.1 scaling if configured."""
    hd = config.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band in between
    # interpolated smoothly (Meta's `apply_scaling`, transformers' `_compute_llama3_parameters`).
    old = s.original_max_position_embeddings
    low_wavelen = old / s.low_freq_factor
    high_wavelen = old / s.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def positions(slots: jax.Array, start: jax.Array) -> jax.Array:
    """Position of each (broadcast) slot in its row: counted from the row's `start`, 0 on pads."""
    return jnp.maximum(slots - start, 0)


def rotation(token_positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """RoPE's `(cos, sin)` `[..., 1, D/2]` for `token_positions` `[...]`, from float32 angles.

    Computed once per forward and shared by every layer. A decode loop computes them for all
    its steps before the loop (`apply(..., cos_sin=)`): inside a step, XLA fuses the sines and
    cosines into every layer's consumers and evaluates them once per element (at batch 64, ~3%
    of a decode step).
    """
    angles = token_positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., D/2]
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def apply_rope(x: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate `x` `[B, T, H, D]` by `rotation(...)` (rotate-half layout), in float32."""
    cos, sin = cos_sin
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    r = invariant.rounded  # no fused multiply-adds, whose use varies with the program
    out = jnp.concatenate([r(x1 * cos) - r(x2 * sin), r(x2 * cos) + r(x1 * sin)], axis=-1)
    return invariant.round_to(out, x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with float32 statistics."""

    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        # The mean square in a fixed order of additions: the same bits in any batch.
        squares = invariant.rounded(x32 * x32)
        mean_square = invariant.tree_sum(squares, -1)[..., None] * np.float32(1 / x.shape[-1])
        normed = x32 * jax.lax.rsqrt(mean_square + self.eps)
        scaled = invariant.round_to(normed, x.dtype).astype(jnp.float32) * self.scale[...].astype(jnp.float32)  # fmt: skip
        return invariant.round_to(scaled, x.dtype)


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, init=None) -> nnx.Linear:
    kernel_init = {} if init is None else {"kernel_init": init}
    return nnx.Linear(d_in, d_out, use_bias=False, param_dtype=dtype, dtype=dtype, rngs=rngs, **kernel_init)  # fmt: skip


def _shape_of(key, shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """An initializer that makes no array: the param's shape and dtype (for `graphdef`)."""
    return jax.ShapeDtypeStruct(shape, dtype)


class Attention(nnx.Module):
    """Grouped-query attention (MHA when n_kv_heads == n_heads, MQA when it is 1)."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs, init=None):
        c = config
        self.config = c
        # q, k and v in one kernel: one matmul reads x once and streams one contiguous weight.
        self.qkv = _linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, dtype, rngs, init)
        self.o = _linear(c.n_heads * c.head_dim, c.dim, dtype, rngs, init)

    def __call__(self, x, cos_sin, visible, layer_k, layer_v, index):
        """Attend from `x` `[B * T, dim]`, the rows of `visible` `[B, T, S]`; returns (output
        `[B * T, dim]`, updated layer k, updated layer v).

        With a cache (the prefill, the decode step, a speculative scoring pass) every sum is
        batch-invariant (`invariant`); without one (training, scoring whole texts) plain XLA.
        """
        c = self.config
        b, t = visible.shape[:2]
        cached = layer_k is not None
        qkv = linear(x, self.qkv.kernel[...], cached)
        qkv = qkv.reshape(b, t, c.n_heads + 2 * c.n_kv_heads, c.head_dim)
        q, k, v = jnp.split(qkv, [c.n_heads, c.n_heads + c.n_kv_heads], axis=2)
        q = apply_rope(q, cos_sin)
        k = apply_rope(k, cos_sin)
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # as cached: [B,KV,D,T], [B,KV,T,D]
        q = q.reshape(b, t, c.n_kv_heads, c.q_per_kv, c.head_dim)
        scale = np.float32(1 / np.sqrt(c.head_dim))
        if cached:
            layer_k = write(layer_k, k, index, KEY_SLOT_AXIS)
            layer_v = write(layer_v, v, index, VALUE_SLOT_AXIS)
            mask, q = visible[:, None, None], q.transpose(0, 2, 3, 1, 4)  # [B, 1, 1, T, S]
            if isinstance(index, int):  # a prefill: only slots before index + T can be visible
                out = causal_attention(q, layer_k, layer_v, mask, scale, index)
            else:
                out = cached_attention(q, layer_k, layer_v, mask, scale)
            out = invariant.round_to(out.transpose(0, 3, 1, 2, 4), x.dtype)  # [B, T, KV, G, D]
        else:
            scores = einsum_f32("btkgd,bkds->bkgts", q, k.astype(q.dtype)) * scale
            scores = jnp.where(visible[:, None, None, :, :], scores, NEG)
            probs = jax.nn.softmax(scores, axis=-1)
            out = einsum_f32("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
            out = invariant.round_to(out, x.dtype)
        out = out.reshape(b * t, c.n_heads * c.head_dim)
        return linear(out, self.o.kernel[...], cached), layer_k, layer_v


def linear(x: jax.Array, kernel: jax.Array, cached: bool) -> jax.Array:
    """`x @ kernel`: batch-invariant (`invariant.dense`) on the cached paths; a plain dot
    without a cache (differentiable, for training)."""
    return invariant.dense(x, kernel) if cached else invariant.matmul(x, kernel)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs, init=None):
        # gate and up in one kernel `[dim, 2 * ffn_dim]` (gate first), for one matmul.
        self.gate_up = _linear(config.dim, 2 * config.ffn_dim, dtype, rngs, init)
        self.down = _linear(config.ffn_dim, config.dim, dtype, rngs, init)

    def __call__(self, x: jax.Array, cached: bool) -> jax.Array:
        gate, up = jnp.split(linear(x, self.gate_up.kernel[...], cached), 2, axis=-1)
        return linear(swiglu(gate, up), self.down.kernel[...], cached)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up` with the roundings of its ops in the dtype of `gate` written out
    (`invariant.round_to`): sigmoid, times gate, times up."""
    f32, dtype = jnp.float32, gate.dtype
    g = gate.astype(f32)
    sigmoid = invariant.round_to(jax.nn.sigmoid(g), dtype).astype(f32)
    silu = invariant.round_to(g * sigmoid, dtype).astype(f32)
    return invariant.round_to(silu * up.astype(f32), dtype)


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs, init=None):
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.attn = Attention(config, dtype, rngs, init)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs, init)

    def __call__(self, x, cos_sin, visible, layer_k, layer_v, index):
        h, layer_k, layer_v = self.attn(
            self.attn_norm(x), cos_sin, visible, layer_k, layer_v, index
        )
        x = invariant.add(x, h)
        return invariant.add(x, self.mlp(self.mlp_norm(x), layer_k is not None)), layer_k, layer_v


def _block(block: Block, x, cos_sin, visible, layer_k, layer_v, index):
    """`block(...)` as a call of one jitted function, which every layer of a network shares:
    traced and lowered once per forward, not once per layer (the layers' programs are one
    function, which XLA inlines into each call: the same program to compile and run)."""
    graph, state = nnx.split(block)
    static = index if isinstance(index, int) else None
    index = None if static is not None else index
    return _traced_block(graph, trace_mode.mode(), static, state, x, cos_sin, visible, layer_k, layer_v, index)  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _traced_block(graph, mode, static_index, state, x, cos_sin, visible, layer_k, layer_v, index):  # fmt: skip
    with trace_mode.traced_under(mode):
        block = nnx.merge(graph, state)
        return block(x, cos_sin, visible, layer_k, layer_v, index if static_index is None else static_index)  # fmt: skip


class Llama(nnx.Module):
    """Decoder-only Llama network."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, init=None):
        """`init`: the initializer of every matrix (default: flax's)."""
        self.config = config
        embedding_init = {} if init is None else {"embedding_init": init}
        self.embed = nnx.Embed(config.vocab_size, config.dim, param_dtype=dtype, rngs=rngs, **embedding_init)  # fmt: skip
        self.layers = nnx.List([Block(config, dtype, rngs, init) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.dim, config.norm_eps, dtype)
        if not config.tie_embeddings:
            self.lm_head = _linear(config.dim, config.vocab_size, dtype, rngs, init)

    def __call__(
        self,
        tokens: jax.Array,
        start: jax.Array,
        cache: KVCache | None = None,
        index: jax.Array | int = 0,
        cos_sin: tuple[jax.Array, jax.Array] | None = None,
        steer: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits `[B, T, V]` float32 for `tokens` written at slots `[index, index + T)` (`index`
        a scalar, or `[B]`: each row's own first slot).

        `cos_sin`, if given, is `rotation(positions of these tokens)`, computed by the caller.
        `steer` `[n_layers, dim]`, if given, is added to the residual stream after each block.
        """
        x, cos_sin, visible = self._inputs(tokens, start, cache, index, cos_sin)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            lk = None if cache is None else cache.k[i]
            lv = None if cache is None else cache.v[i]
            x, lk, lv = _block(layer, x, cos_sin, visible, lk, lv, index)
            if steer is not None:
                x = invariant.add(x, steer[i].astype(x.dtype))
            new_k.append(lk)
            new_v.append(lv)
        x = self.final_norm(x)
        # Contract against the embedding's feature axis directly (no transposed copy of [V, D]).
        if self.config.tie_embeddings:
            head, contract = self.embed.embedding[...], 1
        else:
            head, contract = self.lm_head.kernel[...], 0
        head = head.astype(x.dtype)
        if cache is None:
            logits = invariant.matmul(x, head, contract, wide=True)
        else:
            logits = invariant.dense(x, head, contract, wide=True)
        logits = logits.reshape(*tokens.shape, -1)
        return logits, (None if cache is None else KVCache(new_k, new_v))

    def residual(self, tokens: jax.Array, start: jax.Array, layer: int) -> jax.Array:
        """The residual stream `[B, T, dim]` (float32) after block `layer`, without a cache."""
        x, cos_sin, visible = self._inputs(tokens, start, None, 0, None)
        for block in self.layers[: layer + 1]:
            x = _block(block, x, cos_sin, visible, None, None, 0)[0]
        return x.reshape(*tokens.shape, -1).astype(jnp.float32)

    def _inputs(self, tokens, start, cache, index, cos_sin):
        """(embedded tokens as the residual stream's `[B * T, dim]` rows, RoPE rotation, the
        visibility mask [B, T, S]) of a forward. The stream stays in the rows every matmul
        takes: a reshape in it was moved down the stream a few ops per round by XLA's
        simplifier, which through all the layers never settled (its 25-round limit: ~1.5x the
        compile time)."""
        b, t = tokens.shape
        # The slots written: from one `index` for every row, or (a `[B]` index) from each row's own.
        first = jnp.asarray(index, jnp.int32)[..., None]
        slots = jnp.broadcast_to(first + jnp.arange(t, dtype=jnp.int32), (b, t))
        token_positions = positions(slots, start[:, None])  # [B, T]
        # Queries see slots up to their own. With a static `index` (the prefill writes at 0) the
        # slots past `index + T` are known to be invisible, so attention skips them: the prefill
        # attends over its T tokens, not over the whole cache (SmolLM2, batch 64, a 64-slot
        # prompt bucket and 256 new tokens: prefill 7.7 -> 6.5 s).
        if cache is None:
            n_keys = t
        else:
            n_keys = index + t if isinstance(index, int) else cache.length
        key_slots = jnp.arange(n_keys, dtype=jnp.int32)
        visible = (key_slots[None, None, :] <= slots[:, :, None]) & (
            key_slots[None, None, :] >= start[:, None, None]
        )  # [B, T, S]
        if cos_sin is None:
            cos_sin = rotation(token_positions, rope_frequencies(self.config))
        return self.embed(tokens.reshape(-1)), cos_sin, visible


@functools.lru_cache(maxsize=32)
def graphdef(config: LlamaConfig, dtype_name: str = "float32"):
    """The static NNX graph of a model, derived from its config alone: its matrices made as
    shapes only, not traced (`nnx.eval_shape` took ~0.45 s per model, on every process's first
    trace: flax asks each traced param for its sharding, whose error message JAX builds by
    walking the whole trace)."""
    model = Llama(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0), init=_shape_of)
    return nnx.split(model)[0]


def param_shapes(config: LlamaConfig, dtype=jnp.float32) -> dict:
    """Pytree of `jax.ShapeDtypeStruct` with the exact structure of a model's params (from the
    leaf descriptions of `spec`, which the network's own structure is tested against)."""
    return spec.shapes(spec.param_spec(config, dtype))


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 1.0) -> dict:
    """Random params (normal init times `scale`; norm scales near 1) as a plain pytree."""
    model = Llama(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(key))
    params = _pure(nnx.state(model, nnx.Param))
    if scale != 1.0:
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x if "scale" in str(p[-1]) else (x * scale).astype(x.dtype), params
        )
    return params


def compute_dtype(params: dict) -> jnp.dtype:
    """The dtype the network computes (and caches keys and values) in: the params' float dtype,
    which the norm scales keep when the matrices are quantized."""
    return params["final_norm"]["scale"].dtype


def apply(
    config: LlamaConfig,
    params: dict,
    tokens: jax.Array,
    start: jax.Array | None = None,
    cache: KVCache | None = None,
    index: jax.Array | int = 0,
    cos_sin: tuple[jax.Array, jax.Array] | None = None,
    prompt: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Functional forward: `(logits [B, T, V] f32, updated cache)` from a params pytree.

    `cos_sin`: `rotation(positions)` of the tokens, if the caller has it (see `rotation`).
    `prompt`: these are prompt tokens (the prefill), which a steering of the response skips
    (see `steering`). Quantized params (see `quant`) are dequantized here.
    """
    if start is None:
        start = jnp.zeros((tokens.shape[0],), jnp.int32)
    model, steer = _network(config, params)
    if steer is not None:
        steer = steer["delta"] * steer["prompt"] if prompt else steer["delta"]
    with invariant.batch_invariance(config.batch_invariant, config.model_blocks, prompt):
        return model(tokens, start, cache, index, cos_sin, steer)


def _network(config: LlamaConfig, params) -> tuple[Llama, dict | None]:
    """The NNX network of float params (quantized ones widened) and the steering, if any."""
    params, steer = steering.split(params)
    params = quant.dequantize(params)
    gdef = graphdef(config, str(compute_dtype(params)))
    state = nnx.State(params) if not isinstance(params, nnx.State) else params
    return nnx.merge(gdef, state), steer


def residual(config: LlamaConfig, params: dict, tokens: jax.Array, layer: int) -> jax.Array:
    """The residual stream `[B, T, dim]` (float32) after block `layer` of a causal forward of
    `tokens` (no cache, no padding), as a steering vector is added to it."""
    model, _ = _network(config, params)
    start = jnp.zeros((tokens.shape[0],), jnp.int32)
    with invariant.batch_invariance(config.batch_invariant, config.model_blocks):
        return model.residual(tokens, start, layer)
