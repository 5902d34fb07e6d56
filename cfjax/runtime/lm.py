"""`LM`: a loaded model (config + params pytree + tokenizer) and the plain causal forward."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from cfjax.core import model, quant
from cfjax.core.checks import check_tokens
from cfjax.core.config import LlamaConfig
from cfjax.core.spec import mesh_of
from cfjax.runtime.store import ArrayStore, CacheStore


@dataclasses.dataclass(frozen=True)
class LM:
    """A model ready to run: `params` is a plain pytree usable with jit, vmap, grad and orbax.

    `caches` keeps the final KV caches of recent runs (bounded, see `CacheStore`) and
    `observations` the scored logits of observed text (abduction, see `ArrayStore`); copies
    made with `replace` share both, and their entries are keyed by the params that made them.
    `pad_batch`: run a batch of more than 16 rows as one of fewer sizes (`driver.padded_rows`:
    18, 20, ..., 32, 36, 40, ...), so that a study of many batch sizes compiles fewer programs; the
    same tokens, as the engine is batch-invariant (with `batch_invariant=False` every batch
    runs at its own size). `replace(pad_batch=False)` runs each size as it is.
    """

    config: LlamaConfig
    params: dict
    tokenizer: Any = None
    model_id: str = ""
    caches: CacheStore = dataclasses.field(default_factory=CacheStore, repr=False, compare=False)
    observations: ArrayStore = dataclasses.field(
        default_factory=ArrayStore, repr=False, compare=False
    )
    pad_batch: bool = True

    def __post_init__(self):
        if not isinstance(self.pad_batch, bool):
            raise TypeError(f"pad_batch must be True or False, got {self.pad_batch!r:.40}")

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype the model computes in (its float params' dtype, also when quantized)."""
        return model.compute_dtype(self.params)

    def replace(self, **changes: Any) -> LM:
        """A copy with some fields changed (e.g. other params: a fine-tune or a weight edit).

        `batch_invariant=False` computes the network with XLA's own sums and matmuls: faster,
        but a row's rounding may then depend on its batch (see `cfjax.core.invariant`).
        `model_blocks=n` computes each weight matmul in n fixed blocks, so that a
        model-parallel mesh whose model axis divides n gives one device's bits (on such a mesh
        the blocks need params placed by their rules: `cfjax.load(..., model_blocks=n)`).
        Either way the copy gets stores of its own, so no cache crosses between two ways of
        computing."""
        modes = {k: changes.pop(k) for k in ("batch_invariant", "model_blocks") if k in changes}
        if modes:
            changes["config"] = changes.get("config", self.config).replace(**modes)
        config = changes.get("config", self.config)
        if (config.batch_invariant, config.model_blocks) != (self.config.batch_invariant, self.config.model_blocks):  # fmt: skip
            changes.setdefault("caches", CacheStore())
            changes.setdefault("observations", ArrayStore())
        if config.model_blocks != self.config.model_blocks and "params" not in changes:
            mesh = mesh_of(self.params)
            if mesh is not None and mesh.shape["model"] > 1:
                raise ValueError(
                    "model_blocks changes how a model-parallel mesh splits the params: load "
                    "with cfjax.load(..., mesh=mesh, model_blocks=n), or give params placed for "
                    "the new config (cfjax.sharding.shard_params)"
                )
        return dataclasses.replace(self, **changes)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: LlamaConfig, params: dict, tokens: jax.Array) -> jax.Array:
    return model.apply(config, params, tokens)[0]


def forward(lm: LM, tokens: Any) -> jax.Array:
    """Full causal forward without a cache: int32 `[B, T]` -> float32 logits `[B, T, V]`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time], got {tokens.shape}")
    check_tokens(tokens, lm.config.vocab_size)
    if tokens.shape[1] > lm.config.max_seq_len:
        raise ValueError(
            f"sequence of {tokens.shape[1]} tokens is longer than the model's max_seq_len "
            f"{lm.config.max_seq_len}"
        )
    return _forward(lm.config, lm.params, tokens)


def quantize(lm: LM, kind: str) -> LM:
    """The `kind` variant of `lm`: "int8" (weight-only, per-channel scales, see `quant`) or
    "bfloat16". A model of its own (its id gets `@int8` / `@bfloat16`) that runs through the
    same decode step, and usable as `ChangeModel(variant.params)` of `lm`."""
    if kind not in quant.KINDS:
        raise ValueError(f"unknown quantization {kind!r}; valid: {', '.join(quant.KINDS)}")
    # A fresh LM: the stored caches and observations belong to other params.
    return LM(lm.config, quant.quantize_params(lm.params, kind), lm.tokenizer,
              f"{lm.model_id}@{kind}", pad_batch=lm.pad_batch)  # fmt: skip
