"""Tokenizers rebuilt from a GGUF file's metadata (llama.cpp key names), run by HF `tokenizers`.

A GGUF carries no tokenizer.json, only the vocabulary, merges, token types and special ids. We
rebuild the `tokenizers.Tokenizer` the way transformers' GGUF loader does, so ids match it:
- `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges (SmolLM2, Llama 3 GGUFs);
- `"llama"`: sentencepiece-style BPE whose merges follow the token scores (Llama 2 GGUFs).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from cfjax.tokenizer.hf import HFTokenizer, byte_alphabet
from cfjax.tokenizer.llama3 import PAT_STR as LLAMA3_PAT

# llama.cpp's token types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# `tokenizer.ggml.pre` values whose text split is Llama 3's (the ones transformers maps).
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}
_KEYS = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "scores": "tokenizer.ggml.scores",
    "types": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "add_space_prefix": "tokenizer.ggml.add_space_prefix",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "chat_template": "tokenizer.chat_template",
}


def read_vocab(reader: Any) -> dict[str, Any]:
    """The tokenizer metadata of an open `gguf.GGUFReader`, as plain Python values."""
    out = {}
    for name, key in _KEYS.items():
        field = reader.fields.get(key)
        if field is not None:
            out[name] = field.contents()
    return out


@lru_cache(maxsize=4)
def _read_vocab_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    # cfjax's header reader decodes just the tokenizer entries (`gguf.GGUFReader` would build a
    # numpy view for every string: ~2.5 s for SmolLM2's 100k); once per file version. Callers
    # get the plain lists and must not modify them.
    from cfjax.gguf_header import read_header

    meta = read_header(path, arrays=set(_KEYS.values())).metadata
    return {name: meta[key] for name, key in _KEYS.items() if key in meta}


def from_gguf(source: str | os.PathLike[str] | Any, *, spec: str | None = None) -> HFTokenizer:
    """The tokenizer embedded in a `.gguf` file (a path, or an already open `gguf.GGUFReader`)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        st = path.stat()
        meta = _read_vocab_cached(str(path), st.st_mtime_ns, st.st_size)
    else:  # a `gguf.GGUFReader` the caller already opened
        path = Path(getattr(source.data, "filename", "model.gguf"))
        meta = read_vocab(source)
    if "model" not in meta or "tokens" not in meta:
        raise ValueError(f"{path}: GGUF file has no tokenizer metadata (tokenizer.ggml.*)")
    kind, tokens = meta["model"], meta["tokens"]
    types = meta.get("types") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens, types)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')"
        )
    # Control tokens stay whole and special; user-defined ones whole but ordinary text.
    alphabet = set(byte_alphabet().values())
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, y in zip(tokens, types, strict=True)
        # A byte-level "control" token outside the byte alphabet is a llama.cpp mislabel that
        # transformers skips too.
        if y == _CONTROL and (kind != "gpt2" or set(t) <= alphabet)
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, y in zip(tokens, types, strict=True)
            if y == _USER_DEFINED
        ]
    )

    def name_of(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return HFTokenizer(
        tok,
        name=f"gguf:{path.name}",
        spec=spec or str(path),
        bos_token=name_of("bos"),
        eos_token=name_of("eos"),
        chat_template=meta.get("chat_template"),
        template_vars={"unk_token": name_of("unk"), "pad_token": name_of("pad")},
        # GGUF says it outright; without the key llama.cpp adds one, and so does cfjax.
        add_bos=bool(meta.get("add_bos", True)),
    )


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> HFBackend:
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet already; respell any that are not (as transformers).
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("merges", [])]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"GGUF merges must be 'left right' pairs, got {bad[0]!r}")
    pre = meta.get("pre")
    # Llama 3 BPE maps a piece found whole in the vocabulary straight to it (as tiktoken does).
    tok = HFBackend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE))
    if pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":  # SmolLM2's tokenizer.json (and llama.cpp) split digits one by one
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:  # GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> HFBackend:
    scores = meta.get("scores")
    if scores is None:
        raise ValueError("GGUF sentencepiece vocabulary has no tokenizer.ggml.scores")
    unk = meta.get("unk")
    tok = HFBackend(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=_merges_from_scores(tokens, scores),
            unk_token=tokens[int(unk)] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=_BYTE in types,
        )
    )
    # sentencepiece writes spaces as "▁" and (by default) prefixes one to the text.
    prefix = bool(meta.get("add_space_prefix", True))
    steps = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), *steps] if prefix else steps
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: best-scored result first.

    Same order as transformers' `generate_merges`, so ids match its GGUF loader.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
