"""Smoke test of the benchmark scripts: tiny random configs, JSON fields and sane values.

Each script runs as a subprocess of the one test that reads its output (mostly start-up and
compilation), and needs no model download. All of them are `slow` (10-60 s each, ~190 s in all on
a 2-core CPU): they check the benchmarks, not the library, and run in `make test-slow`, which CI
runs too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TIMEOUT = 180

COMMANDS = {
    "decode": [
        "decode.py",
        *("--config", "tiny", "--batches", "1", "--new-tokens", "8", "--copy-mib", "32"),
        *("--sample-batches", "1", "--speculative-tokens", "12", "--speculative-pairs", "1"),
        *("--lookahead", "3", "--repeats", "2"),
    ],
    "counterfactual": [
        "counterfactual.py",
        *("--config", "tiny", "--new-tokens", "16", "--batch", "4", "--sequential", "2"),
        *("--repeats", "1"),
    ],
    "gpu_check": [
        "gpu_check.py",
        *("--config", "tiny", "--prompt-len", "40", "--new-tokens", "24", "--batches", "1", "4"),
        *("--profile-steps", "8", "--attribution-words", "5"),
    ],
    "profile": ["profile_decode.py", *("--config", "tiny", "--steps", "8")],
    "study": [
        "study.py",
        *("--config", "tiny", "--prompts", "2", "--reference-prompts", "1"),
        *("--temperatures", "0.7,1.0", "--new-tokens", "16"),
    ],
    "attribution": [
        "attribution.py",
        *("--config", "tiny", "--words", "5", "--new-tokens", "8", "--sequential", "2"),
        *("--repeats", "1"),
    ],
    "invariance_cost": [
        "invariance_cost.py",
        *("--config", "tiny", "--batches", "1", "4", "--new-tokens", "8", "--rounds", "2"),
    ],
    "blocks_cost": [
        "invariance_cost.py",
        *("--config", "tiny", "--batches", "2", "--new-tokens", "8", "--rounds", "1"),
        *("--model-blocks", "8", "--prompt-tokens", "50"),
    ],
    "abduction": [
        "abduction.py",
        *("--config", "tiny", "--observed", "24", "--samples", "4", "--reference-samples", "2"),
        *("--repeats", "1"),
    ],
    "batch_sizes": [
        "batch_sizes.py",
        *("--config", "tiny", "--sizes", "17", "18", "19", "--new-tokens", "4", "--rounds", "1"),
    ],
    "row_sweep": [
        "batch_invariance.py",
        *("--config", "tiny", "--row-sweep", "--rows", "40", "--dtypes", "float32"),
    ],
}


def run(name: str, *extra: str, env: dict | None = None) -> dict | list:
    """The parsed `--json` output of `COMMANDS[name]` (and `extra` arguments; `env`: variables
    to set, None to unset). Each test runs its own script, so each runs once, on whichever
    worker has the test (a module fixture runs once per worker)."""
    changes = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    env = {k: v for k, v in {**os.environ, **changes}.items() if v is not None}
    cmd = COMMANDS[name]
    proc = subprocess.run(
        [sys.executable, str(BENCH / cmd[0]), *cmd[1:], *extra, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_decode_json():
    rows = run("decode")
    assert isinstance(rows, list)
    assert [r["batch"] for r in rows] == [1]
    for r in rows:
        for field in ("cfjax_tok_s", "transformers_tok_s", "ratio", "bandwidth_fraction"):
            assert _positive(r[field]), (field, r)
        assert r["ratio"] == pytest.approx(r["cfjax_tok_s"] / r["transformers_tok_s"], rel=0.01)
        assert r["bandwidth_fraction"] < 2  # a measured copy is near the roofline, not far below
        assert r["compile_s"] > 0 and r["recompile_s"] < 0.5  # the timed run compiles ~nothing
        assert _positive(r["cfjax_peak_rss_mb"]) and _positive(r["transformers_peak_rss_mb"])
        assert r["new_tokens"] == 8 and r["timed_runs"] == 2  # batch 1: best of --repeats
        # The textbook JAX decode beside it sampled the very same tokens.
        assert r["plain_scan_same_tokens"] is True and _positive(r["cfjax_over_plain_scan"])
        assert _positive(r["matmul_floor_tok_s"]) and _positive(r["cfjax_over_matmul_floor"])
        # cfjax over its yardsticks: the median of rounds in which they took turns.
        rounds = r["cfjax_over_matmul_floor_rounds"]
        assert len(rounds) == 2 and all(_positive(x) for x in rounds)
        assert r["cfjax_over_matmul_floor"] == pytest.approx(np.median(rounds), abs=2e-3)
        # jit(vmap(core.sample)) beside generate, on the same keys: the same tokens.
        assert r["core_sample_same_tokens"] is True and _positive(r["core_sample_tok_s"])
        assert r["core_sample_over_generate"] == pytest.approx(
            r["core_sample_tok_s"] / r["cfjax_tok_s"], rel=0.01, abs=1e-3
        )
        # The peer's floor: the same matmuls in torch, timed in transformers' own process.
        assert _positive(r["torch_matmul_floor_tok_s"])
        # (ratios are rounded to 3 decimals: on the tiny model transformers' is ~0.03)
        assert r["transformers_over_torch_floor"] == pytest.approx(
            r["transformers_tok_s"] / r["torch_matmul_floor_tok_s"], rel=0.01, abs=1e-3
        )
        assert r["matmul_floor_over_transformers"] == pytest.approx(
            r["matmul_floor_tok_s"] / r["transformers_tok_s"], rel=0.01, abs=1e-3
        )
        # Speculative decoding with the int8 draft: the plain tokens, its acceptance reported.
        assert r["speculative_draft"].endswith("@int8") and r["speculative_lookahead"] == 3
        assert r["speculative_flips"] == 0
        assert 0 <= r["acceptance_rate"] <= 1 and 1 <= r["tokens_per_round"] <= 4
        assert _positive(r["speculative_tok_s"]) and _positive(r["speculative_over_plain"])
        assert _positive(r["read_gb_s"]) and _positive(r["read_roofline_tok_s"])
        assert r["read_bandwidth_fraction"] > 0
        # Both rooflines divide the same bytes per step by their own measured bandwidth. (The
        # fractions themselves are rounded to 0.001, too coarse to compare at the tiny config.)
        ratio = r["read_roofline_tok_s"] / r["roofline_tok_s"]
        assert ratio == pytest.approx(r["read_gb_s"] / r["copy_gb_s"], rel=0.02)


def test_counterfactual_json():
    r = run("counterfactual")
    assert isinstance(r, dict)
    for field in ("cf_over_factual", "cf_reuse_middle_over_factual", "batched64_speedup"):
        assert _positive(r[field]), (field, r)
    assert r["cf_over_factual"] < 10 and r["cf_reuse_middle_over_factual"] < 10
    assert r["batch"] == 4 and r["sequential_timed"] == 2
    assert r["batched_matches_sequential"] is True
    assert len(r["cf_over_factual_rounds"]) == len(r["batched64_speedup_rounds"]) == 1


def test_attribution_json():
    r = run("attribution")
    assert r["units"] == 5 and r["sequential_timed"] == 2 and r["batched_matches_one_by_one"] is True  # fmt: skip
    assert _positive(r["speedup"]) and r["speedup"] == pytest.approx(np.median(r["speedup_rounds"]))  # fmt: skip
    # Both are rounded to the millisecond: 0.034 s x 5 / 2 may print as 0.086 (CI, 1336c9e).
    scaled = r["sequential_subset_s"] * 5 / 2
    assert r["sequential_scaled_s"] == pytest.approx(scaled, rel=0.01, abs=0.0005 * (1 + 5 / 2))


def test_batch_sizes_json():
    out = run("batch_sizes")
    assert out["padded_sizes"] == [18, 18, 20] and out["same_tokens"] is True
    # Padded, 17 and 18 rows run as one size: fewer programs compiled (the engine's prefill and
    # decode chunk per size; the eager key splits of each size are compiled in both modes).
    assert out["padded"]["programs"] < out["unpadded"]["programs"]
    for mode in ("padded", "unpadded"):
        assert _positive(out[mode]["cold_s"]) and _positive(out[mode]["compile_s"])
    assert _positive(out["padded_over_unpadded_cold"]) and _positive(out["padded_over_unpadded_warm"])  # fmt: skip


def _counts(found: str) -> set[int]:
    """A row sweep's class as row counts: "1, 3-5" -> {1, 3, 4, 5}."""
    ends = [[int(m) for m in part.split("-")] for part in found.split(", ")]
    return {m for e in ends for m in range(e[0], e[-1] + 1)}


