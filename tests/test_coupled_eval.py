"""Coupled evaluation (issue 17): the variance reduction on synthetic models of known accuracy,
the study's rows and resume on a tiny model, the answer parser, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cfjax
from cfjax.cli import main
from cfjax.core import scm
from cfjax.experiments import coupled_eval as ce


def _synthetic_rows(mode: str, questions: int, samples: int, seed: int) -> list[dict]:
    """Two synthetic 'models': per question a categorical over 4 letters whose correct letter
    has probability 0.7 (model a) or 0.55 (model b), answered by Gumbel-max with the SCM's noise,
    the same key for both models when coupled."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(questions):
        answer = int(rng.integers(4))
        # How the wrong letters share their mass: the question's, the same for both models.
        wrong = rng.dirichlet(np.ones(3))
        logits = []
        for p in (0.7, 0.55):
            probs = np.zeros(4)
            probs[answer] = p
            probs[np.arange(4) != answer] = (1 - p) * wrong
            logits.append(np.log(probs))
        for s in range(samples):
            key = jax.random.fold_in(jax.random.key(seed), q * samples + s)
            keys = [key, key] if mode == "coupled" else [jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)]  # fmt: skip
            letters = [int(jnp.argmax(jnp.asarray(z) + scm.noise(k, 0, 4))) for z, k in zip(logits, keys, strict=True)]  # fmt: skip
            rows.append({"question_id": q, "sample": s, "mode": mode,
                         "answers": letters, "correct": [a == answer for a in letters]})  # fmt: skip
    return rows


def test_coupling_shrinks_the_variance_of_the_paired_difference():
    rows = _synthetic_rows("coupled", 60, 10, 0) + _synthetic_rows("independent", 60, 10, 0)
    summary = ce.summarize(rows, ["a", "b"])
    for mode in ce.MODES:  # each model's accuracy is estimated as without coupling
        a, b = summary["accuracy"][mode]
        assert abs(a["mean"] - 0.7) < 2 * a["ci95"] and abs(b["mean"] - 0.55) < 2 * b["ci95"]
    pair = summary["pairs"][0]
    c, i = pair["coupled"], pair["independent"]
    # Independent: var(d) = .7·.3 + .55·.45 = 0.458. Coupled Gumbel-max: model a's logits are
    # model b's with the correct letter raised and the others lowered, so a is right whenever b
    # is (d is 0 or 1): var(d) = .15·.85 = 0.1275.
    assert 0.40 < i["variance"] < 0.52 and 0.09 < c["variance"] < 0.17
    assert not any(r["correct"] == [False, True] for r in rows if r["mode"] == "coupled")
    assert pair["variance_ratio"] < 0.4
    assert c["samples_to_separate"] < 0.4 * i["samples_to_separate"]
    assert c["agreement"] > i["agreement"] + 0.2
    assert abs(c["difference"] - 0.15) < 2 * c["ci95"]


def test_parse_answer():
    cases = {"B": "B", "B) Rome": "B", "(C)": "C", "Answer: D": "D", " A.": "A",
             "The answer is C": "C", "Paris": None, "": None, "Because": None}  # fmt: skip
    for text, want in cases.items():
        assert ce.parse_answer(text) == want, text
    assert ce.parse_answer("C", 2) is None


def test_shipped_questions_are_balanced():
    qs = ce.shipped_questions()
    assert len(qs) == 100 and len({q.question for q in qs}) == 100
    assert sorted(q.answer for q in qs) == sorted("ABCD" * 25)
    france = next(q for q in qs if "France" in q.question)
    assert france.options[ord(france.answer) - 65] == "Paris"


