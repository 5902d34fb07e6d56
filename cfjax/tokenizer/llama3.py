"""Llama 3 / 3.1 / 3.2: a tiktoken `Encoding` built from Meta's `tokenizer.model` rank file."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import tiktoken

from cfjax.tokenizer.base import Tokenizer

# Meta's split pattern (llama_models/llama3/tokenizer.py).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# The named specials, in id order after the base vocabulary, as Meta's llama_models defines them;
# the remaining slots up to 256 are <|reserved_special_token_{2+i}|>.
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# Meta's encoder cuts text into chunks: tiktoken panics on very long inputs
# (openai/tiktoken#195). Kept identical so long texts tokenize exactly like the reference.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")


def special_token_names() -> list[str]:
    """Meta's 256 Llama 3 special-token strings in id order."""
    reserved = NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)
    return [
        *NAMED_SPECIAL_TOKENS,
        *(f"<|reserved_special_token_{2 + i}|>" for i in range(reserved)),
    ]


def is_tiktoken_file(path: Path) -> bool:
    """True if `path` starts like a tiktoken rank file ('<base64> <rank>' lines)."""
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?", head) is not None


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file strictly: every line '<base64 token> <rank>', ranks 0..n-1."""
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise ValueError(
                    f"{path}: line {lineno} is not '<base64 token> <rank>' ({e})"
                ) from None
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: tiktoken ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


@lru_cache(maxsize=4)
def _encoding(path: str) -> tuple[tiktoken.Encoding, dict[str, int]]:
    # Parsing 128k lines and building the BPE takes ~0.5 s: share it between tokenizers.
    ranks = load_ranks(Path(path))
    specials = {s: len(ranks) + i for i, s in enumerate(special_token_names())}
    enc = tiktoken.Encoding(
        name=Path(path).name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials
    )
    return enc, specials


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: tiktoken BPE with 256 special tokens after the base vocabulary."""

    def __init__(self, path: str | Path, *, spec: str, chat_template: str | None = None) -> None:
        self._enc, specials = _encoding(str(Path(path).resolve()))
        super().__init__(
            name="llama3",
            spec=spec,
            vocab_size=self._enc.n_vocab,
            special_tokens=specials,
            bos_id=specials["<|begin_of_text|>"],
            eos_id=specials["<|end_of_text|>"],
            # Llama 3 Instruct ends a turn with <|eot_id|>; <|end_of_text|> ends a document.
            stop_tokens=(specials["<|eot_id|>"], specials["<|end_of_text|>"]),
            chat_template=chat_template,
        )

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + _MAX_ENCODE_CHARS]):
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def _token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes that `ids` stand for (tiktoken's fast path)."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size}) for {self.name}")
        return self._enc.decode_bytes(ids)


def _split_long_runs(s: str) -> list[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`: no piece has a run over 25k (non)spaces."""
    if not _LONG_RUN.search(s):  # the common case: Meta's loop would yield `s` whole
        return [s]
    pieces, start, run, in_space = [], 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != in_space:
            run, in_space = 1, ch.isspace()
        else:
            run += 1
            if run > _MAX_RUN_CHARS:
                pieces.append(s[start:i])
                start, run = i, 1
    pieces.append(s[start:])
    return pieces
