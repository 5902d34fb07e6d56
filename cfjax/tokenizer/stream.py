"""Incremental detokenisation and the character <-> token map used to place text edits.

A token may hold part of a UTF-8 character (byte-level BPE and byte-fallback vocabularies split
emoji and CJK characters), so text is always rebuilt from token *bytes*, never by decoding tokens
one by one.

Span policy (`token_char_spans`): a token's span covers every character it holds at least one
byte of. Tokens that share a split character therefore overlap on that one character; elsewhere
spans are contiguous and non-overlapping, and together they cover `decode(ids)`. A token with no
bytes (e.g. sentencepiece's <s>) gets an empty span at its position.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Iterable, Iterator, Sequence

from cfjax.tokenizer.base import Tokenizer


class StreamDecoder:
    """Feed token ids one at a time; get text as soon as whole UTF-8 characters are available.

    The concatenation of every `feed` result and the final `flush()` equals `tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # seen a token with bytes (the dummy-prefix strip applies once)

    def feed(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        data = self.tokenizer.token_bytes(token_id)
        if data and not self._started:
            self._started = True
            data = data[self.tokenizer._leading_strip(int(token_id)) :]
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of stream: return what is left (incomplete bytes become U+FFFD)."""
        return self._decoder.decode(b"", final=True)


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Yield the text pieces of `ids` as they become complete (then whatever `flush` gives)."""
    dec = StreamDecoder(tokenizer)
    for i in ids:
        if piece := dec.feed(i):
            yield piece
    if tail := dec.flush():
        yield tail


def _char_byte_offsets(data: bytes) -> list[int]:
    """Byte offset where each character of `data.decode('utf-8', 'replace')` starts, plus the end.

    Invalid bytes become one U+FFFD per maximal invalid sequence, exactly as Python's 'replace'.
    """
    offsets: list[int] = []
    pos = 0
    while True:
        try:
            text = data[pos:].decode("utf-8")
            bad = None
        except UnicodeDecodeError as e:
            text, bad = data[pos : pos + e.start].decode("utf-8"), (pos + e.start, pos + e.end)
        for ch in text:
            offsets.append(pos)
            c = ord(ch)
            pos += 1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4
        if bad is None:
            break
        offsets.append(bad[0])  # the U+FFFD
        pos = bad[1]
    offsets.append(len(data))
    return offsets


def _layout(tok: Tokenizer, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token byte boundaries (len(ids)+1) and character byte offsets (len(text)+1) of decode(ids)."""
    ids = [int(i) for i in ids]
    data = tok.decode_bytes(ids)
    sizes = [len(tok.token_bytes(i)) for i in ids]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    strip = bounds[-1] - len(data)  # bytes `decode` drops at the front (dummy-prefix space)
    bounds = [max(0, b - strip) for b in bounds]
    return bounds, _char_byte_offsets(data)


def token_char_spans(tok: Tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Each token's [start, end) character span in `tok.decode(ids)` (policy: module docstring)."""
    bounds, chars = _layout(tok, ids)
    spans = []
    for b0, b1 in zip(bounds, bounds[1:], strict=False):
        if b1 == b0:  # no bytes: an empty span where the next character starts
            c = bisect.bisect_left(chars, b0)
            spans.append((c, c))
        else:  # characters whose bytes intersect [b0, b1)
            spans.append((bisect.bisect_right(chars, b0) - 1, bisect.bisect_left(chars, b1)))
    return spans


def char_span_to_token_span(
    tok: Tokenizer, ids: Sequence[int], start: int, end: int
) -> tuple[int, int]:
    """The smallest token range [tok_start, tok_end) covering characters [start, end).

    For an empty range (an insertion point) at a token boundary this is (i, i); inside a token, it
    is that token (an insertion cannot split it).
    """
    bounds, chars = _layout(tok, ids)
    n_chars = len(chars) - 1
    if not 0 <= start <= end <= n_chars:
        raise ValueError(f"character span [{start}, {end}) is outside the text [0, {n_chars})")
    b_start, b_end = chars[start], chars[end]
    starts = bounds[:-1]
    if start == end and b_start in bounds:
        i = bounds.index(b_start)
        return i, i
    # The last token starting at or before b_start (past any empty tokens there)...
    first = max(0, bisect.bisect_right(starts, b_start) - 1)
    if start == end:
        return first, first + 1
    # ... through the first boundary at or after b_end.
    last = bisect.bisect_left(bounds, b_end, lo=first + 1)
    return first, last
