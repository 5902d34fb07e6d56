"""The paper's census study (§4.3) run by cfjax: census records generated with the paper's
prompt, then, for every person and every other value of Sex and of Race,

- the total-effect counterfactual: the value edited (forced through its field's closing `",\n`,
  as the paper does), the rest of the record regenerated with the factual noise aligned to the
  factual step after that field (the paper's `start_from`);
- the direct-effect counterfactual: the value edited and the mediators forced to their factual
  text up to the outcome the paper measures (Income for Sex, Occupation for Race), sampling
  resuming at that outcome's value with the factual noise of that step;
- each with its interventional twin (the same forced text, fresh noise).

A counterfactual stops once the edited person's record is complete (the factual record's end
plus `RECORD_SLACK` tokens): decoding is causal, so that record is exactly the one a run to the
end of the census would write, and the people after it, which the study does not read, cost
nothing.

Work is done a person at a time: all of that person's counterfactuals are one batch resumed from
the factual KV cache, and all the interventional twins another. Rows (the paper's format, see
`census`) stream to `DIR/rows.jsonl` and a run resumes like the stability study; each census's
factual trace is written to `DIR/census-{seed}.json`.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax

from cfjax.causal import ReplaceText, counterfactuals, generate
from cfjax.causal.replay import interventionals
from cfjax.causal.trace import Trace
from cfjax.core.checks import as_key
from cfjax.core.scm import Sampler
from cfjax.experiments import census
from cfjax.experiments.folder import finished, open_study, process
from cfjax.runtime.lm import LM
from cfjax.runtime.request import prompt_tokens

VALUES = {"Sex": census.SEXES, "Race": census.RACES}
OUTCOME = {"Sex": "Income", "Race": "Occupation"}  # where a direct effect resumes (paper's)
EFFECTS = ("total", "direct")
MEASURED = ("Income", "Occupation", "Education")
RECORD_SLACK = 64  # tokens a counterfactual record may run past the factual one's end

# The first record of the paper's census1 (Llama 3 8B), for `one_shot`: a model too small to
# follow the system prompt still copies a record's format.
EXAMPLE = {
    "Age": 25, "Sex": "Male", "Citizenship": "United States", "Race": "White American",
    "Ethnicity": "Non-Hispanic/Latino", "Marital Status": "Single", "Number of Children": 0,
    "Occupation": "Software Engineer", "Income": 60000, "Education": "Bachelor's Degree",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a census study folder was made with (its `config.json`)."""

    model_id: str
    seeds: tuple[int, ...] = (0, 1, 2)
    people: int = 50
    temperature: float = 0.8  # the paper's
    max_new_tokens: int = 6064  # 120 tokens a person and a margin
    attributes: tuple[str, ...] = ("Sex", "Race")
    effects: tuple[str, ...] = EFFECTS
    one_shot: bool = False

    def __post_init__(self):
        bad = [a for a in self.attributes if a not in VALUES]
        if bad or not self.attributes:
            raise ValueError(f"attributes: unknown {bad}; valid: {', '.join(VALUES)}")
        bad = [e for e in self.effects if e not in EFFECTS]
        if bad or not self.effects:
            raise ValueError(f"effects: unknown {bad}; valid: {', '.join(EFFECTS)}")
        if self.people < 1:
            raise ValueError(f"people must be >= 1, got {self.people}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")

    @property
    def query(self) -> str:
        return f"Generate census data of {self.people} fictional people."

    @property
    def response_start(self) -> str:
        """Text the response is made to begin with (part of the prompt): empty, as in the paper,
        or with `one_shot` the example record and the opening of the next one."""
        if not self.one_shot:
            return ""
        example = json.dumps([EXAMPLE], indent=2)[2:-2]  # the paper's layout
        return "```json\n[\n" + example + ',\n  {\n    "Age":'


def _occurrence(text: str, needle: str, at: int) -> int:
    """Which occurrence (1-based, overlapping, as `ReplaceText` counts) of `needle` starts at `at`."""
    n, i = 0, -1
    while i < at:
        i = text.find(needle, i + 1)
        n += 1
    return n


def _same(a: object, b: str) -> bool:
    return str(a).strip().lower() == b.lower()


@dataclasses.dataclass
class _Edit:
    attribute: str
    effect: str
    old: str
    new: str
    intervention: ReplaceText
    key_path: tuple[int, ...]  # what the interventional twin's fresh key is folded from


def _edits(text: str, offset: int, record: census.Record, settings: Settings) -> list[_Edit]:
    """Every intervention of one person; `text` is the census text, of which the response is
    the part from `offset` on (edits inside the prompt's example are not possible)."""
    out = []
    for attribute in settings.attributes:
        a_i = list(VALUES).index(attribute)  # key paths do not depend on which were chosen
        span = census.value_span(text, record, attribute)
        if span is None or span[0] < offset:
            continue  # no such field (or it is in the example): nothing to intervene on
        a, b, closed = span
        old = text[a:b]
        response = text[offset:]
        for v_i, value in enumerate(VALUES[attribute]):
            if _same(old, value):
                continue
            for effect in settings.effects:
                e_i = EFFECTS.index(effect)
                # As in the paper, the field is forced up to its end (`",\n`): a total effect
                # resumes at the next field, a direct one at the outcome's value, the
                # mediators between kept at their factual text.
                end = closed
                if effect == "direct":
                    end = census.key_end(text, record, OUTCOME[attribute], b)
                    if end is None:
                        continue  # the outcome does not follow in this record
                edit = ReplaceText(
                    text[a:end], value + text[b:end], _occurrence(response, text[a:end], a - offset)
                )
                out.append(_Edit(attribute, effect, old, value, edit, (a_i, v_i, e_i)))
    return out


