"""`Trace`: everything needed to replay a generation's randomness, serialisable to JSON.

A trace is the observed world of the causal model: the model id, the prompt, the response, the
per-row key, the sampler, and the noise offset map (which noise index each response step used).
A counterfactual can be computed from it later, in another process or on another machine.
It holds only what JSON holds (its key as a typed key is the one array): no KV cache and no
params, so keeping many traces pins no device memory (see `CacheStore` for the caches).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cfjax.atomic import write_text
from cfjax.causal import environment
from cfjax.core.checks import as_key
from cfjax.core.scm import Sampler
from cfjax.runtime.request import prompt_tokens


def key_to_list(key: jax.Array) -> list[int]:
    """Raw key data of a typed key as a JSON-able list."""
    return np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()


def key_from_list(data: list[int]) -> jax.Array:
    """Typed (threefry) key from raw key data, checked (shape and 32-bit words)."""
    if not isinstance(data, list) or not all(_is_int(x) for x in data):
        raise ValueError(f"raw key data must be a list of integers, got {data!r:.60}")
    return as_key(data)


@dataclasses.dataclass
class Trace:
    """One generated (or counterfactual) response and the randomness that produced it."""

    model_id: str
    prompt_tokens: list[int]
    tokens: list[int]
    key: jax.Array  # typed key; serialised as raw key data
    sampler: Sampler
    max_new_tokens: int
    noise_index: list[int]  # noise index used by each response step (factual: 0, 1, 2, ...)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    prompt: str | None = None  # the user message, when the prompt was built from text
    system: str | None = None
    chat: bool = False
    stop_tokens: tuple[int, ...] = ()
    interventions: list[dict] = dataclasses.field(default_factory=list)
    alignment: dict | None = None  # counterfactuals: {"edit_start", "resume_at", "aligned_to"}
    # A later turn of a conversation: the user and assistant messages before `prompt`, in order
    # (`{"role", "content"}`); the prompt tokens render system + history + prompt.
    history: list[dict] | None = None
    # Abducted traces (and their counterfactuals): how the noise of the observed steps is made,
    # {"key", "prompt_tokens", "tokens", "sampler", "full_support"}; see `cfjax.abduct`.
    posterior: dict | None = None
    # The software, chip and numerics mode that computed it (`environment.environment`); None in
    # older files.
    made_on: dict | None = None

    @property
    def stopped(self) -> bool:
        """True when the response ends with a stop token."""
        return bool(self.tokens) and self.tokens[-1] in self.stop_tokens

    def to_dict(self) -> dict:
        """JSON-ready dict (keys as raw key data)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["key"] = key_to_list(self.key)
        d["sampler"] = self.sampler.to_dict()
        d["stop_tokens"] = list(self.stop_tokens)
        d["logprobs"] = [float(x) if np.isfinite(x) else None for x in self.logprobs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Trace:
        """Inverse of `to_dict`."""
        if not isinstance(d, dict):
            raise ValueError(f"not a cfjax trace: a JSON {type(d).__name__}, not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"model_id", "prompt_tokens", "tokens", "key", "sampler", "logprobs"} - set(d)
        if missing:
            raise ValueError(f"not a cfjax trace: missing fields {sorted(missing)}")
        d = {k: v for k, v in d.items() if k in names}
        d.setdefault("max_new_tokens", len(d["tokens"]))
        d.setdefault("noise_index", list(range(len(d["tokens"]))))
        _check_fields(d)
        try:
            d["key"] = key_from_list(d["key"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"trace field key: {e}") from None
        try:
            d["sampler"] = Sampler.from_dict(d["sampler"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"trace field sampler: {e}") from None
        d["stop_tokens"] = tuple(d.get("stop_tokens", ()))
        d["logprobs"] = [float("-inf") if x is None else float(x) for x in d.get("logprobs", [])]
        if d.get("posterior") is not None:
            d["posterior"] = _check_posterior(d["posterior"])
        d["made_on"] = environment.check(d.get("made_on"), "trace field made_on")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise; also write to `path` if given."""
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Trace:
        """Parse a file written by `to_json` (a `Path`, or a str naming a file), or JSON text (a
        str starting with "{")."""
        return read_json(text_or_path, "trace", cls.from_dict)


def write_json(d: dict, path: str | Path | None) -> str:
    """`d` as indented JSON text, also written (atomically) to `path` if given."""
    text = json.dumps(d, ensure_ascii=False, indent=1)
    if path is not None:
        write_text(path, text)
    return text


def read_json(text_or_path: str | Path, what: str, parse: Callable[[Any], Any] = lambda d: d) -> Any:  # fmt: skip
    """`parse` of the JSON of a file (a `Path`, or a str naming a file) or of JSON text (a str
    starting with "{"), with errors that name the file and what was read."""
    text = str(text_or_path)
    where = ""
    if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
        path = Path(text_or_path)
        where = f"{path}: "
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise FileNotFoundError(f"{path}: cannot read {what} ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a cfjax {what}: not UTF-8 text (byte {e.start})") from None  # fmt: skip
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{where}not a cfjax {what}: JSON nested too deeply") from None
    try:
        return parse(d)
    except ValueError as e:
        if not where:
            raise
        raise ValueError(f"{where}{e}") from None


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt's token ids and, when made from text, the text it was made from."""

    tokens: list[int]
    text: str | None = None  # the user message
    system: str | None = None
    chat: bool = False
    history: list[dict] | None = None  # earlier turns of a conversation

    @classmethod
    def of(cls, lm: Any, prompt: str | Sequence[int], *, chat: bool, system: str | None,
           history: list[dict] | None = None) -> Prompt:  # fmt: skip
        """Text through the chat template (or encoded with `chat=False`), or ids as given;
        `history`: the conversation's earlier messages, rendered before `prompt`."""
        tokens = prompt_tokens(lm, prompt, chat=chat, system=system, history=history)
        if isinstance(prompt, str):
            return cls(tokens, prompt, system, chat, history or None)
        return cls(tokens)


def text_of(lm: Any, tokens: Sequence[int], stop_tokens: Sequence[int]) -> str:
    """The response text: tokens decoded without a final stop token ("" without a tokenizer)."""
    if lm.tokenizer is None:
        return ""
    tokens = list(tokens)
    if tokens and tokens[-1] in stop_tokens:
        tokens = tokens[:-1]
    return lm.tokenizer.decode(tokens)


def new_trace(lm: Any, prompt: Prompt, tokens: Sequence[int], logprobs: Sequence[float], *,
              key: jax.Array, sampler: Sampler, max_new_tokens: int,
              stop_tokens: Sequence[int], model_id: str | None = None,
              noise_index: Sequence[int] | None = None, **record: Any) -> Trace:  # fmt: skip
    """The one way a run becomes a `Trace`: its text decoded by `lm`'s tokenizer, noise indices
    by default the steps, `model_id` by default `lm`'s, `made_on` where `lm` runs; `record` sets
    the fields that only some traces have (interventions, alignment, posterior)."""
    tokens = [int(t) for t in tokens]
    return Trace(
        model_id=lm.model_id if model_id is None else model_id,
        prompt_tokens=list(prompt.tokens), tokens=tokens, key=key, sampler=sampler,
        max_new_tokens=max_new_tokens,
        noise_index=list(range(len(tokens))) if noise_index is None else [int(i) for i in noise_index],
        logprobs=[float(x) for x in logprobs], text=text_of(lm, tokens, stop_tokens),
        prompt=prompt.text, system=prompt.system, chat=prompt.chat, history=prompt.history,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        made_on=environment.environment(lm), **record,
    )  # fmt: skip


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_list(d: dict, name: str, *, empty: bool = True) -> None:
    v = d[name]
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise ValueError(f"trace field {name} must be a list of token ids >= 0, got {v!r:.80}")
    if not v and not empty:
        raise ValueError(f"trace field {name} is empty")


def _check_fields(d: dict) -> None:
    """Types, lengths and ranges of a trace's fields, each error naming its field (hand-edited
    or truncated files must not replay as something else)."""
    if not isinstance(d["model_id"], str) or not d["model_id"]:
        raise ValueError("trace field model_id must name the model that made the trace")
    _token_list(d, "prompt_tokens", empty=False)
    _token_list(d, "tokens")
    n = len(d["tokens"])
    m = d["max_new_tokens"]
    if not _is_int(m) or m < max(1, n):
        raise ValueError(f"trace field max_new_tokens must be an integer >= {max(1, n)}, got {m!r}")
    idx = d["noise_index"]
    if not isinstance(idx, list) or len(idx) != n or not all(_is_int(i) and 0 <= i < 1 << 31 for i in idx):  # fmt: skip
        raise ValueError(f"trace field noise_index must be {n} integers in [0, 2**31) (one per token)")  # fmt: skip
    lp = d["logprobs"]
    if not isinstance(lp, list) or len(lp) != n:
        raise ValueError(f"trace field logprobs must be a list of {n} numbers (one per token)")
    if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in lp):
        raise ValueError("trace field logprobs must hold numbers (null for -inf)")
    if "stop_tokens" in d:
        _token_list(d, "stop_tokens")
    if "text" in d and not isinstance(d["text"], str):
        raise ValueError("trace field text must be a string")
    for name in ("prompt", "system"):
        if d.get(name) is not None and not isinstance(d[name], str):
            raise ValueError(f"trace field {name} must be a string or null")
    if "chat" in d and not isinstance(d["chat"], bool):
        raise ValueError("trace field chat must be true or false")
    if d.get("history") is not None:
        check_messages(d["history"], "trace field history")
    ivs = d.get("interventions", [])
    if not isinstance(ivs, list) or not all(isinstance(x, dict) for x in ivs):
        raise ValueError("trace field interventions must be a list of objects")
    if d.get("alignment") is not None and not isinstance(d["alignment"], dict):
        raise ValueError("trace field alignment must be an object or null")


def check_messages(messages: Any, what: str) -> None:
    """Chat messages of a conversation: `{"role": "user" | "assistant", "content": str}` each."""
    if not isinstance(messages, list):
        raise ValueError(f"{what} must be a list of messages")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or set(m) != {"role", "content"}
            or m["role"] not in ("user", "assistant")
            or not isinstance(m["content"], str)
        ):
            raise ValueError(
                f"{what}[{i}] must be {{'role': 'user' or 'assistant', 'content': text}}, got {m!r:.80}"
            )


def _check_posterior(p: dict) -> dict:
    """The `posterior` record of a trace, checked field by field (it decides the noise)."""
    if not isinstance(p, dict):
        raise ValueError(f"trace field posterior must be an object, got {type(p).__name__}")
    fields = {"key", "prompt_tokens", "tokens", "sampler", "full_support"}
    if set(p) - fields - {"requested_sampler"} or fields - set(p):
        raise ValueError(
            f"trace field posterior must have the fields {sorted(fields)}, got {sorted(p)}"
        )
    for name in ("key", "prompt_tokens", "tokens"):
        v = p[name]
        if (
            not isinstance(v, list)
            or not v
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
        ):
            raise ValueError(f"trace field posterior.{name} must be a non-empty list of ints >= 0")
    if not isinstance(p["full_support"], bool):
        raise ValueError("trace field posterior.full_support must be true or false")
    Sampler.from_dict(p["sampler"])
    try:
        key_from_list(p["key"])
    except ValueError as e:
        raise ValueError(f"trace field posterior.key is not the raw data of a key: {e}") from None
    return p