def test_row_sweep_json():
    """The tile limit the CPU's decode rests on holds on this machine: at the tiny config's
    shapes (under 1,024 features), row 0 of a tile's dot rounds alike for 2..ROWS rows."""
    from cfjax.core import invariant

    sweep = run("row_sweep")["by_dtype"]["float32"]["row_sweep"]
    assert set(sweep) == {"qkv 64x128", "o 64x64", "gate_up 64x256", "down 128x64", "head 256x64"}
    for op, found in sweep.items():
        classes = [_counts(c) for c in found]
        assert sorted(m for c in classes for m in c) == list(range(1, 41)), op
        assert set(range(2, invariant.ROWS + 1)) <= next(c for c in classes if 2 in c), (op, found)


def test_row_sweep_transposed_json():
    """`--transposed` sweeps the layer weights stored [N, K] (the head's layout) in place of
    the stored ones: every layer matmul, each row count in exactly one class."""
    sweep = run("row_sweep", "--transposed", "--rows", "6")["by_dtype"]["float32"]["row_sweep"]
    assert set(sweep) == {"qkv [N, K] 128x64", "o [N, K] 64x64", "gate_up [N, K] 256x64", "down [N, K] 64x128"}  # fmt: skip
    for op, found in sweep.items():
        assert sorted(m for c in found for m in _counts(c)) == list(range(1, 7)), (op, found)


