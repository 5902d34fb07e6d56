"""The census study's report: markdown tables and PNG figures from its rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cfjax.atomic import write_text
from cfjax.experiments import census

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


def figures(rows: Sequence[dict], out: Path) -> list[Path]:
    """Write the PNGs: the education heatmap by race and the income histograms by sex."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    change = census.education_change_by_race(rows)
    if change:
        races = [r for r in census.RACES if any(r in k for k in change)]
        grid = np.full((len(races), len(races)), np.nan)
        for (a, b), v in change.items():
            grid[races.index(a), races.index(b)] = v
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        lim = np.nanmax(np.abs(grid)) or 1.0
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim)
        names = [RACE_SHORT.get(r, r) for r in races]
        ax.set_xticks(range(len(races)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(races)), names)
        ax.set_xlabel("counterfactual race")
        ax.set_ylabel("factual race")
        for i in range(len(races)):
            for j in range(len(races)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="mean education change (levels)")
        ax.set_title("Education change under a race intervention")
        fig.tight_layout()
        written.append(out / "education_by_race.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    sex = [r for r in rows if r["intervened_attribute"] == "Sex" and r["effect"] == "total"]
    if sex:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, (a, b) in zip(axes, (("Female", "Male"), ("Male", "Female")), strict=True):
            group = [r for r in sex if tuple(r["intervention"]) == (a, b)]
            for col, name in enumerate(census.COLUMNS):
                values = [census.parse_income(r["Income"][col]) for r in group
                          if len(r["Income"]) > col]  # fmt: skip
                values = [v / 1000 for v in values if v]
                if values:
                    ax.hist(values, bins=np.arange(0, 260, 20), histtype="step", lw=2, label=name)
            ax.set_title(f"{a} → {b} (n = {len(group)})")
            ax.set_xlabel("income (k$, zeros dropped)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        axes[0].set_ylabel("records")
        fig.tight_layout()
        written.append(out / "income_sex.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write(rows: Sequence[dict], out: str | Path) -> Path:
    """`report.md` and the figures in `out`; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", markdown(rows, figures(rows, out)))
    return out / "report.md"
