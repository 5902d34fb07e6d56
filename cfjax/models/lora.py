"""`finetune`: LoRA adapters trained with optax on next-token loss, merged into the params.

For each targeted matrix `W` `[in, out]` of every layer, `W' = W + (alpha / rank) · A @ B` with
`A` `[in, rank]` random and `B` `[rank, out]` zero at the start (so the untrained fine-tune is
the base model exactly). Only the adapters are trained (AdamW); the result's `params` have the
base model's shapes and layout, for `ChangeModel(finetune.params)` or a model of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import fusion, model
from cfjax.core.checks import as_key, count, real
from cfjax.runtime.lm import LM
from cfjax.runtime.request import prompt_tokens

# Target name -> (module, matrix) in the split (checkpoint) layout of `fusion.split_params`.
TARGETS = {
    "q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
    "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down"),
}  # fmt: skip


@dataclasses.dataclass
class FineTune:
    """A trained fine-tune: merged `params`, the `adapters` (`{layer: {target: {"a", "b"}}}`),
    the loss of every step and what it was made with."""

    params: dict
    adapters: dict
    losses: list[float]
    rank: int
    alpha: float
    targets: tuple[str, ...]


def merge(config, base: dict, adapters: dict, scale: float) -> dict:
    """Base params (fused layout) with `scale · A @ B` added to each adapted matrix."""
    split = fusion.split_params(config, base)
    layers = {}
    for i, layer in split["layers"].items():
        layer = {k: dict(v) for k, v in layer.items()}
        for target, ab in adapters.get(i, {}).items():
            mod, name = TARGETS[target]
            w = layer[mod][name]["kernel"]
            delta = scale * (ab["a"] @ ab["b"])
            layer[mod][name] = {"kernel": (w.astype(jnp.float32) + delta).astype(w.dtype)}
        layers[i] = layer
    return fusion.fuse_params({**split, "layers": layers})


def init_adapters(config, base: dict, rank: int, targets: Sequence[str], key) -> dict:
    """A ~ N(0, 1/in) (LoRA's scale), B = 0, for every layer and target."""
    split = fusion.split_params(config, base)
    adapters = {}
    for n, (i, layer) in enumerate(split["layers"].items()):
        adapters[i] = {}
        for t_i, target in enumerate(targets):
            mod, name = TARGETS[target]
            d_in, d_out = layer[mod][name]["kernel"].shape
            k = jax.random.fold_in(jax.random.fold_in(key, n), t_i)
            a = jax.random.normal(k, (d_in, rank), jnp.float32) / np.sqrt(d_in)
            adapters[i][target] = {"a": a, "b": jnp.zeros((rank, d_out), jnp.float32)}
    return adapters


def _batches(lm: LM, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts as right-padded tokens `[N, L]` and a mask of the predicted positions."""
    rows = [prompt_tokens(lm, t, chat=False) for t in texts]
    short = [i for i, r in enumerate(rows) if len(r) < 2]
    if short:
        raise ValueError(f"finetune: text {short[0]} has fewer than 2 tokens; nothing to predict")
    width = max(len(r) for r in rows)
    if width > lm.config.max_seq_len:
        raise ValueError(f"finetune: a text of {width} tokens exceeds max_seq_len")
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
        mask[b, : len(r) - 1] = 1.0
    return tokens, mask


def finetune(
    lm: LM,
    texts: Sequence[str],
    *,
    rank: int = 8,
    targets: Sequence[str] = ("q", "v"),
    steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    alpha: float | None = None,
    key: Any = 0,
    progress: bool | None = None,
) -> FineTune:
    """Train LoRA adapters on `texts` (plain text, next-token loss) with AdamW.

    `alpha` defaults to `rank` (scale 1). Each step draws `batch_size` texts at random (with
    replacement, from `key`); a progress bar shows the loss.
    """
    import optax
    from tqdm import tqdm

    if isinstance(texts, str) or not texts:
        raise ValueError("finetune: give a non-empty list of texts")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"finetune: unknown targets {bad}; valid: {', '.join(TARGETS)}")
    rank, steps, batch_size = count(rank, "rank"), count(steps, "steps"), count(batch_size, "batch_size")  # fmt: skip
    learning_rate = real(learning_rate, "learning_rate", positive=True)
    alpha = real(rank if alpha is None else alpha, "alpha", positive=True)
    scale = alpha / rank
    config, base = lm.config, lm.params
    tokens, mask = _batches(lm, texts)
    key = as_key(key)
    adapters = init_adapters(config, base, rank, tuple(targets), jax.random.fold_in(key, 0))
    optimizer = optax.adamw(learning_rate)

    # The base params are an argument, not a closed-over constant of the compiled programs.
    def loss_fn(adapters, base, tokens, mask):
        logits = model.apply(config, merge(config, base, adapters, scale), tokens[:, :-1])[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    @jax.jit
    def step(adapters, opt_state, base, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state = optimizer.init(adapters)
    losses = []
    bar = tqdm(range(steps), desc="finetune", unit="step", disable=progress is False)
    for s in bar:
        rows = jax.random.randint(jax.random.fold_in(key, s + 1), (batch_size,), 0, len(tokens))
        rows = np.asarray(rows)
        adapters, opt_state, loss = step(adapters, opt_state, base, tokens[rows], mask[rows])
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    params = jax.jit(lambda a, b: merge(config, b, a, scale))(adapters, base)
    return FineTune(params, adapters, losses, rank, alpha, tuple(targets))
