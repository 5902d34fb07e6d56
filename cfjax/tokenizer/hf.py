"""Vocabularies run by HF `tokenizers`: `tokenizer.json` files and GGUF-embedded vocabularies."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

from cfjax.tokenizer.base import Tokenizer


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (byte-level BPE spelling)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes map past 255, in order
            table[b] = chr(256 + extra)
            extra += 1
    return table


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE like SmolLM2/Llama 3, or sentencepiece-style BPE)."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        name: str,
        spec: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        template_vars: Mapping[str, str] | None = None,
        add_bos: bool | None = None,
    ) -> None:
        if add_bos is None:  # the tokenizer's own post-processor says whether it adds a BOS
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_token is not None and probe[:1] == [tok.token_to_id(bos_token)]
        self._tok = tok
        # `encode` must keep special-token strings as text; `_encode_split` handles the specials.
        tok.encode_special_tokens = True
        added = tok.get_added_tokens_decoder()
        specials = {t.content: i for i, t in added.items() if t.special}
        size = tok.get_vocab_size(with_added_tokens=True)
        self._bytes, self._strip_space = _token_byte_table(tok, size, added)
        ids = {t: tok.token_to_id(t) for t in (bos_token, eos_token) if t is not None}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{spec}: special tokens {missing} are not in the vocabulary")
        stops = list(extra_stop_ids)
        for s in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            if s in specials:  # ChatML / Llama 3 turn ends, whatever the file names as eos
                stops.append(specials[s])
        super().__init__(
            name=name,
            spec=spec,
            vocab_size=size,
            special_tokens=specials,
            bos_id=ids[bos_token] if bos_token is not None else None,
            eos_id=ids[eos_token] if eos_token is not None else None,
            stop_tokens=stops,
            chat_template=chat_template,
            template_vars={"bos_token": bos_token, "eos_token": eos_token, **(template_vars or {})},
            add_bos=add_bos,
        )

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary's spelling of a token, e.g. 'Ġhello'."""
        self.token_bytes(token_id)  # range check
        return self._tok.id_to_token(token_id)

    def _leading_strip(self, first_id: int) -> int:
        return int(self._strip_space and self._bytes[first_id][:1] == b" ")


def _decoder_types(tok: tokenizers.Tokenizer) -> tuple[set[str], bool]:
    """The decoder step types, and whether it strips one leading space (sentencepiece style)."""
    spec = json.loads(tok.to_str()).get("decoder") or {}
    steps = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = {s.get("type") for s in steps}
    strip = any(
        (s.get("type") == "Strip" and s.get("content") == " " and s.get("start", 0) >= 1)
        or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never")
        for s in steps
    )
    return types, strip


def _token_byte_table(
    tok: tokenizers.Tokenizer, size: int, added: Mapping[int, Any]
) -> tuple[list[bytes], bool]:
    """Raw bytes per id, read off the decoder type so concatenation equals `decode`."""
    types, strip = _decoder_types(tok)
    table: list[bytes] = []
    if "ByteLevel" in types:
        inverse = {c: b for b, c in byte_alphabet().items()}
        for i in range(size):
            piece = tok.id_to_token(i) or ""
            if i in added or not all(c in inverse for c in piece):
                table.append(added[i].content.encode() if i in added else piece.encode())
            else:
                table.append(bytes(inverse[c] for c in piece))
    elif types & {"Metaspace", "Replace", "ByteFallback"}:
        byte_fallback = "ByteFallback" in types
        for i in range(size):
            piece = tok.id_to_token(i) or ""
            if i in added:
                table.append(added[i].content.encode())
            elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece[-1] == ">":
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode())
    else:
        # Other decoders (WordPiece, ...) are not Llama-family; per-token decode is the best guess.
        table = [tok.decode([i], skip_special_tokens=False).encode() for i in range(size)]
    return table, strip


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def dir_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template an HF model directory ships, if any (as transformers finds it)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or read_json(path / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def generation_stop_ids(path: Path) -> list[int]:
    """Extra stop ids from generation_config.json's eos_token_id (an int or a list)."""
    eos = read_json(path / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def from_tokenizer_json(path: Path, *, spec: str) -> HFTokenizer:
    """Load an HF `tokenizer.json` and the tokenizer_config.json / chat template beside it."""
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path}: not a valid HF tokenizer.json ({e})") from None
    folder = path.parent
    config = read_json(folder / "tokenizer_config.json")
    return HFTokenizer(
        tok,
        name=f"hf:{folder.name}",
        spec=spec,
        bos_token=token_content(config.get("bos_token")),
        eos_token=token_content(config.get("eos_token")),
        extra_stop_ids=generation_stop_ids(folder),
        chat_template=dir_chat_template(folder, config),
        add_bos=config.get("add_bos_token")
        if isinstance(config.get("add_bos_token"), bool)
        else None,
        template_vars={
            k: v
            for k in ("unk_token", "pad_token")
            if (v := token_content(config.get(k))) is not None
        },
    )
