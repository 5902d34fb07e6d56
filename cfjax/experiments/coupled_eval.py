"""Coupled evaluation (Benz et al., "coupled autoregressive generation", AISTATS 2026): several
models answer each multiple-choice question N times under coupled noise (the same key for every
model, per question and sample) and N times under independent noise (a key per model too).

Coupling leaves each model's accuracy estimate as it was (each model still samples from its own
distribution) but makes the models' errors move together, so the paired difference of two
models' accuracies has a smaller variance and needs fewer samples to be told apart. The report
gives, per model, the accuracy with a 95% interval; per pair, the agreement rate and the paired
difference with its interval under each kind of noise, and the number of answers each kind would
need for its 95% interval around the pooled difference (both kinds estimate the same one) to
exclude zero; their ratio is the ratio of the variances.

Work is done a batch of questions at a time (all samples of all models, coupled and
independent); rows stream to `DIR/rows.jsonl` and a run resumes like the other studies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from cfjax.causal.coupling import check_shared_vocabulary, coupled
from cfjax.core.checks import as_key
from cfjax.core.scm import Sampler
from cfjax.experiments.choices import LETTERS, QUESTIONS
from cfjax.experiments.folder import finished, open_study, process
from cfjax.runtime.lm import LM

SYSTEM = "Answer with the letter of the correct option only."
MODES = ("coupled", "independent")


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, ...]
    answer: str  # a letter

    def prompt(self) -> str:
        lines = [self.question] + [f"{LETTERS[i]}) {o}" for i, o in enumerate(self.options)]
        return "\n".join(lines) + "\nAnswer:"


def shipped_questions() -> list[Question]:
    """The shipped questions, options rotated so that the answers are A, B, C, D in turn."""
    out = []
    for i, (q, options, a) in enumerate(QUESTIONS):
        shift = (a - i % 4) % 4
        out.append(Question(q, tuple(options[shift:] + options[:shift]), LETTERS[i % 4]))
    return out


def read_questions(path: str | Path | None) -> list[Question]:
    """Questions from a JSON-lines file ({"question", "options", "answer"}), or the shipped."""
    if path is None:
        return shipped_questions()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise FileNotFoundError(f"{path}: cannot read the questions file ({reason})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            options = tuple(str(o) for o in d["options"])
            answer = str(d["answer"]).strip().upper()
            if not 2 <= len(options) <= len(LETTERS) or answer not in LETTERS[: len(options)]:
                raise ValueError("needs 2-4 options and an answer letter among them")
            out.append(Question(str(d["question"]), options, answer))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a question line ({e})") from None
    if not out:
        raise ValueError(f"{path}: the questions file has no question")
    return out


def parse_answer(text: str, n_options: int = 4) -> str | None:
    """The first option letter the response gives ("B", "B)", "(B", "Answer: B"), or None."""
    m = re.search(r"(?<![A-Za-z])([" + LETTERS[:n_options] + r"])(?![a-z])", text)
    return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a coupled-evaluation folder was made with (its `config.json`)."""

    models: tuple[str, ...]
    questions_sha256: str
    n_questions: int
    samples: int = 10
    temperature: float = 1.0
    max_new_tokens: int = 4
    seed: int = 0
    batch_questions: int = 10


