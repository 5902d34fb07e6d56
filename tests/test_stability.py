"""The stability study (issue 16, part): its distance, positions, rows, resume and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cfjax
from cfjax.causal import ReplaceTokens, counterfactual, generate
from cfjax.cli import main
from cfjax.experiments import stability


def levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme (the reference for rapidfuzz)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_edit_distance_is_the_papers():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc "), rng.integers(0, 12)))
        b = "".join(rng.choice(list("abc "), rng.integers(0, 12)))
        prefix = int(rng.integers(0, 4))
        longer = max(len(a[prefix:]), len(b[prefix:]))
        want = levenshtein(a, b) / longer if longer else 0.0
        assert stability.edit_distance(a, b, prefix) == pytest.approx(want)


def test_positions_are_stratified():
    rng = np.random.default_rng(1)
    for n in (3, 5, 40, 128):
        for k in (1, 2, 3):
            ps = stability.positions(n, k, rng)
            # One per stratum (a short answer's fallback past its end is dropped).
            assert len(ps) <= min(k, n) and (len(ps) == k or n < 3 * k)
            assert all(1 <= p < n for p in ps)
            for i, p in enumerate(ps):  # position i lies in its stratum (or i + 1 if empty)
                low, high = max(n * i // k, 1), min(n * (i + 1) // k, n - 2)
                assert (low <= p < high) if low < high else p == i + 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model with a Llama 2 style sentencepiece tokenizer (its chat format)."""
    import jax
    from test_counterfactual import _train_spm

    from cfjax.core.model import init_params

    root = tmp_path_factory.mktemp("stability")
    config = cfjax.preset("tiny")
    lm = cfjax.LM(config, init_params(config, jax.random.key(0), scale=1.5), model_id="tiny")
    prompts = root / "prompts.txt"
    prompts.write_text("the captain sailed\n\na calm sea\nher small dog\n")
    return lm.replace(tokenizer=_train_spm(root, seed=0)), prompts


def _settings(lm, prompts, **kw):
    texts = stability.read_prompts(prompts)
    base = dict(model_id=lm.model_id, prompts_sha256=stability.prompts_digest(texts),
                n_prompts=len(texts), temperatures=(1.0,), top_p=(0.9,), top_k=(),
                mechanisms=("gumbel", "inverse-cdf"), interventions=2, max_new_tokens=10,
                batch_prompts=2)  # fmt: skip
    return stability.Settings(**{**base, **kw}), texts


def _rows(path):
    return sorted((json.loads(line) for line in path.read_text().splitlines()),
                  key=lambda r: json.dumps(r, sort_keys=True))  # fmt: skip


@pytest.mark.slow  # ~17 s: the study's runs and the library's, each compiled
def test_rows_are_the_library_counterfactuals(tiny, tmp_path):
    lm, prompts = tiny
    settings, texts = _settings(lm, prompts)
    rows = _rows(stability.run(lm, texts, settings, tmp_path / "a", progress=False))
    assert len(rows) > 10
    fields = {"prompt_id", "temperature", "top_k", "top_p", "mechanism", "position",
              "cf_distance", "int_distance", "factual", "counterfactual", "interventional"}  # fmt: skip
    assert all(
        fields <= set(r) and np.isfinite([r["cf_distance"], r["int_distance"]]).all() for r in rows
    )
    assert {r["mechanism"] for r in rows} == {"gumbel", "inverse-cdf"}
    # One row again by hand: factual answer, the edited token, the counterfactual.
    r = next(r for r in rows if r["mechanism"] == "gumbel" and r["top_p"] == 0.9)
    import jax

    key = jax.random.fold_in(jax.random.key(settings.seed), r["prompt_id"])
    fact = generate(lm, texts[r["prompt_id"]], key=key, sampler=cfjax.Sampler(0.6, top_p=0.9),
                    max_new_tokens=10, system=stability.SYSTEM)  # fmt: skip
    assert fact.text == r["factual"]
    from cfjax.causal.interventions import AutoIntervention, auto_token

    token = auto_token(lm, fact, AutoIntervention(r["position"], seed=settings.seed))
    cf = counterfactual(lm, fact, ReplaceTokens(r["position"], [token]))
    assert cf.text == r["counterfactual"]
    prefix = len(lm.tokenizer.decode(fact.tokens[: r["position"]]))
    assert r["cf_distance"] == stability.edit_distance(fact.text, cf.text, prefix)


def test_a_killed_study_resumes_to_the_same_rows(tiny, tmp_path):
    lm, prompts = tiny
    settings, texts = _settings(lm, prompts)
    whole = _rows(stability.run(lm, texts, settings, tmp_path / "whole", progress=False))

    def crash(unit):
        if unit == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stability.run(lm, texts, settings, tmp_path / "cut", progress=False, on_unit=crash)
    rows_file = tmp_path / "cut" / "rows.jsonl"
    finished = rows_file.read_text()
    assert 0 < len(finished.splitlines()) < len(whole)
    rows_file.write_text(finished + '{"prompt_id": 0, "mech')  # a line cut by the crash
    stability.run(lm, texts, settings, tmp_path / "cut", progress=False)
    assert _rows(rows_file) == whole
    # Finished units, those without rows too, are not redone.
    redone = []
    stability.run(lm, texts, settings, tmp_path / "cut", progress=False, on_unit=redone.append)
    assert redone == [] and _rows(rows_file) == whole
    # Another configuration in the same folder is refused, naming what differs.
    other, _ = _settings(lm, prompts, temperatures=(0.5,))
    with pytest.raises(ValueError, match="made with other settings \\(temperatures differ\\)"):
        stability.run(lm, texts, other, tmp_path / "cut", progress=False)


