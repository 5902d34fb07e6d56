"""Llama 2 (and other sentencepiece `.model` files), through the sentencepiece library."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from cfjax.tokenizer.base import Tokenizer

_SPACE = "\u2581"  # sentencepiece's visible space


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. `encode` adds the dummy-prefix space, like Meta's Llama 2 encode."""

    def __init__(
        self, path: str | Path, *, spec: str, name: str = "llama2", chat_template: str | None = None
    ) -> None:
        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None
        sp = self._sp
        n = sp.get_piece_size()
        self._bytes = [self._piece_bytes(i) for i in range(n)]
        # Whether sentencepiece drops the dummy-prefix space of the first piece when decoding.
        probe = next(
            (i for i in range(n) if self._is_text(i) and sp.id_to_piece(i)[:1] == _SPACE), None
        )
        self._strips_prefix = not sp.decode([probe]).startswith(" ") if probe is not None else False
        controls = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i)}
        super().__init__(
            name=name,
            spec=spec,
            vocab_size=n,
            special_tokens=controls,
            bos_id=sp.bos_id() if sp.bos_id() >= 0 else None,
            eos_id=sp.eos_id() if sp.eos_id() >= 0 else None,
            chat_template=chat_template,
        )

    def _is_text(self, i: int) -> bool:
        sp = self._sp
        return not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i))

    def _piece_bytes(self, i: int) -> bytes:
        sp, piece = self._sp, self._sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        if sp.is_control(i) or sp.is_unused(i):
            return b""  # sentencepiece decodes these to nothing
        if sp.is_unknown(i):
            return " \u2047 ".encode()  # what sentencepiece prints for <unk>
        return piece.replace(_SPACE, " ").encode()

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def id_to_piece(self, token_id: int) -> str:
        """The sentencepiece piece, e.g. '▁hello' or '<0x0A>'."""
        self.token_bytes(token_id)  # range check
        return self._sp.id_to_piece(token_id)

    def _leading_strip(self, first_id: int) -> int:
        # sentencepiece removes the dummy-prefix space from the first text piece only (not from
        # byte pieces or <unk>).
        return int(
            self._strips_prefix and self._is_text(first_id) and self._bytes[first_id][:1] == b" "
        )
