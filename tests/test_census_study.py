"""`cfjax experiment census` (issue 16): the interventions it makes on the paper's census text,
its rows against the library's counterfactuals on SmolLM2, resuming, and bad input."""

from __future__ import annotations

import json

import pytest

from cfjax.cli import main
from cfjax.experiments import census, census_study


def _apply(text: str, edit) -> str:
    """`ReplaceText` semantics on a plain string: the occurrence-th (overlapping) `old` -> `new`."""
    at = -1
    for _ in range(edit.occurrence):
        at = text.find(edit.old, at + 1)
    assert at >= 0
    return text[:at] + edit.new + text[at + len(edit.old) :]


def test_edits_on_the_papers_census(shared_data):
    text = json.loads((shared_data / "paper-llama3/census1/factual.json").read_text())["response"]
    records = census.records(text)
    people = census.parse_people(text)
    assert [r.fields for r in records] == people and len(people) == 48
    for r in records:  # each record's span is the text of that record
        assert json.loads(text[r.start : r.end]).get("Age") == r.fields.get("Age")
    settings = census_study.Settings(model_id="m")
    counts = {"total": 0, "direct": 0}
    for j in (0, 1, 17, 46):  # person 46 wrote the key " Race"
        edits = census_study._edits(text, 0, records[j], settings)
        for e in edits:
            counts[e.effect] += 1
            edited = census.parse_people(_apply(text, e.intervention))
            assert edited[j][e.attribute] == e.new != people[j][e.attribute] == e.old
            # Nothing else changes: not the other people, not this person's other fields.
            assert edited[:j] + edited[j + 1 :] == people[:j] + people[j + 1 :]
            assert {k: v for k, v in edited[j].items() if k != e.attribute} == {
                k: v for k, v in people[j].items() if k != e.attribute
            }
            forced = e.intervention.new
            if e.effect == "direct":  # the mediators are forced up to the outcome's value
                outcome = census_study.OUTCOME[e.attribute]
                assert forced.endswith(f'"{outcome}":') and forced.startswith(e.new + '",')
            else:  # the field's closing quote, comma and newline too (the paper's)
                assert forced in (e.new + '",\n', e.new + '"')
        # Each other value of Sex (1) and Race (5), total and direct.
        assert sorted((e.attribute, e.effect) for e in edits) == sorted(
            [("Sex", "total"), ("Sex", "direct")] + [("Race", "total"), ("Race", "direct")] * 5
        )
    assert counts == {"total": 24, "direct": 24}
    # An edit never reaches into text before the response (the one-shot example).
    assert census_study._edits(text, records[1].start + 1, records[0], settings) == []


def test_one_shot_start_is_the_papers_first_record(shared_data):
    text = json.loads((shared_data / "paper-llama3/census1/factual.json").read_text())["response"]
    start = census_study.Settings(model_id="m", one_shot=True).response_start
    assert census.parse_people(start) == [census.parse_people(text)[0]]
    assert text.split("```")[1].startswith(start.split("```")[1][: -len('  {\n    "Age":') - 1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attributes", "Age"], "attributes: unknown ['Age']; valid: Sex, Race"),
        (["--effects", "indirect"], "effects: unknown ['indirect']"),
        (["--people", "0"], "--people: must be >= 1"),
        (["--seeds", "1,1"], "seeds must be distinct"),
        (["--seeds", "a"], "--seeds: not an integer: 'a'"),
        (["--temperature", "0"], "--temperature must be > 0"),
    ],
)
def test_census_bad_inputs(args, message, tmp_path, capsys):
    rc = main(["experiment", "census", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_census_with_no_record_is_a_clear_error(tmp_path):
    """A tiny random model writes no census record: the study says so and names the files."""
    import jax
    from test_counterfactual import _train_spm

    import cfjax
    from cfjax.core.model import init_params

    config = cfjax.preset("tiny")
    lm = cfjax.LM(config, init_params(config, jax.random.key(0)), model_id="tiny")
    lm = lm.replace(tokenizer=_train_spm(tmp_path, seed=0))
    settings = census_study.Settings(model_id="tiny", seeds=(0,), people=1, max_new_tokens=8)
    with pytest.raises(ValueError, match="no census record could be parsed .*seeds \\[0\\]"):
        census_study.run(lm, settings, tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "census-0.json").is_file()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_census_command_on_smollm2(tmp_path, capsys):
    """End to end: rows in the paper's format, equal to the library's own counterfactuals, the
    same after a killed run resumes, and a report."""
    import cfjax
    from cfjax.causal.trace import Trace

    args = ["experiment", "census", "--seeds", "0", "--people", "2", "--one-shot",
            "--max-new-tokens", "140"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    rows = _rows(tmp_path / "a" / "rows.jsonl")
    assert {(r["intervened_attribute"], r["effect"]) for r in rows} >= {("Sex", "total"), ("Race", "total")}  # fmt: skip
    for r in rows:
        assert all(len(r[k]) == 3 for k in census_study.MEASURED)
        assert r["census_id"] == 0 and r["intervention"][0] != r["intervention"][1]
        assert f'"{r["intervened_attribute"]}": "{r["intervention"][1]}"' in r["counterfactual_record"]  # fmt: skip
    # One row again by hand, uncapped: the capped run wrote that counterfactual's record.
    lm = cfjax.load("smollm2-135m-instruct")
    factual = Trace.from_json(tmp_path / "a" / "census-0.json")
    settings = census_study.Settings(model_id=lm.model_id, seeds=(0,), people=2, one_shot=True,
                                     max_new_tokens=140)  # fmt: skip
    start = settings.response_start
    person = census_study._people(settings, factual)
    r = next(r for r in rows if r["effect"] == "total")
    record = person[r["person_id"]]
    edit = next(
        e.intervention
        for e in census_study._edits(start + factual.text, len(start), record, settings)
        if (e.attribute, e.effect, e.new) == (r["intervened_attribute"], "total", r["intervention"][1])
    )  # fmt: skip
    cf = cfjax.counterfactual(lm, factual, edit)
    fields, text = census_study._measured(start + cf.text, record.start)
    if r["counterfactual_record"].endswith("}"):  # complete within the cap: the same record
        assert text == r["counterfactual_record"]
        assert [fields[k] for k in census_study.MEASURED] == [r[k][1] for k in census_study.MEASURED]  # fmt: skip
    else:  # cut by the cap: a prefix of the record
        assert text.startswith(r["counterfactual_record"])
    # Killed after the first person, then resumed: the rows of the uninterrupted run.
    calls = []

    def crash(unit):
        calls.append(unit)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the settings the command makes
        census_study.run(lm, settings, tmp_path / "b", progress=False, on_unit=crash)
    assert 0 < len(_rows(tmp_path / "b" / "rows.jsonl")) < len(rows)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(_rows(tmp_path / "b" / "rows.jsonl"), key=key) == sorted(rows, key=key)
    assert "| Sex | total |" in capsys.readouterr().out  # each study run ends with its table
    assert main(["experiment", "census-report", str(tmp_path / "b"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert sum(t["n"] for t in table) == len(rows)
