"""`steering_vector`: a steering direction from contrasting texts (activation addition)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.core import model
from cfjax.runtime.lm import LM
from cfjax.runtime.request import padded, prompt_tokens


@functools.partial(jax.jit, static_argnums=(0, 3))
def _residual(config, params, tokens, layer):
    return model.residual(config, params, tokens, layer)


def _mean_activation(lm: LM, texts: Sequence[str], layer: int, chat: bool) -> np.ndarray:
    if isinstance(texts, str) or not texts:
        raise ValueError("steering_vector: give a non-empty list of texts on each side")
    means = []
    for text in texts:
        tokens = prompt_tokens(lm, text, chat=chat)
        # Right-padded to a power of two (causal: padding changes no earlier position), so
        # texts of similar lengths share a compilation.
        x = _residual(lm.config, lm.params, jnp.asarray(padded([tokens])[0]), layer)
        means.append(np.asarray(x[0, : len(tokens)], np.float64).mean(axis=0))
    return np.mean(means, axis=0)


def steering_vector(
    lm: LM, positive: Sequence[str], negative: Sequence[str], layer: int, *, chat: bool = False
) -> np.ndarray:
    """Mean residual activation after block `layer` over the `positive` texts minus that over
    the `negative` ones (`[dim]` float32), for `Steer(layer, vector)`.

    Each text counts once: its activations are averaged over its tokens, then over the texts
    (as in activation addition; with one-token-apart pairs this is contrastive activation
    addition's difference at the differing position, diluted by the shared ones). Texts are
    encoded as plain text (`chat=True`: through the chat template, as user messages).
    """
    n_layers = lm.config.n_layers
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"steering_vector: layer must be an int in [0, {n_layers}), got {layer!r}")
    pos = _mean_activation(lm, positive, layer, chat)
    neg = _mean_activation(lm, negative, layer, chat)
    return (pos - neg).astype(np.float32)
