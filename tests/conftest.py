"""Shared test helpers: tiny HF reference models built in the test, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(os.environ.get("CFJAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# One persistent compilation cache for the whole run: both xdist workers and the CLI's child
# processes compile the same SmolLM2 programs, and each compiles them once (a cache hit is the
# same executable, so no result changes). Kept between local runs; CI starts from a fresh clone.
XLA_CACHE = Path(__file__).parent / "artifacts" / "xla"


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def hf_llama(directory: Path, *, seed: int = 0, init_std: float = 0.2, **overrides):
    """Build a random transformers `LlamaForCausalLM` (float32), save it to `directory`.

    Weights are scaled up from HF's default init so logits are far from uniform and a layout
    bug cannot hide in near-zero activations. Returns the torch model in eval mode.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()
    with torch.no_grad():  # norms start at exactly 1: perturb them so their layout is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Reference float32 logits `[B, T, V]` from a transformers model."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The third-party data folder (`../shared/data`); skips when it is not beside the repo."""
    data = SHARED / "data"
    if not data.exists():
        pytest.skip(f"shared data folder not found at {data} (set CFJAX_SHARED)")
    return data


# Independent reference: a numpy transcription of the paper's sampler masks (sampler.py).
def ref_keep(z: np.ndarray, top_k: int | None, top_p: float | None) -> tuple[np.ndarray, float]:
    """(keep mask, distance of the nearest nucleus decision from p), paper rules in numpy.

    Ranking: z descending, ties to the lower token id (a stable argsort). top-k keeps the first
    k ranks (`probs_sort[:, k:] = 0`); top-p then drops a rank when `probs_sum - probs_sort > p`
    on the renormalised top-k distribution, computed here in float64.
    """
    z = np.asarray(z, np.float64)
    order = np.argsort(-z, kind="stable")
    zs = z[order]
    keep = np.ones(z.shape[0], bool)
    margin = np.inf
    if top_k is not None:
        keep[top_k:] = False
    if top_p is not None:
        zk = np.where(keep, zs, -np.inf)
        probs = np.exp(zk - zk[0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep &= ~(before > top_p)
        margin = float(np.min(np.abs(before[np.isfinite(zk)] - top_p)))
    out = np.zeros_like(keep)
    out[order] = keep
    return out, margin


def inlined_count(module: str, op: str) -> int:
    """How many times `op` (e.g. "stablehlo.dot_general") occurs in a StableHLO module's `main`
    once every call is inlined, as XLA does first: a function the program calls n times (a
    layer, a `jnp` helper) counts n times."""
    import re
    from functools import cache

    bodies = dict(re.findall(r"func\.func \w+ @([\w.$-]+)\((.*?)(?=\n  func\.func |\Z)", module, re.S))  # fmt: skip

    @cache
    def total(name: str) -> int:
        body = bodies[name]
        calls = re.findall(r"\bcall @([\w.$-]+)\(", body)
        return body.count(op) + sum(total(callee) for callee in calls)

    return total("main")