def test_invariance_cost_json():
    r = run("invariance_cost")["batches"]
    assert set(r) == {"1", "4"}
    for row in r.values():
        assert _positive(row["variant_over_invariant"]) and _positive(row["invariant_tok_s"])
        assert set(row["compile_s"]) == {"invariant", "variant"}


def test_invariance_cost_against_model_blocks_json():
    out = run("blocks_cost")
    (row,) = out["batches"].values()
    assert out["prompt_tokens"] == 50 and _positive(row["invariant_s"]) and _positive(row["blocked_s"])  # fmt: skip
    assert _positive(row["blocked_over_invariant"]) and _positive(row["blocked_tok_s"])
    assert set(row["compile_s"]) == {"invariant", "blocked"}


def test_abduction_json():
    out = run("abduction")
    for k in ("cfjax_s", "reference_s", "speedup", "reference_per_sample_s"):
        assert _positive(out[k]), k
    assert out["reference_samples_timed"] == 2 and out["samples"] == 4
    # Both sides' noise explains the observation; the counterfactual samples differ.
    assert out["reference_replay_misses"] == 0 and out["cfjax_replays_observation"] is True
    assert out["distinct_counterfactuals"] > 1


def test_study_json():
    out = run("study")
    for k in ("cfjax_s", "paper_method_s", "speedup", "reference_per_prompt_s"):
        assert _positive(out[k]), k
    assert out["prompts"] == 2 and out["reference_prompts_timed"] == 1 and out["rows"] > 0


