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
and no text changed, log-probs moved by at most 1.3e-5 (tiny) and 3.6e-5 (SmolLM2).

The records are per machine class (`golden_runs.numerics_probe`): XLA:CPU's float32 kernels round
differently on another CPU, and a machine without a record is held to the tokens and texts, with
log-probs within a bound (see `golden_runs`)."""

from __future__ import annotations

import json
import warnings

import golden_runs
import pytest


# Both slow (the tiny model's runs: 55-110 s, every route compiled once): `make test` keeps the
# relative equalities, and CI runs these in `make test-slow`.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_golden_runs_are_bit_identical(model):
    runs = golden_runs.tiny_runs() if model == "tiny" else golden_runs.smollm2_runs()
    note = golden_runs.check(model, runs)
    if note:
        warnings.warn(note, stacklevel=1)


def test_a_change_of_results_is_caught_on_a_recorded_machine_and_a_new_one(monkeypatch):
    """The checks fail on a changed log-prob where this machine has a record, and on a changed
    token (or a log-prob moved past the cross-machine bound) where it has none."""
    record = golden_runs.records()[0]
    runs = json.loads(json.dumps(record["tiny"]))
    runs["factual"]["logprobs"][3] += 1e-6
    monkeypatch.setattr(golden_runs, "numerics_probe", lambda: record["probe"])
    with pytest.raises(AssertionError, match="factual/logprobs"):
        golden_runs.check("tiny", runs)
    monkeypatch.setattr(golden_runs, "numerics_probe", lambda: "another machine")
    assert "no record of this machine" in golden_runs.check("tiny", runs)
    runs["factual"]["logprobs"][3] += 1e-2
    with pytest.raises(AssertionError, match="log-probs 1.00e-02 apart"):
        golden_runs.check("tiny", runs)
    runs = json.loads(json.dumps(record["tiny"]))
    runs["factual"]["tokens"][5] += 1
    with pytest.raises(AssertionError, match="factual/tokens"):
        golden_runs.check("tiny", runs)


def test_the_records_are_of_the_numerics_every_trace_carries():
    """The golden file names the cfjax numerics it was recorded under, which is the one every
    trace's `made_on` carries now: a change of results re-records the file under a new one."""
    from cfjax.causal import environment

    assert golden_runs.golden_file()["numerics"] == environment.NUMERICS


def test_changed_results_are_recorded_only_under_new_numerics():
    """`golden_runs.updated`: a machine of unchanged code is added beside the others; changed
    results replace every record, and only under a new cfjax numerics (else traces made before
    the change would replay as if nothing had moved)."""
    mine = {"machine": "m", "probe": "p", "tiny": {"a": [1.0]}, "smollm2": {}, "sharded": None}
    other = {**mine, "machine": "o", "probe": "q"}
    stored = {"numerics": "3", "records": [other]}
    assert golden_runs.updated(stored, mine, True, "3") == {"numerics": "3", "records": [mine, other]}  # fmt: skip
    with pytest.raises(SystemExit, match="bump cfjax.causal.environment.NUMERICS first"):
        golden_runs.updated(stored, mine, False, "3")
    assert golden_runs.updated(stored, mine, False, "4") == {"numerics": "4", "records": [mine]}
    with pytest.raises(SystemExit, match="records are of cfjax numerics '3'.*without --add"):
        golden_runs.updated(stored, mine, True, "4")
    both = {"numerics": "3", "records": [mine, other]}
    assert golden_runs.updated(both, mine, False, "3")["records"] == [mine]  # the same results
    moved = {**mine, "tiny": {"a": [1.5]}}
    with pytest.raises(SystemExit, match="this machine's results changed"):
        golden_runs.updated(both, moved, True, "3")
    with pytest.raises(SystemExit, match="bump"):
        golden_runs.updated(both, moved, False, "3")
    assert golden_runs.updated({}, mine, False, "1") == {"numerics": "1", "records": [mine]}
