"""The paper's stability study (§4.2, Figures 3 and 12): how far a counterfactual answer moves
from the factual one after an automatic intervention, against an interventional answer.

For every prompt and sampler: a factual answer; `interventions` positions stratified over it (the
paper's rule: position i in [max(n·i/k, 1), min(n·(i+1)/k, n-2)), seeded); at each, the paper's
automatic intervention (another token of the step's top-p 0.9 set); the counterfactual (same
noise) and an interventional answer (fresh noise, the same edited token); the normalised
Levenshtein distance of each to the factual answer: distance of the full strings / the longer of
the two suffixes after the shared prefix (the text before the intervened token).

Work is done in units of (a batch of prompts, one sampler mechanism): the factual answers of all
its prompts and samplers are one batch, and so are all their counterfactuals (which reuse the
factual KV caches) and all the interventional answers. Rows are appended to `DIR/rows.jsonl` as
each unit finishes (flushed and synced), so a crash or Ctrl-C loses no finished row, and the same
command resumes after the last finished unit; `DIR/config.json` records the settings, and a
folder made with others is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cfjax.causal import AutoIntervention, ReplaceTokens, counterfactuals, generate
from cfjax.causal.interventions import auto_token
from cfjax.causal.replay import interventionals
from cfjax.core.checks import as_key
from cfjax.core.scm import Sampler
from cfjax.experiments.folder import finished, open_study, process
from cfjax.experiments.plots import COLOURS, errorbars, mean_interval, subtitle
from cfjax.runtime.lm import LM

SYSTEM = "Keep your replies short and to the point."  # the paper's system prompt


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a study folder was made with (its `config.json`)."""

    model_id: str
    prompts_sha256: str
    n_prompts: int
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    top_p: tuple[float, ...] = (0.75, 0.9, 0.95, 0.99, 0.999)
    top_k: tuple[int, ...] = (2, 3, 5, 10, 100)
    truncation_temperature: float = 0.6  # the paper's τ for the top-p / top-k grids
    mechanisms: tuple[str, ...] = ("gumbel", "inverse-cdf")
    interventions: int = 2
    max_new_tokens: int = 128
    seed: int = 42
    batch_prompts: int = 8
    ignore_stop: bool = False  # answers run to max_new_tokens (a benchmark's fixed lengths)

    def samplers(self, mechanism: str) -> list[Sampler]:
        """The sampler grid of one mechanism (top-p / top-k with the gumbel mechanism only, as
        in the paper: its inverse-cdf runs cover temperature alone)."""
        grid = [Sampler(t, mechanism=mechanism) for t in self.temperatures]
        if mechanism == "gumbel":
            tau = self.truncation_temperature
            grid += [Sampler(tau, top_p=p) for p in self.top_p]
            grid += [Sampler(tau, top_k=k) for k in self.top_k]
        return grid


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per non-empty line of `path` (default: the 100 shipped questions)."""
    if path is None:
        from cfjax.experiments.questions import QUESTIONS

        return list(QUESTIONS)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise FileNotFoundError(f"{path}: cannot read the prompts file ({reason})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: the prompts file has no prompt (one per line)")
    return prompts


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def positions(n_tokens: int, k: int, rng: np.random.Generator) -> list[int]:
    """The paper's stratified intervention positions over an answer of `n_tokens` tokens."""
    out = []
    for i in range(min(k, n_tokens)):
        low = max(n_tokens * i // k, 1)
        high = min(n_tokens * (i + 1) // k, n_tokens - 2)
        out.append(int(rng.integers(low, high)) if low < high else i + 1)
    return [p for p in out if p < n_tokens]


def edit_distance(factual: str, other: str, prefix: int) -> float:
    """The paper's normalised Levenshtein distance (0 when both suffixes are empty)."""
    from rapidfuzz.distance import Levenshtein

    longer = max(len(factual[prefix:]), len(other[prefix:]))
    return Levenshtein.distance(factual, other) / longer if longer else 0.0


def run(
    lm: LM,
    prompts: Sequence[str],
    settings: Settings,
    out: str | Path,
    *,
    progress: bool | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> Path:
    """Run (or resume) the study into `out`; returns the rows file."""
    out = Path(out)
    done = {(r["prompt_id"], r["mechanism"]) for r in open_study(out, dataclasses.asdict(settings))}
    done |= finished(out)
    units = []
    for mechanism in settings.mechanisms:
        todo = [i for i in range(len(prompts)) if (i, mechanism) not in done]
        for s in range(0, len(todo), settings.batch_prompts):
            units.append((mechanism, todo[s : s + settings.batch_prompts]))
    return process(
        out, units, lambda u, tick: _unit(lm, prompts, u[1], u[0], settings, tick),
        items=lambda u: [(i, u[0]) for i in u[1]], size=lambda u: len(u[1]),
        desc="prompts x mechanisms", unit="prompt", progress=progress, on_unit=on_unit,
    )  # fmt: skip


def _unit(lm: LM, prompts: Sequence[str], ids: list[int], mechanism: str, settings: Settings, tick=lambda _f: None):  # fmt: skip
    """One batch of prompts under one mechanism: factuals, then the counterfactual and the
    interventional answer at each intervention (a third of the unit's progress each)."""
    samplers = settings.samplers(mechanism)
    cells = [(i, s) for i in ids for s in samplers]
    keys = [jax.random.fold_in(as_key(settings.seed), i) for i, _ in cells]
    factuals = generate(
        lm, [prompts[i] for i, _ in cells], key=keys, sampler=[s for _, s in cells],
        max_new_tokens=settings.max_new_tokens,
        system=SYSTEM if isinstance(prompts[ids[0]], str) else None,  # token ids: as given
        stop_tokens=() if settings.ignore_stop else None,
    )  # fmt: skip
    tick(1 / 3)
    plan = []  # (cell, factual, position, fresh key)
    base = as_key(settings.seed + 1)
    for c, ((i, s), fact) in enumerate(zip(cells, factuals, strict=True)):
        body = len(fact.tokens) - (1 if fact.stopped else 0)
        rng = np.random.default_rng([settings.seed, i])
        # The fresh noise of a row depends on its prompt, sampler and intervention alone, so a
        # resumed study (other units) gives the rows an uninterrupted one gives.
        cell_key = jax.random.fold_in(jax.random.fold_in(base, i), samplers.index(s))
        plan += [
            (c, fact, p, jax.random.fold_in(cell_key, j))
            for j, p in enumerate(positions(body, settings.interventions, rng))
        ]
    if not plan:
        return []
    # The paper's automatic intervention: another token of the step's top-p 0.9 set, the same
    # for the counterfactual and the interventional answer. A position whose set holds only the
    # factual token has no intervention and is skipped.
    edits, kept = [], []
    for e in plan:
        try:
            token = auto_token(lm, e[1], AutoIntervention(e[2], seed=settings.seed))
        except ValueError:
            continue
        edits.append(ReplaceTokens(e[2], [token]))
        kept.append(e)
    plan = kept
    if not plan:
        return []
    cfs = counterfactuals(lm, [f for _, f, _, _ in plan], edits)
    tick(2 / 3)
    fresh = jax.numpy.stack([k for *_, k in plan])
    ints = interventionals(lm, [f for _, f, _, _ in plan], edits, keys=fresh)
    rows = []
    for (c, fact, p, _), cf, iv in zip(plan, cfs, ints, strict=True):
        i, s = cells[c]
        prefix = len(lm.tokenizer.decode(fact.tokens[:p])) if lm.tokenizer is not None else 0
        rows.append({
            "prompt_id": i, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
            "mechanism": mechanism, "position": p,
            "cf_distance": edit_distance(fact.text, cf.text, prefix),
            "int_distance": edit_distance(fact.text, iv.text, prefix),
            "factual": fact.text, "counterfactual": cf.text, "interventional": iv.text,
        })  # fmt: skip
    return rows


def figures(rows: Sequence[dict], model: str = "") -> dict[str, Any]:
    """The paper's figures (matplotlib figures by file stem), mean normalised edit distance
    with 95% intervals: against τ (counterfactual vs interventional, gumbel vs inverse-cdf),
    against p and k. Each says its model, n and sampler; the series are dodged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(select, key, column):
        xs = sorted({r[key] for r in rows if select(r)})
        return [(x, *mean_interval([r[column] for r in rows if select(r) and r[key] == x])) for x in xs]  # fmt: skip

    def temps(select):
        return ", ".join(
            f"τ = {t:g}" for t in sorted({r["temperature"] for r in rows if select(r)})
        )

    vocab = lambda m: lambda r: r["mechanism"] == m and r["top_k"] is None and r["top_p"] is None  # noqa: E731
    specs = {  # stem: (x label, x key, rows, sampler words, [(column, select, label, marker, colour)])
        "distance_vs_tau": ("temperature τ", "temperature", vocab("gumbel"), "gumbel, full vocabulary",
                            [("cf_distance", None, "counterfactual", "o", COLOURS["counterfactual"]),
                             ("int_distance", None, "interventional", "s", COLOURS["interventional"])]),
        "distance_vs_top_p": ("p", "top_p", lambda r: r["top_p"] is not None, "top-p",
                              [("cf_distance", None, "counterfactual", "o", COLOURS["counterfactual"]),
                               ("int_distance", None, "interventional", "s", COLOURS["interventional"])]),
        "distance_vs_top_k": ("k", "top_k", lambda r: r["top_k"] is not None, "top-k",
                              [("cf_distance", None, "counterfactual", "o", COLOURS["counterfactual"]),
                               ("int_distance", None, "interventional", "s", COLOURS["interventional"])]),
        "mechanisms_vs_tau": ("temperature τ", "temperature",
                              lambda r: vocab("gumbel")(r) or vocab("inverse-cdf")(r),
                              "counterfactual, full vocabulary",
                              [("cf_distance", vocab("gumbel"), "gumbel", "o", COLOURS["counterfactual"]),
                               ("cf_distance", vocab("inverse-cdf"), "inverse-cdf", "^", "tab:green")]),
    }  # fmt: skip
    out = {}
    for stem, (xlabel, key, select, sampler, series) in specs.items():
        if stem == "mechanisms_vs_tau" and not any(vocab("inverse-cdf")(r) for r in rows):
            continue
        if not any(select(r) for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, (column, only, label, marker, colour) in enumerate(series):
            chosen = select if only is None else only
            errorbars(ax, points(chosen, key, column), label=label, marker=marker, colour=colour,
                      shift=i, of=len(series), log=key == "top_k")  # fmt: skip
        if key == "top_k":
            ax.set_xscale("log")
            grid = sorted({r[key] for r in rows if select(r)})
            ax.set_xticks(grid, [str(k) for k in grid])
            ax.minorticks_off()
        words = sampler if key == "temperature" else f"{sampler}, {temps(select)}"
        subtitle(ax, model, sum(map(select, rows)), words)
        fig.suptitle(
            "Counterfactual stability: normalised edit distance to the factual", fontsize=10
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("normalised edit distance (mean, 95% interval)")
        ax.legend()
        fig.tight_layout()
        out[stem] = fig
    return out


def plot(rows: Sequence[dict], out: str | Path, model: str = "") -> list[Path]:
    """`figures` written as PNG into `out`; returns their paths."""
    import matplotlib.pyplot as plt

    written = []
    for stem, fig in figures(rows, model).items():
        written.append(Path(out) / f"{stem}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
