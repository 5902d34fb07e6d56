"""The factual/counterfactual diff: aligned segments, first divergence, HTML page."""

from __future__ import annotations

import jax

from cfjax import present
from cfjax.causal.trace import Trace
from cfjax.core.scm import Sampler


def _trace(tokens, alignment=None):
    return Trace(
        model_id="m",
        prompt_tokens=[1],
        tokens=tokens,
        key=jax.random.key(0),
        sampler=Sampler(),
        max_new_tokens=8,
        noise_index=list(range(len(tokens))),
        stop_tokens=(0,),
        alignment=alignment,
    )


def test_segments_mark_changed_tokens_and_first_divergence():
    factual = _trace([5, 6, 7, 8, 0])
    other = _trace([5, 6, 9, 8, 0], {"resume_at": 3, "aligned_to": 3})
    left, right, first = present.segments(None, factual, other)
    assert left == [("[5][6]", False), ("[7]", True), ("[8]", False)]  # stop token not shown
    assert right == [("[5][6]", False), ("[9]", True), ("[8]", False)]
    assert first == 2
    assert present.kept_after_edit(factual, other) == (2, 2)  # [8, 0] equal at aligned steps
    f_text, o_text = present.terminal_diff(None, factual, other)
    assert f_text.plain == "[5][6]" + present.MARK + "[7][8]"
    assert o_text.plain == "[5][6]" + present.MARK + "[9][8]"


def test_html_escapes_and_shows_each_world():
    factual = _trace([5, 6, 0])
    page = present.html_diff(None, factual, {"a<b": _trace([5, 7, 0])})
    assert page.startswith("<!doctype html>") and "a&lt;b (diverges at token 1)" in page
    assert '<span class="ins">[7]</span>' in page and '<span class="del">[6]</span>' in page
