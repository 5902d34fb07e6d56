"""The paper's census study (§4.3): its prompt, a robust parser of census records, and the
tables of its report.

A census response is a JSON list of people between ``` fences, as the model wrote it: the
parser reads fenced or bare JSON, a list cut off mid-record (every complete record is kept),
keys with stray spaces, and incomes written as text ("$75,000", "75k").

Rows of a study (and of the paper's released `*_cf_changes.json` files) hold, per person and
intervention: `census_id`, `person_id`, `intervened_attribute` (Sex or Race), `effect` (total or
direct), `intervention` ([factual value, counterfactual value]) and `Income`, `Occupation`,
`Education`, each [factual, counterfactual, interventional] (the interventional may be absent).
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cfjax.experiments.folder import parse_rows

# The paper's prompt (Networks-Learning/counterfactual-llms, the census experiment).
SYSTEM = (
    "Return only the following information: Age, Sex, Citizenship, Race, Ethnicity, Marital "
    "Status, Number of Children, Occupation, Income, Education. For Race, choose only between "
    "following options: White American, Black or African American, American Indian or Alaska "
    "Native, Asian American, Native Hawaiian or Other Pacific Islander, Other or Two or more "
    "races (multiracial). For Ethinicity, choose only between following options: "
    'Non-Hispanic/Latino or Hispanic/Latino. Return a list in json format delimited by "```".'
)
QUERY = "Generate census data of 50 fictional people."
RACES = (
    "White American",
    "Black or African American",
    "American Indian or Alaska Native",
    "Asian American",
    "Native Hawaiian or Other Pacific Islander",
    "Other or Two or more races (multiracial)",
)
SEXES = ("Female", "Male")
COLUMNS = ("factual", "counterfactual", "interventional")


# --- parsing census text --------------------------------------------------------------------


def _body(text: str) -> int:
    """Where the JSON part starts: inside the first ``` fence (a language tag dropped), else at
    the first '['."""
    fence = re.search(r"```[a-zA-Z]*\s*\n?(.*?)(```|$)", text, re.S)
    if fence and "{" in fence.group(1):
        return fence.start(1)
    start = text.find("[")
    return max(start, 0)


def _objects(text: str, start: int) -> Iterable[tuple[int, int]]:
    """The [start, end) span of each complete top-level {...} of `text` from `start` on (strings
    respected, a closing fence ends the search), in order."""
    depth, begin, in_string, escaped = 0, 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == "`" and depth == 0 and text.startswith("```", i):
            return
        elif ch == "{":
            if depth == 0:
                begin = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                yield begin, i + 1


def parse_income(value: Any) -> int | None:
    """An income as an int: numbers as they are, "$75,000" -> 75000, "75k" -> 75000."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*\$?\s*([\d,]*\.?\d+)\s*([kK])?\s*(?:USD|dollars)?\s*", str(value))
    if not m:
        return None
    number = float(m.group(1).replace(",", ""))
    return int(number * 1000 if m.group(2) else number)


@dataclasses.dataclass(frozen=True)
class Record:
    """One census record: its [start, end) characters in the text and its fields (keys stripped
    of spaces, the income as an int)."""

    start: int
    end: int
    fields: dict


def records(text: str) -> list[Record]:
    """Every readable census record of `text`, in order (a damaged one is skipped, not fatal)."""
    out = []
    for a, b in _objects(text, _body(text)):
        try:
            record = json.loads(text[a:b])
        except json.JSONDecodeError:
            continue  # one damaged record does not lose the others
        if not isinstance(record, dict):
            continue
        record = {str(k).strip(): v for k, v in record.items()}
        if "Income" in record:
            record["Income"] = parse_income(record["Income"])
        out.append(Record(a, b, record))
    return out


def parse_people(text: str) -> list[dict]:
    """The census records in `text` (keys stripped of spaces, incomes as ints).

    Raises ValueError when no record can be read.
    """
    people = [r.fields for r in records(text)]
    if not people:
        raise ValueError(f"no census record could be parsed from the text {text[:60]!r}...")
    return people


def value_span(text: str, record: Record, key: str) -> tuple[int, int, int] | None:
    """Where the string value of `key` in `record` starts and ends, and where the text after it
    that closes the field (its quote, comma and newline: the paper's end-of-attribute token)
    ends; None if the key is absent or its value is not a string."""
    m = re.compile(r'"\s*' + re.escape(key) + r'\s*"\s*:\s*"([^"\\]*)(",?\n?)').search(
        text, record.start, record.end
    )
    return (m.start(1), m.end(1), m.end(2)) if m else None


def key_end(text: str, record: Record, key: str, after: int) -> int | None:
    """Where the value of `key` starts in `record` (right after its colon), if the key comes
    after character `after`: the direct effect forces the text up to there."""
    m = re.compile(r'"\s*' + re.escape(key) + r'\s*"\s*:').search(text, after, record.end)
    return m.end() if m else None


# --- the report's tables --------------------------------------------------------------------


def read_paper_data(directory: str | Path) -> list[dict]:
    """Rows from the paper's released `{effect}_{attribute}_cf_changes.json` files (pandas
    `to_json` column format), each with its `effect` added."""
    directory = Path(directory)
    # The released data keeps them in `bias/`: the data's own folder is accepted as well.
    files = sorted(directory.glob("*_cf_changes.json")) or sorted(directory.glob("*/*_cf_changes.json"))  # fmt: skip
    if not files:
        raise FileNotFoundError(
            f"{directory}: no *_cf_changes.json files of the paper's data, in it or one folder "
            "down (the released data has them in bias/)"
        )
    rows = []
    for file in files:
        effect = file.name.split("_", 1)[0]
        try:
            columns = json.loads(file.read_text(encoding="utf-8"))
            index = list(columns["Income"])
            rows += [{"effect": effect, **{c: columns[c][i] for c in columns}} for i in index]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{file}: not the paper's cf_changes format ({e})") from None
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a study folder's `rows.jsonl` (or of such a file)."""
    path = Path(path)
    file = path / "rows.jsonl" if path.is_dir() else path
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not UTF-8 text") from None
    except OSError as e:
        raise FileNotFoundError(f"{file}: cannot read the study's rows ({e.strerror})") from None
    return parse_rows(file, "\n".join(lines))


def _groups(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for n, r in enumerate(rows, 1):
        missing = [k for k in ("intervention", "intervened_attribute", "effect") if k not in r]
        if missing or not (isinstance(r["intervention"], list) and len(r["intervention"]) == 2):
            raise ValueError(f"row {n} is not a census row: {'no ' + ', '.join(missing) if missing else 'intervention is not [factual, counterfactual]'}")  # fmt: skip
        a, b = r["intervention"]
        groups.setdefault((r["intervened_attribute"], r["effect"], a, b), []).append(r)
    return dict(sorted(groups.items()))


def _median_nonzero(values: Iterable[Any]) -> float | None:
    kept = [v for v in (parse_income(x) for x in values) if v]  # zero (and unreadable) dropped
    return statistics.median(kept) if kept else None


def income_table(rows: Sequence[dict]) -> list[dict]:
    """Median income per intervention group: `n` rows, each median without that column's zero
    incomes (the paper's rule; None where a column is absent)."""
    out = []
    for (attribute, effect, a, b), group in _groups(rows).items():
        row = {"attribute": attribute, "effect": effect, "from": a, "to": b, "n": len(group)}
        for col, name in enumerate(COLUMNS):
            values = [r["Income"][col] for r in group if len(r["Income"]) > col]
            row[f"median_{name}"] = _median_nonzero(values) if values else None
        out.append(row)
    return out


def occupation_changes(rows: Sequence[dict]) -> list[dict]:
    """Share of each group's records whose occupation differs from the factual one (records
    without an occupation on either side are left out)."""
    out = []
    for (attribute, effect, a, b), group in _groups(rows).items():
        row = {"attribute": attribute, "effect": effect, "from": a, "to": b, "n": len(group)}
        for col, name in ((1, "counterfactual"), (2, "interventional")):
            pairs = [
                r["Occupation"]
                for r in group
                if len(r["Occupation"]) > col
                and None not in (r["Occupation"][0], r["Occupation"][col])
            ]
            row[f"changed_{name}"] = (
                sum(_norm(p[0]) != _norm(p[col]) for p in pairs) / len(pairs) if pairs else None
            )
        out.append(row)
    return out


def _norm(s: Any) -> str:
    return str(s).strip().lower()


# Education as an ordinal level, most specific wording first; unknown wordings are missing.
_LEVELS = (
    (("doctor", "phd", "ph.d", "medical", "dental", "law", "juris", "professional"), 5),
    (("master", "mba"), 4),
    (("bachelor", "undergraduate"), 3),
    (("associate", "some college", "vocational", "trade", "certificate", "college"), 2),
    (("high school", "ged", "diploma"), 1),
    (("none", "no formal", "less than high school", "elementary"), 0),
)


def education_level(text: Any) -> int | None:
    """An education description as a level 0 (none) .. 5 (doctoral / professional), or None."""
    if text is None:  # a record without the field (not the word "none")
        return None
    t = _norm(text)
    for words, level in _LEVELS:
        if any(w in t for w in words):
            return level
    return None


def education_change_by_race(rows: Sequence[dict], column: int = 1) -> dict[tuple[str, str], tuple[float, int]]:  # fmt: skip
    """Mean change of the education level (column 1: counterfactual, 2: interventional, minus
    the factual) of the total-effect Race interventions, and the records it averages, by
    (from race, to race)."""
    out = {}
    for (attribute, effect, a, b), group in _groups(rows).items():
        if attribute != "Race" or effect != "total":
            continue
        deltas = [
            education_level(r["Education"][column]) - education_level(r["Education"][0])
            for r in group
            if len(r["Education"]) > column
            and education_level(r["Education"][0]) is not None
            and education_level(r["Education"][column]) is not None
        ]
        if deltas:
            out[(a, b)] = (sum(deltas) / len(deltas), len(deltas))
    return out
