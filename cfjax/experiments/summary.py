"""`cfjax experiment summary DIR`: the table a paper needs from any study folder.

The kind of study is read from its `config.json` (the settings each study writes): stability
(mean normalised edit distance per sampler, counterfactual and interventional, with n and 95%
intervals), census (the median-income and occupation tables of `report.markdown`) or coupled
evaluation (`coupled_eval.summarize`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cfjax.experiments import census, coupled_eval, report


def kind(directory: Path) -> str:
    """'stability', 'census' or 'coupled', from the folder's settings."""
    config = directory / "config.json"
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{config}: not a study folder's settings ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{config}: not a study folder's settings")
    for name, field in (("stability", "mechanisms"), ("census", "attributes"), ("coupled", "models")):  # fmt: skip
        if field in settings:
            return name
    raise ValueError(f"{config}: settings of no known study (stability, census, coupled)")


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, float)
    half = 1.96 * float(np.std(x, ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return float(np.mean(x)), half


def _sampler(r: dict) -> str:
    parts = [f"τ = {r['temperature']:g}" if r["temperature"] else "τ = 0 (greedy)"]
    if r["top_p"] is not None:
        parts.append(f"top-p {r['top_p']:g}")
    if r["top_k"] is not None:
        parts.append(f"top-k {r['top_k']}")
    return ", ".join(parts)


def stability_table(rows: Sequence[dict]) -> list[dict]:
    """One row per (mechanism, sampler): n and the mean distances with 95% half-widths."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["mechanism"], r["temperature"], r["top_k"] or 0, r["top_p"] or 0.0)
        groups.setdefault(key, []).append(r)
    out = []
    for (mechanism, *_), group in sorted(groups.items()):
        cf, cf_ci = _mean_ci([r["cf_distance"] for r in group])
        iv, iv_ci = _mean_ci([r["int_distance"] for r in group])
        out.append({"mechanism": mechanism, "sampler": _sampler(group[0]), "n": len(group),
                    "counterfactual": cf, "counterfactual_ci95": cf_ci,
                    "interventional": iv, "interventional_ci95": iv_ci})  # fmt: skip
    return out


def _pm(mean: float, half: float) -> str:
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def stability_markdown(table: Sequence[dict]) -> str:
    lines = ["| mechanism | sampler | n | counterfactual (95%) | interventional (95%) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for t in table:
        lines.append(f"| {t['mechanism']} | {t['sampler']} | {t['n']} | "
                     f"{_pm(t['counterfactual'], t['counterfactual_ci95'])} | "
                     f"{_pm(t['interventional'], t['interventional_ci95'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summarize(directory: str | Path) -> tuple[object, str]:
    """(JSON-ready summary, markdown) of the study in `directory`."""
    directory = Path(directory)
    study = kind(directory)
    rows = census.read_rows(directory)
    if study == "stability":
        table = stability_table(rows)
        return table, stability_markdown(table)
    if study == "census":
        return census.income_table(rows), report.markdown(rows)
    models = json.loads((directory / "config.json").read_text(encoding="utf-8"))["models"]
    summary = coupled_eval.summarize(rows, models)
    return summary, coupled_eval.markdown(summary)
