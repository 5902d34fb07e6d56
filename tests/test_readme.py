"""The README's examples (`cfjax.core.sample`, abduction, model interventions, conversations,
attribution, ...) run as shown, on the embedded SmolLM2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### `cfjax.core.sample`"


def _blocks(heading: str = SECTION) -> tuple[str, list[str]]:
    """(the section's python code, the lines of the output block shown after it)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```python\n.*?```\s*```\n(.*?)```", section, re.S).group(1)
    return code, shown.strip().splitlines()


@pytest.mark.slow
def test_core_sample_example_runs_as_shown(capsys):
    import cfjax

    code, shown = _blocks()
    lm = cfjax.load("smollm2-135m-instruct")
    exec(compile(code, str(README), "exec"), {"cfjax": cfjax, "lm": lm})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(shown)
    assert "equal to generate: True" in printed
    # The shape and the greedy column (one answer for all 64 keys) do not depend on rounding;
    # the sampled texts do only at float32 near-ties, which another CPU may round otherwise.
    assert printed[0].startswith("(64, 4, 32) distinct answers per temperature: [1, ")
    assert repr(printed[1]) == printed[3]  # the base model of the ensemble is the grid's row
    differs = [i for i, (a, b) in enumerate(zip(printed, shown, strict=True)) if a != b]
    assert len(differs) <= 1, f"the README shows other output than the example prints: {differs}"


@pytest.mark.slow
def test_abduction_example_runs_as_shown(capsys):
    code, shown = _blocks("### Counterfactuals of observed text")
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(shown) and printed[0] == shown[0] == "True 26 observed tokens"
    differs = [i for i, (a, b) in enumerate(zip(printed, shown, strict=True)) if a != b]
    assert len(differs) <= 1, f"the README shows other output than the example prints: {differs}"


def _run_on_smollm2(heading: str, capsys) -> tuple[list[str], list[str]]:
    """(printed lines, shown lines) of a section's example run with `cfjax` and `lm` (SmolLM2),
    after checking that at most one line differs from the README (a float32 near-tie that
    another CPU may round otherwise)."""
    import cfjax

    code, shown = _blocks(heading)
    lm = cfjax.load("smollm2-135m-instruct")
    exec(compile(code, str(README), "exec"), {"cfjax": cfjax, "lm": lm})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(shown)
    differs = [i for i, (a, b) in enumerate(zip(printed, shown, strict=True)) if a != b]
    assert len(differs) <= 1, f"the README shows other output than the example prints: {differs}"
    return printed, shown


@pytest.mark.slow
def test_model_interventions_example_runs_as_shown(capsys):
    printed, _ = _run_on_smollm2("### Interventions on the model", capsys)
    assert printed[0].split()[1:] == printed[4].split()[1:]  # the int8 variant kept the answer


@pytest.mark.slow
def test_speculative_example_runs_as_shown(capsys):
    printed, _ = _run_on_smollm2("### Speculative decoding", capsys)
    assert printed[0] == "same tokens: True" and printed[2] == "same counterfactual: True"


@pytest.mark.slow
def test_batch_invariance_example_runs_as_shown(capsys):
    import jax

    import cfjax

    code, shown = _blocks("### Batch invariance")
    exec(compile(code, str(README), "exec"), {"cfjax": cfjax, "jax": jax})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == shown
    assert printed[-1] == "same tokens: True same log-probs, bit for bit: True"


@pytest.mark.slow
def test_conversation_example_runs_as_shown(capsys):
    printed, _ = _run_on_smollm2("### Conversations", capsys)
    assert printed[0].split(":")[0] == "turn 0, factual" and len(printed) == 7
    assert printed[-1] == "null edit at turn 1, every turn the same: True"


@pytest.mark.slow
def test_attribution_example_runs_as_shown(capsys):
    printed, _ = _run_on_smollm2("### Attribution", capsys)
    rows = [line.split() for line in printed[1:]]
    assert [r[0] for r in rows if r[-1] == "False"] == ["Ahab"]  # the only word "Ahab" needs
    assert max(float(r[2]) for r in rows) == float(next(r[2] for r in rows if r[0] == "Ahab"))


def test_api_at_a_glance_names_exist_and_say_what_their_docstrings_say():
    """Every row of the README's API table names a public object whose docstring's first
    sentence is the row's summary; and the table covers every top-level function `cfjax`
    exports that a trace goes through."""
    import cfjax

    text = README.read_text(encoding="utf-8")
    table = text[text.index("## API at a glance") : text.index("## Cite")]
    rows = re.findall(r"^\| `cfjax\.([\w.]+)` \| (.*) \|$", table, re.M)
    assert len(rows) >= 20
    for name, summary in rows:
        obj = cfjax
        for part in name.split("."):
            obj = getattr(obj, part)
        doc = " ".join((obj.__doc__ or "").split())
        assert summary.replace("\\|", "|") == doc.split(". ")[0].rstrip(".") + ".", name
    listed = {name for name, _ in rows}
    for name in ("generate", "counterfactual", "counterfactuals", "interventional",
                 "interventionals", "abduct", "coupled", "load", "core.sample", "converse",
                 "attribute"):  # fmt: skip
        assert name in listed, name