def test_gpu_check_json(tmp_path):
    # Its own compilation cache, empty: the first runs' compile_s are XLA's.
    env = {"CFJAX_COMPILATION_CACHE": str(tmp_path / "xla"), "JAX_COMPILATION_CACHE_DIR": None}
    r = run("gpu_check", "--out", str(tmp_path / "gpu_check.json"), env=env)
    # The file rewritten after every check ends as the printed result, marked complete.
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == r and r["complete"] is True
    assert r["compilation_cache"] == {"folder": str(tmp_path / "xla"), "entries_at_start": 0, "compile_ahead": True}  # fmt: skip
    assert [row["batch"] for row in r["rows"]] == [1, 4]
    assert r["rows"][0]["null_intervention_flips"] == 0
    first = r["rows"][0]
    for row in r["rows"]:  # the textbook decode (layers unrolled, and scanned) and the matmul floor
        assert _positive(row["plain_scan_tok_s"]) and _positive(row["matmul_floor_tok_s"])
        assert 0 <= row["plain_scan_same_first_tokens"] <= 24
        assert _positive(row["plain_scan_compile_s"]) and _positive(row["plain_scan_layers_compile_s"])  # fmt: skip
        assert _positive(row["plain_scan_layers_tok_s"])
        # The same arithmetic in another program (bfloat16 here: rounded otherwise in places).
        assert 0.5 <= row["plain_scan_layers_same_tokens"] <= 1, row
    # Batch invariance of a row alone, in identical rows and among other prompts (issue 30).
    second = r["rows"][1]
    assert second["invariance_flips"] >= 0 and second["invariance_max_logprob_diff"] >= 0
    # Speculative decoding with the int8 variant of the same weights as the draft.
    assert first["speculative_flips"] == 0 and 0 <= first["acceptance_rate"] <= 1
    assert _positive(first["speculative_tok_s"]) and _positive(first["speculative_over_plain"])
    assert _positive(first["draft_step_cost"])  # the int8 draft's step over the target's
    assert all(_positive(row["tok_s"]) for row in r["rows"])
    for row in r["rows"]:  # the same rows with model_blocks=8 (issue 30)
        assert _positive(row["model_blocks_tok_s"]) and _positive(row["model_blocks_over_default"])
        assert 0 <= row["model_blocks_other_tokens"] <= 24
    # The prefill and the chunk program, lowered and compiled apart in a child process: with the
    # cache off, and with the cache the run filled, from which both programs load (the split
    # compiles the very programs the run ran).
    for name in ("compile_split", "compile_split_cached", "compile_split_variant"):
        split = r[name]
        assert split["batch"] == 1, split
        for part in ("prefill_lower_s", "prefill_compile_s", "chunk_lower_s", "chunk_compile_s", "together_compile_s"):  # fmt: skip
            assert _positive(split[part]), (part, split)
    assert "cache_hits" not in r["compile_split"] and "cache_hits" not in r["compile_split_variant"]
    assert r["compile_split_cached"]["cache_hits"] == {"prefill": True, "chunk": True}
    # Issue 34's sweep with the real Llama 3 tokenizer (tiny random weights of its vocabulary).
    a = r["attribution"]
    assert a["units"] == 5 and a["batched_matches_one_by_one"] is True, a
    assert _positive(a["speedup"]) and _positive(a["batched_s"]), a
    for row in r["rows"]:  # transformers on the same config and shapes, in a child process
        assert _positive(row["transformers_dynamic_tok_s"]), row
        assert row["transformers_static_tok_s"] is None  # torch.compile: on accelerators only
    for row in r["rows"]:  # per batch, traced in a child process (command buffers off)
        ops = row["profile"]
        assert isinstance(ops, list) and 0 < len(ops) <= 10, ops
        assert all(set(o) == {"op", "ms_per_step"} and o["ms_per_step"] >= 0 for o in ops)
        assert {o["op"].split()[0] for o in ops} & {"dot", "ynn_fusion"}, ops  # the matmuls
    # Each check's seconds, in the order they ran; without a budget nothing is skipped.
    assert list(r["check_s"]) == [
        "init", "batch_1", "batch_4", "speculative", "transformers", "compile_split",
        "yardsticks", "profiles", "yardsticks_4", "compile_split_variant", "attribution",
        "model_blocks_1", "model_blocks_4",
    ]  # fmt: skip
    assert "skipped" not in r and r["total_s"] >= sum(r["check_s"].values()) - 1


def test_gpu_check_budget(tmp_path, monkeypatch):
    """An optional check starts only while `--budget-s` lasts; one that does not is listed."""
    monkeypatch.syspath_prepend(str(BENCH))
    # Importing the benchmarks sets CFJAX_COMPILATION_CACHE (off, for their own processes):
    # restored after the test, so that this worker's later child processes keep their cache.
    monkeypatch.delenv("CFJAX_COMPILATION_CACHE", raising=False)
    import gpu_check

    unbounded = gpu_check.Checks({}, None, budget_s=0)
    assert unbounded.in_budget("attribution") and "skipped" not in unbounded.result
    hour = gpu_check.Checks({}, tmp_path / "hour.json", budget_s=3600)
    with hour.step("init"):
        pass
    assert hour.in_budget("attribution") and list(hour.result["check_s"]) == ["init"]
    spent = gpu_check.Checks({}, tmp_path / "spent.json", budget_s=1e-9)
    assert not spent.in_budget("attribution")
    (line,) = json.loads((tmp_path / "spent.json").read_text())["skipped"]
    assert line.startswith("attribution: the 1e-09 s budget was spent"), line


def test_profile_json():
    r = run("profile")
    assert r["batch"] == 1 and r["steps"] == 8
    ops = {o["op"].split()[0] for o in r["ops"]}
    # The matmuls are traced: XLA:CPU runs the decode step's (2 to 32 rows per tile, see
    # `invariant.tiles`) as XNNPACK fusions, a single row as a `dot`.
    assert ops & {"dot", "ynn_fusion"}
    assert sum(o["share"] for o in r["ops"]) == pytest.approx(1, abs=0.01)
    # Ops inside the loop are counted once each: counting the loop's own span as well would
    # double the sum.
    assert 0 < r["ops_ms_per_step"] <= r["wall_ms_per_step"] * 1.5
