"""Show a counterfactual next to its factual trace: terminal diff and side-by-side HTML.

Tokens are compared by response position under the counterfactual's own alignment (`changes`):
kept tokens are plain, changed ones coloured, and ▍ marks the first changed token, so a reader
sees at once where the two worlds part.
"""

from __future__ import annotations

import datetime
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


def changes(factual: Trace, other: Trace) -> tuple[list[bool], list[bool], int]:
    """Which tokens differ, on each side, and where `other` first differs: the one definition of
    "changed" that the terminal, the HTML export and the explorer show.

    By response position under the alignment `other` was made with (DESIGN §2; `s` edit start,
    `m` resume point, `r` the factual step aligned to it): before the edit position by position,
    the edited span always, after it each token against the factual token whose noise it used.
    Without an alignment (a sampler change, a fresh trace) every position is compared as is.
    Returns (factual flags, other flags, first changed position of `other`).
    """
    f, o = list(factual.tokens), list(other.tokens)
    a = other.alignment or {}
    m = a.get("resume_at", 0)
    r = a.get("aligned_to", m)
    s = a.get("edit_start", min(m, r))
    same = lambda x, i, y, j: 0 <= i < len(x) and 0 <= j < len(y) and x[i] == y[j]  # noqa: E731
    other_flags = [
        not same(f, j, o, j) if j < s else True if j < m else not same(f, j + r - m, o, j)
        for j in range(len(o))
    ]
    factual_flags = [
        not same(o, i, f, i) if i < s else True if i < r else not same(o, i - r + m, f, i)
        for i in range(len(f))
    ]
    first = next((j for j, c in enumerate(other_flags) if c), len(o))
    return factual_flags, other_flags, first


def _group(pieces: list[str], flags: list[bool]) -> list[tuple[str, bool]]:
    """Consecutive pieces with the same flag joined: [(text, changed), ...]."""
    out: list[tuple[str, bool]] = []
    for text, changed in zip(pieces, flags, strict=False):
        if out and out[-1][1] == changed:
            out[-1] = (out[-1][0] + text, changed)
        else:
            out.append((text, changed))
    return out


def segments(
    tokenizer, factual: Trace, other: Trace
) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]], int]:
    """(factual segments, other segments, first changed token of `other`): each segment
    (text, changed), by `changes`."""
    left, right, first = changes(factual, other)
    a = _pieces(tokenizer, factual.tokens, factual.stop_tokens)
    b = _pieces(tokenizer, other.tokens, other.stop_tokens)
    return _group(a, left), _group(b, right), first


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


def show(console, tokenizer, factual: Trace, others: Sequence[tuple[str, Trace]]) -> None:
    """The factual answer and each `(title, trace)` beside it, marked as `terminal_diff` marks
    them, then how many tokens after the edit each keeps. In a terminal each answer is a box;
    piped, a heading and the text as it is (no lines wrapped at a guessed width)."""
    from rich.panel import Panel

    def block(title: str, text: Text) -> None:
        if console.is_terminal:
            console.print(Panel(text, title=Text(printable(title)), title_align="left"))
        else:
            console.print(f"--- {printable(title)}", soft_wrap=True, markup=False)
            console.print(text, soft_wrap=True)

    f_text = None
    for title, other in others:
        left, right = terminal_diff(tokenizer, factual, other)
        if f_text is None:
            f_text = left
            block("factual", f_text)
        block(title, right)
    for title, other in others:
        if other.alignment is not None:
            same, total = kept_after_edit(factual, other)
            console.print(f"{title.split(':')[0]}: {same}/{total} tokens after the edit equal "
                          f"the factual ones (edit at token {other.alignment['edit_start']})",
                          soft_wrap=True, markup=False)  # fmt: skip


