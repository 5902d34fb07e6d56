"""This checkout's CPU speed against another tree's (a commit before a change): paired rounds.

Each round runs `decode.py` at batch 1 and 64 (cfjax only: tok/s of `generate`) and
`counterfactual.py` (factual, counterfactual and batched seconds) once in each tree, the two
trees taking turns and alternating which goes first, so that each round's ratio compares runs
a minute apart (single runs on a 2-core VM move by ±9%). Reported: per measure, the median over
rounds of new/old (a speed: > 1 is faster; a time: < 1 is faster) and every round's ratio.

    git worktree add /tmp/before REV
    python benchmarks/paired_commits.py /tmp/before --rounds 5
    python benchmarks/paired_commits.py /tmp/before --rounds 5 --only decode64   # one script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DECODE = ["decode.py", "--batches", "1", "--no-transformers", "--plain-batches",
          "--speculative-batches", "--json"]  # fmt: skip
COUNTERFACTUAL = ["counterfactual.py", "--repeats", "1", "--json"]
SCRIPTS = {
    "decode": DECODE,  # batch 1, 256 new tokens
    "decode64": [DECODE[0], "--batches", "64", "--new-tokens", "64", *DECODE[3:]],
    "counterfactual": COUNTERFACTUAL,
}
# (script, key in its JSON, higher is better)
MEASURES = [
    ("decode", "cfjax_tok_s", True),
    ("decode64", "cfjax_tok_s", True),
    ("counterfactual", "factual_s", False),
    ("counterfactual", "cf_edit0_s", False),
    ("counterfactual", "cf_reuse_middle_s", False),
    ("counterfactual", "batched_s", False),
]


def run(tree: Path, args: list[str]) -> dict:
    """One benchmark run in `tree` (its own `benchmarks/` and `cfjax`), its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # that tree's cfjax, not the installed one
    out = subprocess.run([sys.executable, *args], cwd=tree / "benchmarks", capture_output=True,
                         text=True, check=True, env=env)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result[0] if isinstance(result, list) else result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="the other tree (e.g. a git worktree of REV)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="these scripts alone")
    args = ap.parse_args()
    trees = {"new": HERE.parent, "old": args.before.resolve()}
    scripts = {name: cmd for name, cmd in SCRIPTS.items() if name in (args.only or SCRIPTS)}
    measures = [m for m in MEASURES if m[0] in scripts]
    ratios: dict[str, list[float]] = {f"{s}.{k}": [] for s, k, _ in measures}
    for r in range(args.rounds):
        order = ["new", "old"] if r % 2 == 0 else ["old", "new"]
        got = {t: {name: run(trees[t], cmd) for name, cmd in scripts.items()} for t in order}
        for script, key, _ in measures:
            ratios[f"{script}.{key}"].append(got["new"][script][key] / got["old"][script][key])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in ratios.items()), file=sys.stderr)  # fmt: skip
    summary = {
        k: {"median_new_over_old": round(float(np.median(v)), 3), "rounds": [round(x, 3) for x in v],
            "higher_is_better": better}
        for (_, _, better), (k, v) in zip(measures, ratios.items(), strict=True)
    }  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
