"""The census study's parser and report (issue 16, part): against the paper's released data."""

from __future__ import annotations

import json
import shutil

import pytest

from cfjax.cli import main
from cfjax.experiments import census

RECORD = {"Age": 30, "Sex": "Female", "Race": "Asian American", "Income": 50000,
          "Occupation": "Nurse", "Education": "Bachelor's Degree"}  # fmt: skip


def test_the_parser_reads_every_person_of_the_papers_censuses(shared_data):
    counts = []
    for i in (1, 2, 3):
        response = json.loads((shared_data / f"paper-llama3/census{i}/factual.json").read_text())
        people = census.parse_people(response["response"])
        counts.append(len(people))
        assert all("Race" in p and "Sex" in p and isinstance(p["Income"], int) for p in people)
    assert counts == [48, 45, 34]  # 127; census1 person 46 wrote the key " Race"


@pytest.mark.parametrize(
    "text, n",
    [
        ("Here:\n```json\n[" + json.dumps(RECORD) + "]\n```\nDone.", 1),
        ("```\n[" + json.dumps(RECORD) + ", " + json.dumps(RECORD) + "]\n```", 2),
        ("[" + json.dumps(RECORD) + ", " + json.dumps(RECORD)[:40], 1),  # cut mid-record
        ("no fences: [" + json.dumps(RECORD) + "] trailing", 1),
        ('```json\n[{"Sex": "Male", "Occupation": "Chef {head}", "Income": "$75,000"}, {"Age": }]', 1),
    ],
)  # fmt: skip
def test_the_parser_is_robust(text, n):
    people = census.parse_people(text)
    assert len(people) == n


def test_stray_spaces_and_text_incomes():
    people = census.parse_people('[{" Race ": "White American", "Income": "$75,000"}, '
                                 '{"Race": "Asian American", "Income": "82.5k"}]')  # fmt: skip
    assert [p["Race"] for p in people] == ["White American", "Asian American"]
    assert [p["Income"] for p in people] == [75000, 82500]
    assert census.parse_income("n/a") is None and census.parse_income(True) is None


def test_text_with_no_record_is_a_clear_error():
    with pytest.raises(ValueError, match="no census record could be parsed"):
        census.parse_people("I cannot generate census data.")


def test_the_income_table_reproduces_the_paper(shared_data):
    rows = census.read_paper_data(shared_data / "paper-llama3/bias")
    assert census.read_paper_data(shared_data / "paper-llama3") == rows  # the data's own folder
    table = {
        (r["attribute"], r["effect"], r["from"], r["to"]): r for r in census.income_table(rows)
    }
    fm, mf = table[("Sex", "total", "Female", "Male")], table[("Sex", "total", "Male", "Female")]
    assert (fm["n"], fm["median_factual"], fm["median_counterfactual"], fm["median_interventional"]) == (55, 60000, 70000, 80000)  # fmt: skip
    assert (mf["n"], mf["median_factual"], mf["median_counterfactual"], mf["median_interventional"]) == (72, 60000, 50000, 60000)  # fmt: skip
    race = [r for r in table.values() if r["attribute"] == "Race"]
    assert len(race) == 30 and all(r["median_interventional"] is None for r in race)


def test_education_levels():
    levels = [census.education_level(t) for t in ("High School Diploma", "College",
              "Associate's Degree", "Bachelor's degree", "Master's Degree", "Doctorate",
              "Juris Doctor", "Dental degree", "Underwater basket weaving")]  # fmt: skip
    assert levels == [1, 2, 2, 3, 4, 5, 5, 5, None]


