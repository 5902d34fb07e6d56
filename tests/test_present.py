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


# Issue 32: "changed" is defined once, by response position under the counterfactual's alignment.
# Hand-made token lists: (factual, other, alignment, factual flags, other flags, first).
CASES = {
    "sampler change, first token differs": (
        [5, 6, 7], [9, 6, 7], {"edit_start": 0, "resume_at": 0, "aligned_to": 0},
        [True, False, False], [True, False, False], 0),
    "sampler change, later token": (
        [5, 6, 7, 8], [5, 6, 9, 8], None, [False, False, True, False], [False, False, True, False], 2),
    "replaced token (auto intervention), same text afterwards": (
        [1, 2, 3, 4], [1, 2, 9, 4], {"edit_start": 2, "resume_at": 3, "aligned_to": 3},
        [False, False, True, False], [False, False, True, False], 2),
    "null edit: the edited token is still marked": (
        [1, 2, 3, 4], [1, 2, 3, 4], {"edit_start": 2, "resume_at": 3, "aligned_to": 3},
        [False, False, True, False], [False, False, True, False], 2),
    "insertion keeps the factual tail aligned": (
        [1, 2, 3, 4, 5], [1, 2, 8, 9, 3, 4, 5], {"edit_start": 2, "resume_at": 4, "aligned_to": 2},
        [False] * 5, [False, False, True, True, False, False, False], 2),
    "deletion: the removed factual token, nothing new": (
        [1, 2, 3, 4, 5], [1, 2, 4, 5], {"edit_start": 2, "resume_at": 2, "aligned_to": 3},
        [False, False, True, False, False], [False] * 4, 4),
    "a later token sampled otherwise, compared at its aligned step": (
        [1, 2, 3, 4, 5, 6], [1, 2, 8, 3, 7, 5, 6], {"edit_start": 2, "resume_at": 3, "aligned_to": 2},
        [False, False, False, True, False, False], [False, False, True, False, True, False, False], 2),
}  # fmt: skip


def test_changes_by_aligned_position():
    for name, (f, o, align, want_f, want_o, first) in CASES.items():
        got = present.changes(_trace(f), _trace(o, align))
        assert got == (want_f, want_o, first), name


def test_the_mark_stands_before_the_first_changed_token_in_every_view():
    factual = _trace([5, 6, 7, 8, 0])
    other = _trace([9, 6, 7, 8, 0], {"edit_start": 0, "resume_at": 0, "aligned_to": 0})
    f_text, o_text = present.terminal_diff(None, factual, other)
    assert o_text.plain.startswith(present.MARK + "[9]") and f_text.plain.startswith(present.MARK)
    page = present.html_diff(None, factual, {"cf": other})
    assert "cf (diverges at token 0)" in page and '<span class="ins">[9]</span>' in page


def test_interventions_in_words():
    words = {
        "replace 'Ahab' by 'Maeve'": {"type": "ReplaceText", "old": "Ahab", "new": "Maeve", "occurrence": 1},
        "replace token 3 by [7]": {"type": "ReplaceTokens", "position": 3, "tokens": [7], "count": None},
        "insert [7, 8] at 2": {"type": "ReplaceTokens", "position": 2, "tokens": [7, 8], "count": 0},
        "delete 'x' (occurrence 2)": {"type": "DeleteText", "text": "x", "occurrence": 2},
        "sampler: temperature → 0.3": {"type": "ChangeSampler", "temperature": 0.3},
        "edit the prompt: prompt → 'p'": {"type": "EditPrompt", "prompt": "p", "system": None, "tokens": None},
        "automatic intervention at token 4 ([9]), top-p 0.9": {"type": "AutoIntervention", "position": 4, "top_p": 0.9, "seed": 0, "token": 9},
    }  # fmt: skip
    for want, record in words.items():
        assert present.describe(record) == want


def test_the_html_export_says_what_each_world_is():
    factual = _trace([5, 6, 7, 0])
    other = _trace([5, 9, 7, 0], {"edit_start": 1, "resume_at": 2, "aligned_to": 2})
    other.interventions = [{"type": "ReplaceTokens", "position": 1, "tokens": [9], "count": None}]
    page = present.html_diff(None, factual, {"counterfactual": other})
    assert f'<span class="mark">{present.MARK}</span><span class="ins">[9]</span>' in page
    assert "replace token 1 by [9]" in page and "the factual run" in page
    assert "m: temperature 1.0, mechanism gumbel, seed 0" in page and " UTC by cfjax" in page