def questions_digest(questions: Sequence[Question]) -> str:
    blob = json.dumps([dataclasses.asdict(q) for q in questions], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _keys(settings: Settings, mode: str, model: int, question: int) -> jax.Array:
    """One key per sample: shared by the models when coupled, the model's own otherwise."""
    base = as_key(settings.seed)
    base = jax.random.fold_in(base, MODES.index(mode))
    if mode == "independent":
        base = jax.random.fold_in(base, 1 + model)
    base = jax.random.fold_in(base, question)
    return jax.random.split(base, settings.samples)


def _unit(models: list[LM], questions: list[Question], ids: list[int], s: Settings, tick=lambda _f: None) -> list[dict]:  # fmt: skip
    sampler = Sampler(s.temperature)
    prompts = [questions[i].prompt() for i in ids for _ in range(s.samples)]
    rows = []
    for n_mode, mode in enumerate(MODES):
        if mode == "coupled":
            keys = jax.numpy.concatenate([_keys(s, mode, 0, i) for i in ids])
            answers = coupled(models, prompts, key=keys, sampler=sampler,
                              max_new_tokens=s.max_new_tokens, system=SYSTEM)  # fmt: skip
        else:
            answers = []
            for m_i, m in enumerate(models):
                keys = jax.numpy.concatenate([_keys(s, mode, m_i, i) for i in ids])
                answers += coupled([m], prompts, key=keys, sampler=sampler,
                                   max_new_tokens=s.max_new_tokens, system=SYSTEM)  # fmt: skip
        for r, (q_id, sample) in enumerate((i, j) for i in ids for j in range(s.samples)):
            q = questions[q_id]
            letters = [parse_answer(per_model[r].text, len(q.options)) for per_model in answers]
            rows.append({
                "question_id": q_id, "sample": sample, "mode": mode, "answers": letters,
                "correct": [a == q.answer for a in letters],
                "texts": [per_model[r].text for per_model in answers],
            })  # fmt: skip
        tick((n_mode + 1) / len(MODES))
    return rows


def run(
    models: list[LM],
    questions: list[Question],
    settings: Settings,
    out: str | Path,
    *,
    progress: bool | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> Path:
    """Run (or resume) the evaluation into `out`; returns the rows file."""
    check_shared_vocabulary(models)
    out = Path(out)
    done = {r["question_id"] for r in open_study(out, dataclasses.asdict(settings))}
    done |= {item[0] for item in finished(out)}
    todo = [i for i in range(len(questions)) if i not in done]
    units = [todo[k : k + settings.batch_questions] for k in range(0, len(todo), settings.batch_questions)]  # fmt: skip
    return process(
        out, units, lambda ids, tick: _unit(models, questions, ids, settings, tick),
        items=lambda ids: [(i,) for i in ids], size=len,
        desc="questions", unit="question", progress=progress, on_unit=on_unit,
    )  # fmt: skip


# --- the report -----------------------------------------------------------------------------


def _mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval."""
    if len(x) < 2:
        return float(np.mean(x)) if len(x) else math.nan, math.nan
    return float(np.mean(x)), float(1.96 * np.std(x, ddof=1) / math.sqrt(len(x)))


def wilson(successes: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: within [0, 1] (a normal interval around
    0.083 with n = 12 would reach below 0)."""
    if n == 0:
        return math.nan, math.nan
    z, p = 1.96, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def samples_to_separate(d: np.ndarray, difference: float) -> float | None:
    """Paired answers with the spread of `d` needed for a 95% interval around `difference` to
    exclude zero: (1.96 · sd(d) / |difference|)²; infinite when the difference is zero, None
    when `d` has no spread (every pair differs alike: its spread cannot say how many)."""
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
    if not sd > 0:
        return None
    return math.inf if difference == 0 else (1.96 * sd / abs(difference)) ** 2


def summarize(rows: Sequence[dict], models: Sequence[str]) -> dict:
    """Accuracies, agreement and paired differences under each kind of noise (JSON-ready)."""
    out: dict = {"models": list(models), "accuracy": {}, "pairs": []}
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    for mode, rs in by_mode.items():
        correct = np.asarray([r["correct"] for r in rs], float).reshape(len(rs), len(models))
        out["accuracy"][mode] = []
        for i in range(len(models)):
            mean = float(np.mean(correct[:, i])) if len(rs) else math.nan
            low, high = wilson(float(np.sum(correct[:, i])), len(rs))
            half = max(mean - low, high - mean) if len(rs) else math.nan  # the wider side
            out["accuracy"][mode].append({"mean": mean, "low": low, "high": high, "ci95": half, "n": len(rs)})  # fmt: skip
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            diffs = {
                mode: np.asarray([r["correct"][i] - r["correct"][j] for r in rs], float)
                for mode, rs in by_mode.items()
            }
            # Both kinds of noise estimate the same difference: the pooled one is the yardstick
            # against which each kind's spread says how many answers it needs.
            pooled = float(np.mean(np.concatenate(list(diffs.values()))))
            pair = {"a": models[i], "b": models[j], "difference": pooled}
            for mode, rs in by_mode.items():
                d = diffs[mode]
                mean, half = _mean_ci(d)
                pair[mode] = {
                    "agreement": float(np.mean([r["answers"][i] == r["answers"][j] for r in rs])),
                    "difference": mean, "ci95": half,
                    "variance": float(np.var(d, ddof=1)) if len(d) > 1 else math.nan,
                    "samples_to_separate": samples_to_separate(d, pooled),
                }  # fmt: skip
            pair["variance_ratio"] = pair["coupled"]["variance"] / pair["independent"]["variance"] if pair["independent"]["variance"] else math.nan  # fmt: skip
            out["pairs"].append(pair)
    return out


def markdown(summary: dict) -> str:
    """The report as markdown tables."""
    lines = ["# Coupled evaluation", "", "## Accuracy (95% Wilson interval)", "",
             "| model | coupled | independent |", "|---|---|---|"]  # fmt: skip
    for i, name in enumerate(summary["models"]):
        cells = [f"{a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}] (n = {a['n']})"
                 for a in (summary["accuracy"][m][i] for m in MODES)]  # fmt: skip
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "## Pairs", "",
              "Answers to separate: how many paired answers with that noise's spread would put "
              "a 95% interval around the pooled difference clear of zero.", "",
              "| a | b | noise | agreement | difference (95%) | variance | answers to separate |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in summary["pairs"]:
        for mode in MODES:
            x = p[mode]
            n = x["samples_to_separate"]
            lines.append(
                f"| {p['a']} | {p['b']} | {mode} | {x['agreement']:.3f} | "
                f"{x['difference']:+.3f} ± {x['ci95']:.3f} | {x['variance']:.4f} | "
                f"{'cannot separate (no spread)' if n is None else '∞' if math.isinf(n) else f'{n:.0f}'} |"
            )
    lines.append("")
    return "\n".join(lines)
