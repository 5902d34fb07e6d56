"""Every route through the engine gives today exactly what it gave before the engine became one
decode kernel (issue 29): tokens, log-probs (as exact floats), noise indices and texts of the
runs in `golden_runs.py`, on the tiny random model and on SmolLM2. (The sharded run is checked
by `test_sharding.py`, in its 8-device child process.) The tiny model's two bfloat16 runs were
re-recorded once, when every bfloat16 rounding of the network became explicit (seventeenth
session, `invariant.round_to`; before, XLA kept or dropped some of them by program). Every run
was re-recorded once more when the prefill began to compute prompts anchored at slot 0 (issue
34, eighteenth session: the attention sums group a prompt's slots from its first token, so that
prompts sharing a prefix share its keys and values): no token and no text changed, 5 of the
tiny model's and 15 of SmolLM2's log-prob lists moved by rounding (at most 3.3e-6 and 3.0e-5).
And once more when the CPU's attention began to score with dots in row tiles (issue 30,
nineteenth session: the scores' sums over the head in XNNPACK's order instead of a tree): no
token and no text changed, log-probs moved by at most 6.8e-5 (tiny), 3.8e-5 (SmolLM2) and
1.9e-5 (the sharded run). And once more when the CPU's prefill began to run its matmuls in
tiles of 64 rows and its attention as dots of one shape (issue 34, twentieth session): no token
and no text changed, log-probs moved by at most 1.3e-5 (tiny) and 3.6e-5 (SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path

import golden_runs
import pytest

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden.json").read_text())


def _differences(want, got, where=""):
    """The paths where two JSON values differ (at most one per run)."""
    if isinstance(want, dict) and isinstance(got, dict):
        keys = sorted(set(want) | set(got))
        return [d for k in keys for d in _differences(want.get(k), got.get(k), f"{where}/{k}")]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        if want != got and all(isinstance(x, (dict, list)) for x in want):
            return [d for i, (a, b) in enumerate(zip(want, got, strict=True)) for d in _differences(a, b, f"{where}[{i}]")]  # fmt: skip
    return [] if want == got else [f"{where}: {str(want)[:120]} != {str(got)[:120]}"]


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_golden_runs_are_bit_identical(model):
    runs = golden_runs.tiny_runs() if model == "tiny" else golden_runs.smollm2_runs()
    assert set(runs) == set(GOLDEN[model])
    assert not _differences(GOLDEN[model], runs), _differences(GOLDEN[model], runs)[:10]