def test_stability_bad_inputs(tmp_path, capsys):
    for args, message in (
        (["--prompts", str(tmp_path / "none.txt")], "cannot read the prompts file"),
        (["--mechanisms", "softmax"], "--mechanisms: unknown ['softmax']"),
        (["--temperatures", "hot"], "--temperatures: not a comma-separated list"),
    ):
        rc = main(["experiment", "stability", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and message in err[0], err
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="has no prompt"):
        stability.read_prompts(tmp_path / "empty.txt")


@pytest.mark.slow
def test_stability_command_on_smollm2(tmp_path, capsys):
    args = ["experiment", "stability", "--limit", "2", "--temperatures", "1.0",
            "--top-p", "0.9", "--top-k", "", "--max-new-tokens", "16", "--out",
            str(tmp_path), "--plot"]  # fmt: skip
    assert main(args) == 0
    rows = _rows(tmp_path / "rows.jsonl")
    assert rows and {r["mechanism"] for r in rows} <= {"gumbel", "inverse-cdf"}
    plain = sum(r["mechanism"] == "gumbel" and r["top_p"] is None and r["top_k"] is None for r in rows)  # fmt: skip
    assert f"| gumbel | τ = 1 | {plain} |" in capsys.readouterr().out  # the run ends with its table
    assert {p.name for p in tmp_path.glob("*.png")} >= {"distance_vs_tau.png"}
    assert main(args) == 0 and _rows(tmp_path / "rows.jsonl") == rows  # resumed: nothing to do


def test_summary_reproduces_the_readmes_table_from_the_shipped_study(capsys):
    """`cfjax experiment summary` on `docs/stability` (the README's real run) gives the README's
    means and row counts, now with 95% intervals; it reads the census and coupled folders too."""
    import re
    from pathlib import Path

    from cfjax.cli import main

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"^\| (τ = [^|]+?) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", readme, re.M)
    assert len(shown) == 6
    assert main(["experiment", "summary", str(root / "docs/stability")]) == 0
    table = capsys.readouterr().out
    for sampler, n, cf, iv in shown:
        sampler = sampler.replace("1.0", "1").replace("τ = 0.6, top", "τ = 0.6, top")
        assert re.search(rf"\| gumbel \| {re.escape(sampler)} \| {n} \| {cf} ± [\d.]+ \| {iv} ± [\d.]+ \|", table), sampler  # fmt: skip
    assert main(["experiment", "summary", str(root / "docs/coupled"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"]["coupled"][0]["n"] == 1000
    assert main(["experiment", "summary", str(root / "docs/census-smollm2")]) == 0
    assert "Median income" in capsys.readouterr().out


def _study_rows(per_point: int = 3) -> list[dict]:
    """Synthetic rows of every kind the figures draw, `per_point` records at each x."""
    rng = np.random.default_rng(0)
    rows = []

    def add(n, **kw):
        for _ in range(n):
            rows.append({"top_k": None, "top_p": None, "mechanism": "gumbel", "temperature": 0.6,
                         "cf_distance": rng.uniform(0, 0.5), "int_distance": rng.uniform(0.5, 1), **kw})  # fmt: skip

    for t in (0.5, 1.0, 1.5):
        add(per_point, temperature=t)
        add(per_point, temperature=t, mechanism="inverse-cdf")
    for k in (2, 5, 10, 20):
        add(per_point, top_k=k)
    for p in (0.5, 0.9):
        add(per_point, top_p=p)
    return rows


def test_figures_say_what_they_show_and_dodge_their_series():
    figs = stability.figures(_study_rows(), "smollm2-135m-instruct")
    assert set(figs) == {"distance_vs_tau", "distance_vs_top_k", "distance_vs_top_p", "mechanisms_vs_tau"}  # fmt: skip
    words = {"distance_vs_tau": ("n = 9", "gumbel, full vocabulary"),
             "distance_vs_top_k": ("n = 12", "top-k, τ = 0.6"),
             "distance_vs_top_p": ("n = 6", "top-p, τ = 0.6"),
             "mechanisms_vs_tau": ("n = 18", "full vocabulary")}  # fmt: skip
    for stem, fig in figs.items():
        ax = fig.axes[0]
        title = ax.get_title()
        assert "smollm2-135m-instruct" in title and all(w in title for w in words[stem]), (stem, title)  # fmt: skip
        # Two series, each at the grid's x values, never at the same x: dodged.
        a, b = (c.lines[0].get_xdata() for c in ax.containers)
        assert len(a) == len(b) and not np.any(np.isclose(a, b)), stem
    ax = figs["distance_vs_top_k"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "5", "10", "20"]
    for fig in figs.values():
        fig.clf()


def test_one_record_per_point_draws_points_and_warns():
    with pytest.warns(UserWarning, match="one record per point"):
        figs = stability.figures(_study_rows(per_point=1), "m")
    for fig in figs.values():
        for c in fig.axes[0].containers:
            assert c.lines[0].get_linestyle() == "None" and not c.lines[2]  # no line, no bars
        fig.clf()
