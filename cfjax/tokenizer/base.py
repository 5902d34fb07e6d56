"""The tokenizer interface every backend (tiktoken, sentencepiece, HF `tokenizers`) implements.

A backend supplies three things: `_encode_plain` (text -> ids, every special-token string treated as
plain text), `_token_bytes` (id -> the raw bytes it stands for) and its attributes. Everything else
(special-token splitting, decoding, chat prompts) is shared here, so all backends behave alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

from cfjax.tokenizer import chat as chat_mod

# Unicode noncharacters (never used in interchanged text) bracket special-token look-alikes inside
# chat messages while the template renders, so they can be told apart from the template's own ones.
_MARK_START, _MARK_END = "\ufdd0", "\ufdd1"

Message = Mapping[str, Any]


class Tokenizer:
    """A tokenizer: exact encode/decode, raw token bytes, chat prompts and stop tokens."""

    name: str  # short label: "llama3", "llama2", "gguf:<file>", "hf:<dir>"
    spec: str  # what `cfjax.tokenizer.load` needs to rebuild this tokenizer
    vocab_size: int  # number of ids, specials included
    special_tokens: dict[str, int]  # strings kept as plain text by `encode` unless allowed
    bos_id: int | None
    add_bos: bool  # the model's own setting: does a plain-text prompt start with bos_id?
    eos_id: int | None
    stop_tokens: tuple[int, ...]
    chat_template: str | None  # jinja source: the model's own template or a built-in format

    def __init__(
        self,
        *,
        name: str,
        spec: str,
        vocab_size: int,
        special_tokens: Mapping[str, int],
        bos_id: int | None,
        eos_id: int | None,
        stop_tokens: Iterable[int] = (),
        chat_template: str | None = None,
        template_vars: Mapping[str, str] | None = None,
        add_bos: bool = True,
    ) -> None:
        self.name, self.spec, self.vocab_size = name, spec, vocab_size
        self.special_tokens = dict(special_tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        stops = [*stop_tokens, *([eos_id] if eos_id is not None else [])]
        self.stop_tokens = tuple(dict.fromkeys(stops))  # ordered, without duplicates
        self.chat_template = chat_template or chat_mod.builtin_template(self.special_tokens)
        # Variables templates expect (transformers passes the special-token strings).
        vars_ = {"bos_token": self._piece_or_none(bos_id), "eos_token": self._piece_or_none(eos_id)}
        vars_.update({k: v for k, v in (template_vars or {}).items() if v is not None})
        self.template_vars = {k: v for k, v in vars_.items() if v is not None}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} vocab_size={self.vocab_size}>"

    # --- what a backend implements ---------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary's own spelling of a token (e.g. 'Ġhello', '▁hello', '<0x0A>')."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _leading_strip(self, first_id: int) -> int:
        """Bytes `decode` drops before the first text-bearing token (sentencepiece's dummy prefix)."""
        return 0

    # --- shared behaviour ------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (a piece of a UTF-8 character is possible)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside [0, {self.vocab_size}) for {self.name}"
            )
        return self._token_bytes(token_id)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Adds no BOS; special-token strings stay plain text unless `allow_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not allow_special:
            return self._encode_plain(text)
        return self._encode_split(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes that `ids` stand for, as `decode` sees them (before UTF-8 decoding)."""
        pieces = [self.token_bytes(i) for i in ids]
        first = next((i for i, p in zip(ids, pieces, strict=True) if p), None)
        strip = self._leading_strip(int(first)) if first is not None else 0
        return b"".join(pieces)[strip:]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; invalid or incomplete UTF-8 becomes U+FFFD (Python's 'replace' policy)."""
        return self.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

    def chat_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The chat prompt as text, rendered from the model's template or the built-in format."""
        return self._render(messages, add_generation_prompt)

    def chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt as ids, ending with the assistant header when `add_generation_prompt`.

        The template's special tokens become special ids. Special-token strings typed inside a
        message stay plain text (unlike transformers' default), so user text cannot forge a turn.
        """
        marked = [_mark(dict(m), self._special_re) for m in messages]
        return self._encode_split(self._render(marked, add_generation_prompt))

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.name} has no chat template and no built-in chat format fits its "
                "vocabulary; set `tokenizer.chat_template` to a jinja template"
            )
        return chat_mod.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **self.template_vars,
        )

    @cached_property
    def _special_re(self) -> re.Pattern[str]:
        # Longest first, so a special token wins over one it contains.
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names)) or "(?!)")

    @cached_property
    def _split_re(self) -> re.Pattern[str]:
        specials = self._special_re.pattern
        return re.compile(f"{_MARK_START}({specials}){_MARK_END}|({specials})")

    def _encode_split(self, text: str) -> list[int]:
        """Encode with special-token strings as special ids, except marked look-alikes.

        Text between special tokens is encoded in one piece (as tiktoken, `tokenizers` and Meta's
        references do), so a marked look-alike tokenizes exactly like the same text in `encode`.
        """
        ids: list[int] = []
        buf: list[str] = []

        def flush() -> None:
            plain = "".join(buf).replace(_MARK_START, "").replace(_MARK_END, "")
            buf.clear()
            if plain:
                ids.extend(self._encode_plain(plain))

        pos = 0
        for m in self._split_re.finditer(text):
            buf.append(text[pos : m.start()])
            if m.group(1) is not None:  # a marked look-alike from a message: plain text
                buf.append(m.group(1))
            else:
                flush()
                ids.append(self.special_tokens[m.group(2)])
            pos = m.end()
        buf.append(text[pos:])
        flush()
        return ids

    def _piece_or_none(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        inverse = {v: k for k, v in self.special_tokens.items()}
        return inverse.get(token_id)


def _mark(obj: Any, special_re: re.Pattern[str]) -> Any:
    """Bracket special-token strings in message values with noncharacter markers (keys untouched)."""
    if isinstance(obj, str):
        if _MARK_START in obj or _MARK_END in obj:
            raise ValueError("chat message contains the Unicode noncharacters U+FDD0/U+FDD1")
        return special_re.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", obj)
    if isinstance(obj, Mapping):
        return {k: _mark(v, special_re) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_mark(v, special_re) for v in obj]
    return obj


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise ValueError if a model with `vocab_size` embedding rows cannot use `tokenizer`.

    A model's embedding may be padded beyond the tokenizer (e.g. to a multiple of 64): rows past
    `tokenizer.vocab_size` are never produced by encode, so a larger model vocabulary is allowed.
    A smaller one is an error: the tokenizer could emit ids the model has no embedding for.
    """
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the model has {vocab_size} token embeddings but tokenizer "
            f"{tokenizer.name} ({tokenizer.spec}) has {tokenizer.vocab_size} ids; wrong tokenizer "
            "for this model?"
        )
