"""Model configuration: a frozen, hashable description of a Llama-architecture network.

A `LlamaConfig` is a static argument of every jitted function, so it must be hashable and
must not hold arrays. It is built from a preset name, an HF `config.json` (both the
`rope_theta` + `rope_scaling` spelling of real Llama 3.1 checkpoints and transformers 5's
`rope_parameters`), or Meta's `params.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 `llama3` frequency scaling of the rotary embedding."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _is_np_int(value: Any) -> bool:
    return (
        type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu"
    )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-architecture model."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    name: str = "llama"
    # How the network is computed, not what it is: batch-invariant sums and matmul tiles (a
    # row's bits never depend on its batch; the default), or XLA's own, faster ops
    # (`cfjax.core.invariant`). Static, so each mode compiles its own programs; not written to
    # checkpoints (`to_dict`).
    batch_invariant: bool = True
    # Each weight matmul of the batch-invariant engine as this many fixed blocks along the axis a
    # model-parallel mesh splits (`invariant.blocked_matmul`): a mesh whose model axis divides it
    # gives one device's bits. 1: one dot per matmul tile, the fastest. Not written either.
    model_blocks: int = 1

    def __post_init__(self) -> None:
        # Types and ranges first (a config read from a file may hold anything): every size an
        # integer >= 1, the constants finite and positive.
        sizes = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        for field in (*sizes, *(("head_dim",) if self.head_dim is not None else ())):
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                and not _is_np_int(value)
                or value < 1
            ):
                raise ValueError(f"config {self.name}: {field} must be an integer >= 1, got {value!r}")  # fmt: skip
            object.__setattr__(self, field, int(value))
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"config {self.name}: batch_invariant must be true or false, got {self.batch_invariant!r}")  # fmt: skip
        for field in ("norm_eps", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:  # fmt: skip
                raise ValueError(f"config {self.name}: {field} must be a finite number > 0, got {value!r}")  # fmt: skip
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"config {self.name}: dim {self.dim} is not divisible by n_heads "
                    f"{self.n_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"config {self.name}: n_heads {self.n_heads} is not a multiple of n_kv_heads "
                f"{self.n_kv_heads} (grouped-query attention shares each KV head among "
                "n_heads / n_kv_heads query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"config {self.name}: head_dim {self.head_dim} must be even for RoPE")
        self._check_model_blocks()

    def _check_model_blocks(self) -> None:
        """`model_blocks` an integer >= 1 that divides every axis it cuts: the contractions of
        the matmuls (dim, the attention features, ffn_dim) and a tied head's vocabulary."""
        b = self.model_blocks
        if isinstance(b, bool) or not (isinstance(b, int) or _is_np_int(b)) or b < 1:
            raise ValueError(f"config {self.name}: model_blocks must be an integer >= 1, got {b!r}")  # fmt: skip
        object.__setattr__(self, "model_blocks", int(b))
        cut = [("dim", self.dim), ("attention features (n_heads x head_dim)", self.n_heads * self.head_dim),
               ("ffn_dim", self.ffn_dim)]  # fmt: skip
        if self.tie_embeddings:  # a tied head is cut along the vocabulary
            cut.append(("vocab_size", self.vocab_size))
        for what, n in cut:
            if n % b:
                raise ValueError(f"config {self.name}: model_blocks {b} does not divide the {n} {what}")  # fmt: skip

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (1 = MHA, n_heads = MQA)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (inverse of `from_dict`) of the model's shapes and constants
        (not `batch_invariant` nor `model_blocks`, execution choices)."""
        d = dataclasses.asdict(self)
        del d["batch_invariant"], d["model_blocks"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Inverse of `to_dict`."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict | str | Path, name: str | None = None) -> LlamaConfig:
        """Build from an HF `config.json` (dict or path), either rope spelling."""
        if not isinstance(hf, dict):
            path = Path(hf)
            if path.is_dir():
                path = path / "config.json"
            hf = json.loads(path.read_text())
        model_type = hf.get("model_type", "llama")
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if model_type != "llama" or not any("Llama" in a for a in archs):
            raise ValueError(
                f"not a Llama-architecture config: model_type={model_type!r}, "
                f"architectures={archs!r} (cfjax supports LlamaForCausalLM only)"
            )
        # transformers >= 5 nests theta and scaling in `rope_parameters`; real 3.1 checkpoints
        # have top-level `rope_theta` and `rope_scaling`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            name=name or hf.get("_name_or_path") or "llama",
        )

    @classmethod
    def from_meta(
        cls, params: dict | str | Path, vocab_size: int | None = None, name: str = "llama"
    ) -> LlamaConfig:
        """Build from Meta's `params.json` (dict or path); `vocab_size` fills a -1 entry."""
        if not isinstance(params, dict):
            path = Path(params)
            if path.is_dir():
                path = path / "params.json"
            params = json.loads(path.read_text())
        dim = params["dim"]
        # Meta's FeedForward: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`.
        hidden = int(2 * (4 * dim) / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = params.get("multiple_of", 256)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab < 1:
            if vocab_size is None:
                raise ValueError(
                    "params.json has no vocab_size; pass vocab_size= (from the tokenizer)"
                )
            vocab = vocab_size
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
        theta = float(params.get("rope_theta", 10000.0))
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            ffn_dim=hidden,
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=params.get(
                "max_seq_len", 131072 if scaling else 8192 if theta > 1e4 else 4096
            ),
            name=name,
        )


_LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    ffn_dim=14336,
    rope_theta=500000.0,
    max_seq_len=8192,
    name="llama3-8b",
)

PRESETS: dict[str, LlamaConfig] = {
    "llama3-8b": _LLAMA3_8B,
    "llama3.1-8b": _LLAMA3_8B.replace(
        rope_scaling=RopeScaling(), max_seq_len=131072, name="llama3.1-8b"
    ),
    "llama3.2-1b": _LLAMA3_8B.replace(
        dim=2048,
        n_layers=16,
        ffn_dim=8192,
        rope_scaling=RopeScaling(factor=32.0),
        max_seq_len=131072,
        tie_embeddings=True,
        name="llama3.2-1b",
    ),
    "llama3.2-3b": _LLAMA3_8B.replace(
        dim=3072,
        n_layers=28,
        n_heads=24,
        ffn_dim=8192,
        rope_scaling=RopeScaling(factor=32.0),
        max_seq_len=131072,
        tie_embeddings=True,
        name="llama3.2-3b",
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        ffn_dim=11008,
        rope_theta=10000.0,
        max_seq_len=4096,
        name="llama2-7b",
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
        name="smollm2-135m",
    ),
    # Small enough to compile and run in milliseconds on a CPU; GQA so every code path is used.
    "tiny": LlamaConfig(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        rope_theta=10000.0,
        max_seq_len=1024,
        name="tiny",
    ),
}


def preset(name: str) -> LlamaConfig:
    """A named preset configuration."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
