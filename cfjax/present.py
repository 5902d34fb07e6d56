"""Show a counterfactual next to its factual trace: terminal diff and side-by-side HTML.

Tokens are aligned with difflib: kept tokens are plain, changed ones coloured, and the first
divergence is marked, so a reader sees at once where the two worlds part.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Sequence

from rich.text import Text

from cfjax.causal.trace import Trace

MARK = "▍"  # marks the first divergence

# Model and file text is data: C0/C1 control characters (ESC, BEL, CR, DEL, ...) would move the
# cursor, retitle or clear a terminal. They are shown as `\x1b`-style escapes; newlines and tabs
# are kept.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (9, 10)}


def printable(text: str) -> str:
    """`text` with every control character but newline and tab escaped, for a terminal."""
    return text.translate(_CONTROLS)


def _pieces(tokenizer, tokens: Sequence[int], stop_tokens: Sequence[int]) -> list[str]:
    """Per-token text pieces whose concatenation is the decoded response."""
    body = list(tokens[:-1] if tokens and tokens[-1] in stop_tokens else tokens)
    if tokenizer is None:
        return [f"[{t}]" for t in body]
    from cfjax.tokenizer import token_char_spans

    text = tokenizer.decode(body)
    return [printable(text[a:b]) for a, b in token_char_spans(tokenizer, body)]


def segments(
    tokenizer, factual: Trace, other: Trace
) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]], int]:
    """(factual segments, other segments, first divergent token): each segment (text, changed)."""
    a = _pieces(tokenizer, factual.tokens, factual.stop_tokens)
    b = _pieces(tokenizer, other.tokens, other.stop_tokens)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    left: list[tuple[str, bool]] = []
    right: list[tuple[str, bool]] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        changed = op != "equal"
        if i2 > i1:
            left.append(("".join(a[i1:i2]), changed))
        if j2 > j1:
            right.append(("".join(b[j1:j2]), changed))
    first = next(
        (i for i, (x, y) in enumerate(zip(factual.tokens, other.tokens, strict=False)) if x != y),
        min(len(factual.tokens), len(other.tokens)),
    )
    return left, right, first


def _rich(segs: list[tuple[str, bool]], style: str) -> Text:
    out = Text()
    marked = False
    for text, changed in segs:
        if changed and not marked:
            out.append(MARK, style="bold yellow")
            marked = True
        out.append(text, style=style if changed else "")
    return out


def terminal_diff(tokenizer, factual: Trace, other: Trace):
    """Two rich `Text`s: the factual with removed text in red, `other` with new text in green."""
    left, right, _ = segments(tokenizer, factual, other)
    return _rich(left, "bold red"), _rich(right, "bold green")


def kept_after_edit(factual: Trace, other: Trace) -> tuple[int, int]:
    """(tokens equal to the factual after the edit, tokens after the edit) with alignment."""
    align = other.alignment or {}
    m, r = align.get("resume_at", 0), align.get("aligned_to", 0)
    after = other.tokens[m:]
    same = sum(
        1 for j, t in enumerate(after) if r + j < len(factual.tokens) and factual.tokens[r + j] == t
    )
    return same, len(after)


def html_diff(tokenizer, factual: Trace, others: dict[str, Trace]) -> str:
    """A standalone HTML page: the factual and each other trace side by side."""

    def column(title: str, segs: list[tuple[str, bool]], cls: str) -> str:
        body = "".join(
            f'<span class="{cls}">{html.escape(t)}</span>' if ch else html.escape(t)
            for t, ch in segs
        )
        return f"<div class='col'><h3>{html.escape(title)}</h3><pre>{body}</pre></div>"

    cols = []
    for i, (name, other) in enumerate(others.items()):
        left, right, first = segments(tokenizer, factual, other)
        if i == 0:
            cols.append(column("factual", left, "del"))
        cols.append(column(f"{name} (diverges at token {first})", right, "ins"))
    records = "".join(
        f"<li><b>{html.escape(n)}</b>: {html.escape(str(o.interventions))}</li>"
        for n, o in others.items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cfjax diff</title>
<style>body{{font-family:sans-serif}} .row{{display:flex;gap:1em}} .col{{flex:1}}
pre{{white-space:pre-wrap;font-family:inherit;line-height:1.5}}
.del{{background:#fdd}} .ins{{background:#dfd}}</style></head><body>
<h2>{html.escape(factual.model_id)}: factual vs counterfactual</h2><ul>{records}</ul>
<div class="row">{"".join(cols)}</div></body></html>
"""