def test_questions_file_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "x?", "options": ["a", "b"], "answer": "C"}\n')
    with pytest.raises(ValueError, match="q.jsonl:1: not a question line"):
        ce.read_questions(bad)
    with pytest.raises(FileNotFoundError, match="cannot read the questions file"):
        ce.read_questions(tmp_path / "none.jsonl")
    good = tmp_path / "g.jsonl"
    good.write_text('{"question": "x?", "options": ["a", "b"], "answer": "b"}\n')
    assert ce.read_questions(good)[0].answer == "B"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "a"], "--models: give at least two models"),
        (["--models", "a", "b", "--samples", "0"], "--samples: must be >= 1"),
        (["--models", "a", "b", "--temperature", "0"], "--temperature must be > 0"),
        (["--models", "a", "b"], "a: no such file or directory"),
    ],
)
def test_coupled_command_bad_inputs(args, message, tmp_path, capsys):
    rc = main(["experiment", "coupled", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from test_counterfactual import _train_spm

    from cfjax.core.model import init_params

    tok = _train_spm(tmp_path_factory.mktemp("spm"), seed=0)
    config = cfjax.preset("tiny")
    a = cfjax.LM(config, init_params(config, jax.random.key(0), scale=3.0), tok, "a")
    b = cfjax.LM(config, init_params(config, jax.random.key(1), scale=3.0), tok, "b")
    return a, b


@pytest.mark.slow  # ~13 s: an evaluation run, interrupted and resumed
def test_rows_are_coupled_generations_and_resume(tiny_pair, tmp_path):
    a, b = tiny_pair
    questions = ce.shipped_questions()[:4]
    settings = ce.Settings(models=("a", "b"), questions_sha256=ce.questions_digest(questions),
                           n_questions=4, samples=3, max_new_tokens=3, batch_questions=2)  # fmt: skip
    whole = [json.loads(x) for x in ce.run([a, b], questions, settings, tmp_path / "w", progress=False).read_text().splitlines()]  # fmt: skip
    assert len(whole) == 4 * 3 * 2
    # A coupled row is `generate` of each model with the row's shared key.
    r = next(r for r in whole if r["mode"] == "coupled" and r["question_id"] == 1)
    key = ce._keys(settings, "coupled", 0, 1)[r["sample"]]
    for m, text in zip((a, b), r["texts"], strict=True):
        t = cfjax.generate(m, questions[1].prompt(), key=key, sampler=cfjax.Sampler(1.0),
                           max_new_tokens=3, system=ce.SYSTEM)  # fmt: skip
        assert t.text == text

    # Killed after the first batch, resumed: the same rows.
    def crash(unit):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ce.run([a, b], questions, settings, tmp_path / "c", progress=False, on_unit=crash)
    assert len((tmp_path / "c" / "rows.jsonl").read_text().splitlines()) == 12
    resumed = ce.run([a, b], questions, settings, tmp_path / "c", progress=False)
    key_of = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key_of, (json.loads(x) for x in resumed.read_text().splitlines()))) == sorted(map(key_of, whole))  # fmt: skip
    other = ce.Settings(**{**settings.__dict__, "samples": 4})
    with pytest.raises(ValueError, match="other settings \\(samples differ\\)"):
        ce.run([a, b], questions, other, tmp_path / "c", progress=False)
    assert "| a | b | coupled |" in ce.markdown(ce.summarize(whole, ["a", "b"]))


@pytest.mark.slow
def test_coupled_command_on_smollm2_and_its_variants(tmp_path, capsys):
    args = ["experiment", "coupled", "--models", "smollm2-135m-instruct",
            "smollm2-135m-instruct@int8", "--limit", "2", "--samples", "2", "--out",
            str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"][1].endswith("@int8") and len(summary["pairs"]) == 1
    assert {p.name for p in tmp_path.iterdir()} >= {"rows.jsonl", "config.json", "report.md", "summary.json"}  # fmt: skip


def test_accuracy_intervals_stay_within_0_and_1_and_match_scipys_wilson():
    from scipy.stats import binomtest

    for k, n in ((1, 12), (0, 5), (12, 12), (37, 100)):
        want = binomtest(k, n).proportion_ci(0.95, method="wilson")
        low, high = ce.wilson(k, n)
        assert 0 <= low <= k / n <= high <= 1
        np.testing.assert_allclose((low, high), (want.low, want.high), rtol=1e-3, atol=1e-4)


def test_a_pair_without_spread_cannot_be_separated():
    rows = [{"mode": m, "correct": [1, 0], "answers": ["A", "B"]} for m in ce.MODES for _ in range(4)]  # fmt: skip
    summary = ce.summarize(rows, ["a", "b"])
    assert summary["pairs"][0]["coupled"]["samples_to_separate"] is None
    assert "cannot separate (no spread)" in ce.markdown(summary)
    acc = summary["accuracy"]["coupled"][0]
    assert acc["mean"] == 1.0 and acc["high"] == 1.0 and 0 < acc["low"] < 1