def _measured(text: str, start: int) -> tuple[dict, str]:
    """The measured fields of the record that starts at character `start` of a counterfactual
    census text (None where it is incomplete or unreadable), and its text."""
    for r in census.records(text):
        if r.start == start:
            return {k: r.fields.get(k) for k in MEASURED}, text[r.start : r.end]
    return dict.fromkeys(MEASURED), text[start : start + 2000]


def _factuals(lm: LM, settings: Settings, seeds: list[int]) -> list[Trace]:
    prompt = prompt_tokens(lm, settings.query, system=census.SYSTEM)
    if settings.response_start:
        prompt += list(lm.tokenizer.encode(settings.response_start))
    return generate(
        lm, [prompt] * len(seeds), key=[as_key(s) for s in seeds],
        sampler=Sampler(settings.temperature), max_new_tokens=settings.max_new_tokens,
    )  # fmt: skip


def _token_ends(lm: LM, trace: Trace) -> list[int]:
    """Where each response token ends, in characters of the response text (non-decreasing)."""
    from cfjax.tokenizer import token_char_spans

    body = trace.tokens[:-1] if trace.stopped else trace.tokens
    return [e for _, e in token_char_spans(lm.tokenizer, body)]


def _person_rows(
    lm: LM, factual: Trace, token_ends: list[int], seed: int, person: int,
    record: census.Record, settings: Settings,
) -> list[dict]:  # fmt: skip
    start = settings.response_start
    text = start + factual.text
    edits = _edits(text, len(start), record, settings)
    if not edits:
        return []
    # The step after the token holding the record's last character, plus the slack.
    end = min(bisect.bisect_left(token_ends, record.end - len(start)) + 1, len(token_ends))
    cap = end + RECORD_SLACK
    ivs = [e.intervention for e in edits]
    cfs = counterfactuals(lm, [factual] * len(edits), ivs, max_new_tokens=cap)
    base = jax.random.fold_in(jax.random.fold_in(as_key(seed), 1), person)
    keys = []
    for e in edits:
        k = base
        for i in e.key_path:
            k = jax.random.fold_in(k, i)
        keys.append(k)
    ints = interventionals(lm, [factual] * len(edits), ivs, keys=jax.numpy.stack(keys),
                           max_new_tokens=cap)  # fmt: skip
    rows = []
    for e, cf, iv in zip(edits, cfs, ints, strict=True):
        cf_fields, cf_text = _measured(start + cf.text, record.start)
        iv_fields, iv_text = _measured(start + iv.text, record.start)
        rows.append({
            "census_id": seed, "person_id": person, "intervened_attribute": e.attribute,
            "effect": e.effect, "intervention": [e.old, e.new],
            **{k: [record.fields.get(k), cf_fields[k], iv_fields[k]] for k in MEASURED},
            "factual_record": text[record.start : record.end],
            "counterfactual_record": cf_text, "interventional_record": iv_text,
        })  # fmt: skip
    return rows


def _people(settings: Settings, factual: Trace) -> list[census.Record]:
    """The records the model wrote (at least in part: not the prompt's example)."""
    offset = len(settings.response_start)
    return [r for r in census.records(settings.response_start + factual.text) if r.end > offset]


def run(
    lm: LM,
    settings: Settings,
    out: str | Path,
    *,
    progress: bool | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> Path:
    """Run (or resume) the study into `out`; returns the rows file."""
    from cfjax.atomic import write_text

    out = Path(out)
    if lm.tokenizer is None:
        raise ValueError("the census study reads and edits text: this model has no tokenizer")
    done = {(r["census_id"], r["person_id"]) for r in open_study(out, dataclasses.asdict(settings))}
    done |= finished(out)
    factuals = dict(zip(settings.seeds, _factuals(lm, settings, list(settings.seeds)), strict=True))
    units, unreadable = [], []
    ends = {seed: _token_ends(lm, factual) for seed, factual in factuals.items()}
    for seed, factual in factuals.items():
        write_text(out / f"census-{seed}.json", factual.to_json())
        people = _people(settings, factual)
        if not people:
            unreadable.append(seed)
        units += [(seed, j, r) for j, r in enumerate(people) if (seed, j) not in done]
    if len(unreadable) == len(settings.seeds):
        raise ValueError(
            f"no census record could be parsed from the model's text (seeds {unreadable}; see "
            f"{out}/census-*.json); "
            + ("a larger model or more --max-new-tokens may help" if settings.one_shot
               else "a model this small may need --one-shot")
        )  # fmt: skip
    for seed in unreadable:
        print(f"census {seed}: no readable record, skipped", file=sys.stderr)
    return process(
        out, units, lambda u, _tick: _person_rows(lm, factuals[u[0]], ends[u[0]], *u, settings),
        items=lambda u: [(u[0], u[1])],
        desc="people", unit="person", progress=progress, on_unit=on_unit,
    )  # fmt: skip