def test_census_report_command(shared_data, tmp_path, capsys):
    bias = shared_data / "paper-llama3/bias"
    assert main(["experiment", "census-report", "--paper-data", str(bias), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"attribute", "effect", "from", "to", "n", "median_factual", "median_counterfactual",
            "median_interventional"} <= set(rows[0])  # fmt: skip
    assert main(["experiment", "census-report", "--paper-data", str(bias), "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "education_by_race.png", "income_sex.png"}  # fmt: skip
    assert (
        "| Sex | total | Female | Male | 55 | 60k | 70k | 80k |"
        in (tmp_path / "r/report.md").read_text()
    )
    assert "Figure `education_by_race.png`" in (tmp_path / "r/report.md").read_text()
    # A study folder's rows.jsonl (the same rows, one per line) gives the same table.
    study = tmp_path / "study"
    study.mkdir()
    (study / "rows.jsonl").write_text(
        "\n".join(json.dumps(r) for r in census.read_paper_data(bias))
    )
    capsys.readouterr()
    assert main(["experiment", "census-report", str(study), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    # A Sex-only study: its report names only the figure it has.
    (study / "rows.jsonl").write_text(
        "\n".join(json.dumps(r) for r in census.read_paper_data(bias) if r["intervened_attribute"] == "Sex")
    )  # fmt: skip
    assert main(["experiment", "census-report", str(study), "--out", str(study)]) == 0
    report = (study / "report.md").read_text()
    assert "income_sex.png" in report and "education_by_race.png" not in report
    assert not (study / "education_by_race.png").exists() and (study / "income_sex.png").exists()


def test_census_report_bad_inputs(shared_data, tmp_path, capsys):
    data = tmp_path / "data"  # a copy: a report written into the data folder must not touch ours
    shutil.copytree(shared_data / "paper-llama3/bias", data / "bias")
    (tmp_path / "file.txt").write_text("x")
    for args, message in (
        (["--paper-data", str(tmp_path / "file.txt")], "no *_cf_changes.json files"),
        ([str(tmp_path)], "cannot read the study's rows"),
        ([], "give a study folder or --paper-data DIR"),
        (
            ["--paper-data", str(data), "--out", str(tmp_path / "file.txt")],
            "is a file, not a folder",
        ),
        (["--paper-data", str(data), "--out", str(data)], "inside the paper's data folder"),
        (
            ["--paper-data", str(data / "bias"), "--out", str(data / "bias/r")],
            "inside the paper's data folder",
        ),
    ):
        assert main(["experiment", "census-report", *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in data.rglob("*")) == ["bias", *sorted(p.name for p in (shared_data / "paper-llama3/bias").iterdir())]  # fmt: skip


def test_report_figures_say_what_they_show(shared_data):
    """Subtitles with model, n and effect; each series in its own colour everywhere (the
    interventional one blue); the income axis ends at the data; heatmap cells give their n, in
    white on the dark ends of the colour map."""
    from matplotlib.colors import to_rgba

    from cfjax.experiments import report

    rows = census.read_paper_data(shared_data / "paper-llama3/bias")
    figs = report.figures(rows, "Llama 3 8B-Instruct")
    income = figs["income_sex"]
    titles = [ax.get_title() for ax in income.axes]
    assert titles == ["Llama 3 8B-Instruct\nn = 55 · Female → Male, total effect",
                      "Llama 3 8B-Instruct\nn = 72 · Male → Female, total effect"]  # fmt: skip
    top = max(census.parse_income(r["Income"][c]) or 0 for r in rows if r["intervened_attribute"] == "Sex" for c in range(len(r["Income"]))) / 1000  # fmt: skip
    for ax in income.axes:
        colours = {p.get_label(): p.get_edgecolor() for p in ax.patches}
        assert colours["interventional"] == to_rgba("tab:blue")
        assert colours["factual"] != colours["counterfactual"] != colours["interventional"]
        assert top <= ax.get_xlim()[1] <= top + 20
    heat = figs["education_by_race"].axes[0]
    texts = [t for t in heat.texts if "n = " in t.get_text()]
    assert len(texts) == 30
    assert sum(int(t.get_text().split("n = ")[1]) for t in texts) == int(heat.get_title().split("n = ")[1].split(" ·")[0])  # fmt: skip
    assert {t.get_color() for t in texts} == {"white", "black"}
    for fig in figs.values():
        fig.clf()
