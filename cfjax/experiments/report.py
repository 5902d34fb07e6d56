"""The census study's report: markdown tables and PNG figures from its rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cfjax.atomic import write_text
from cfjax.experiments import census
from cfjax.experiments.plots import COLOURS, subtitle

RACE_SHORT = {
    "White American": "White",
    "Black or African American": "Black",
    "American Indian or Alaska Native": "AIAN",
    "Asian American": "Asian",
    "Native Hawaiian or Other Pacific Islander": "NHPI",
    "Other or Two or more races (multiracial)": "Multiracial",
}


def _k(x) -> str:
    return "–" if x is None else f"{round(x / 1000, 1):g}k"


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _table(title: str, columns: Sequence[str], rows: list[tuple[dict, list[str]]]) -> list[str]:
    """A markdown section: one line per intervention group, then the given cells."""
    head = ["attribute", "effect", "from", "to", "n", *columns]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, cells in rows:
        group = [r["attribute"], r["effect"], r["from"], r["to"], str(r["n"])]
        lines.append("| " + " | ".join(group + cells) + " |")
    return lines


FIGURES = {
    "education_by_race.png": "mean change of the education level, 0 = none to 5 = "
    "doctoral/professional, counterfactual minus factual, total Race effect",
    "income_sex.png": "income histograms of the Sex interventions",
}


def markdown(rows: Sequence[dict], figures: Sequence[Path] = ()) -> str:
    """The report's text: median incomes, occupation changes, and the `figures` written (only
    those: a Sex-only study has no education-by-race figure)."""
    income = [(r, [_k(r[f"median_{c}"]) for c in census.COLUMNS]) for r in census.income_table(rows)]  # fmt: skip
    changes = [(r, [_pct(r[f"changed_{c}"]) for c in census.COLUMNS[1:]])
               for r in census.occupation_changes(rows)]  # fmt: skip
    out = ["# Census study report", ""]
    out += _table("Median income (zero incomes dropped per column)", census.COLUMNS, income)
    out += [""] + _table("Share of records whose occupation changes", census.COLUMNS[1:], changes)
    out += [""] + [f"Figure `{f.name}`: {FIGURES[f.name]}." for f in figures] + [""]
    return "\n".join(out)


def figures(rows: Sequence[dict], model: str = "") -> dict[str, Any]:
    """The report's matplotlib figures by file stem: the education heatmap by race (each cell's
    mean change and its n) and the income histograms of the total Sex effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    change = census.education_change_by_race(rows)
    if change:
        out["education_by_race"] = _heatmap(plt, change, model)
    sex = [r for r in rows if r["intervened_attribute"] == "Sex" and r["effect"] == "total"]
    if sex:
        out["income_sex"] = _income_histograms(plt, sex, model)
    return out


def _heatmap(plt, change: dict, model: str):
    import numpy as np

    races = [r for r in census.RACES if any(r in k for k in change)]
    grid = np.full((len(races), len(races)), np.nan)
    counts = np.zeros((len(races), len(races)), int)
    for (a, b), (v, n) in change.items():
        grid[races.index(a), races.index(b)] = v
        counts[races.index(a), races.index(b)] = n
    fig, ax = plt.subplots(figsize=(6.5, 5.8))
    lim = np.nanmax(np.abs(grid)) or 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim)
    names = [RACE_SHORT.get(r, r) for r in races]
    ax.set_xticks(range(len(races)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(races)), names)
    ax.set_xlabel("counterfactual race")
    ax.set_ylabel("factual race")
    for i, j in zip(*np.nonzero(np.isfinite(grid)), strict=True):
        dark = abs(grid[i, j]) > 0.55 * lim  # the colour map's ends are dark: white text there
        ax.text(j, i, f"{grid[i, j]:+.2f}\nn = {counts[i, j]}", ha="center", va="center",
                fontsize=7, color="white" if dark else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, label="mean education change (levels)")
    subtitle(ax, model, int(counts.sum()), "total effect, counterfactual minus factual")
    fig.suptitle("Education change under a race intervention", fontsize=10)
    fig.tight_layout()
    return fig


def _income_histograms(plt, sex: list[dict], model: str):
    import numpy as np

    incomes = {}
    for a, b in (("Female", "Male"), ("Male", "Female")):
        group = [r for r in sex if tuple(r["intervention"]) == (a, b)]
        incomes[(a, b)] = (len(group), {
            name: [v / 1000 for r in group if len(r["Income"]) > col
                   if (v := census.parse_income(r["Income"][col]))]
            for col, name in enumerate(census.COLUMNS)
        })  # fmt: skip
    top = max((max(v) for _, series in incomes.values() for v in series.values() if v), default=20)
    bins = np.arange(0, top + 20, 20)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, ((a, b), (n, series)) in zip(axes, incomes.items(), strict=True):
        for name, values in series.items():
            if values:
                ax.hist(values, bins=bins, histtype="step", lw=2, label=name, color=COLOURS[name])
        ax.set_xlim(0, bins[-1])
        subtitle(ax, model, n, f"{a} → {b}, total effect")
        ax.set_xlabel("income (k$, zeros dropped)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0].set_ylabel("records")
    fig.suptitle("Income under a sex intervention (total effect)", fontsize=10)
    fig.tight_layout()
    return fig


def write(rows: Sequence[dict], out: str | Path, model: str = "") -> Path:
    """`report.md` and the figures in `out`; returns the report's path."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures(rows, model).items():
        written.append(out / f"{stem}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    write_text(out / "report.md", markdown(rows, written))
    return out / "report.md"