def describe(record: dict, tokenizer=None) -> str:
    """An intervention's record (`Trace.interventions` entry) in words."""
    kind = record.get("type")
    text = lambda ids: repr(tokenizer.decode(ids)) if tokenizer is not None else str(ids)  # noqa: E731
    nth = lambda r: "" if r.get("occurrence", 1) == 1 else f" (occurrence {r['occurrence']})"  # noqa: E731
    if kind == "ReplaceText":
        return f"replace {record['old']!r} by {record['new']!r}{nth(record)}"
    if kind == "InsertText":
        return f"insert {record['text']!r} after {record['after']!r}{nth(record)}"
    if kind == "DeleteText":
        return f"delete {record['text']!r}{nth(record)}"
    if kind == "ReplaceTokens":
        n = len(record["tokens"]) if record.get("count") is None else record["count"]
        what = f"{n} tokens from position {record['position']}" if n != 1 else f"token {record['position']}"  # fmt: skip
        return f"replace {what} by {text(record['tokens'])}" if n else f"insert {text(record['tokens'])} at {record['position']}"  # fmt: skip
    if kind == "AutoIntervention":
        chosen = f" ({text([record['token']])})" if "token" in record else ""
        return (
            f"automatic intervention at token {record['position']}{chosen}, top-p {record['top_p']}"
        )
    if kind == "EditPrompt":
        parts = [f"{k} → {record[k]!r}" for k in ("prompt", "system") if record.get(k) is not None]
        return "edit the prompt: " + ("; ".join(parts) or f"tokens {record.get('tokens')}")
    if kind == "ChangeSampler":
        return "sampler: " + ", ".join(f"{k} → {v}" for k, v in record.items() if k != "type")
    if kind == "ChangeModel":
        return f"other weights: {record.get('name')}"
    if kind == "Steer":
        return f"steer layer {record['layer']} by scale {record['scale']} ({record['at']})"
    if kind == "Context":
        return "the counterfactual conversation before this turn"
    if kind == "AtTurn":
        inner = "; ".join(describe(r, tokenizer) for r in record["interventions"])
        return f"at turn {record['turn']}: {inner}"
    return str(record)


def seed_of(trace: Trace) -> int | None:
    """The int seed of a trace's key when it is one (`key(seed)` holds [0, seed]), else None."""
    import jax
    import numpy as np

    key = np.asarray(jax.random.key_data(trace.key)).tolist()
    return key[1] if len(key) == 2 and key[0] == 0 else None


def settings_line(trace: Trace) -> str:
    """Model, sampler, seed (when the key is a seed's) and prompt of a trace, in one line."""
    seed = f", seed {seed_of(trace)}" if seed_of(trace) is not None else ""
    sampler = ", ".join(f"{k} {v}" for k, v in trace.sampler.to_dict().items() if v is not None)
    prompt = f"; prompt {trace.prompt!r}" if trace.prompt is not None else ""
    system = f"; system {trace.system!r}" if trace.system is not None else ""
    return f"{trace.model_id}: {sampler}{seed}{prompt}{system}"


def html_diff(tokenizer, factual: Trace, others: dict[str, Trace]) -> str:
    """A standalone HTML page: the factual and each other trace side by side."""

    def column(title: str, segs: list[tuple[str, bool]], cls: str, trace: Trace) -> str:
        body, marked = "", False
        for t, ch in segs:
            if ch and not marked:  # the first changed token, as in the terminal and the explorer
                body, marked = body + f'<span class="mark">{MARK}</span>', True
            body += f'<span class="{cls}">{html.escape(t)}</span>' if ch else html.escape(t)
        words = "; ".join(describe(r, tokenizer) for r in trace.interventions) or "the factual run"
        about = f"<p class='about'>{html.escape(words)}<br>{html.escape(settings_line(trace))}</p>"
        return f"<div class='col'><h3>{html.escape(title)}</h3>{about}<pre>{body}</pre></div>"

    cols = []
    for i, (name, other) in enumerate(others.items()):
        left, right, first = segments(tokenizer, factual, other)
        if i == 0:
            cols.append(column("factual", left, "del", factual))
        cols.append(column(f"{name} (diverges at token {first})", right, "ins", other))
    records = "".join(
        f"<li><b>{html.escape(n)}</b>: {html.escape('; '.join(describe(r, tokenizer) for r in o.interventions))}</li>"
        for n, o in others.items()
    )  # fmt: skip
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cfjax diff</title>
<style>body{{font-family:sans-serif}} .row{{display:flex;gap:1em}} .col{{flex:1}}
pre{{white-space:pre-wrap;font-family:inherit;line-height:1.5}}
.del{{background:#fdd}} .ins{{background:#dfd}} .mark{{color:#d80;font-weight:bold}}
.about{{color:#555;font-size:0.9em}}</style></head><body>
<h2>{html.escape(factual.model_id)}: factual vs counterfactual</h2><ul>{records}</ul>
<p class="about">made {made} by cfjax</p>
<div class="row">{"".join(cols)}</div></body></html>
"""
