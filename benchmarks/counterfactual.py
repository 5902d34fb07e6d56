"""Counterfactual cost on the CPU: a counterfactual against the factual run it comes from.

SmolLM2-135M-Instruct float32 (cfjax's embedded default), the decode benchmark's chat prompt,
temperature-1 sampling with no stop token, so the factual trace and every counterfactual have
exactly `--new-tokens` steps (128 by default, not the decode benchmark's 256, so that both
benchmarks together finish within 10 minutes on a 2-core CPU). All timings are warm (one
untimed run of each kind first). Every ratio is the median over `--repeats` (default 5) rounds
in which each kind runs once, interleaved, so each round's ratio compares runs seconds apart
(single runs on this VM move by ±9% between rounds); the seconds shown are the medians too.

- cf / factual: an edit at response step 0 (a different first token), a full replay of the same
  length (no cache to reuse before step 0). Also reported: a null edit at the middle (the factual
  token forced to itself) replayed without cache reuse.
- cf (reuse at the middle) / factual: an edit at the middle step, resumed from the factual KV
  cache, so only the steps from the edit on run.
- batched speedup: `counterfactuals(lm, trace, [64 edits])` (64 different tokens at the middle,
  one batch) against 64 one-by-one `counterfactual` calls. The one-by-one side times a subset
  (`--sequential`, default 2) and scales it to 64, as the output says; each round times both
  sides, and the speedup is the median of the rounds' speedups.

    python benchmarks/counterfactual.py            # table
    python benchmarks/counterfactual.py --json     # {"cf_over_factual", ...}
    python benchmarks/counterfactual.py --config tiny --new-tokens 16 --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    CompileClock,
    best_time,
    load_lm,
    machine,
    prompt_for,
)


def main() -> None:
    """Time the factual run and the counterfactuals; print the table (or the JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)"
    )
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="counterfactuals in the batched run")
    ap.add_argument("--sequential", type=int, default=2, help="one-by-one runs timed (scaled)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians reported)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--prompt-len", type=int, default=40, help="random prompt length (--config)")
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    args = ap.parse_args()

    import jax

    from cfjax import ReplaceTokens, Sampler, counterfactual, counterfactuals, generate

    started = time.perf_counter()
    clock = CompileClock()
    lm, _ = load_lm(args.model, args.config)
    prompt = prompt_for(lm, args.prompt, args.prompt_len)
    n, vocab = args.new_tokens, lm.config.vocab_size

    def log(msg: str) -> None:
        if not args.json:
            print(f"  {msg}", flush=True)

    def factual():
        return generate(
            lm,
            prompt,
            key=1,
            sampler=Sampler(temperature=1.0),
            max_new_tokens=n,
            stop_tokens=(),
        )

    with clock.measure() as compile_s:
        trace = factual()
    if len(trace.tokens) != n:
        raise RuntimeError(f"the factual run produced {len(trace.tokens)} tokens, not {n}")
    mid = n // 2
    other = lambda t, i=0: (t + 1 + i) % vocab  # a token other than `t`
    edit0 = ReplaceTokens(0, [other(trace.tokens[0])])
    null_mid = ReplaceTokens(mid, [trace.tokens[mid]])
    edit_mid = ReplaceTokens(mid, [other(trace.tokens[mid])])
    kinds = {
        "factual": factual,
        "cf_edit0": lambda: counterfactual(lm, trace, edit0, reuse_cache=False),
        "cf_null_middle": lambda: counterfactual(lm, trace, null_mid, reuse_cache=False),
        "cf_reuse_middle": lambda: counterfactual(lm, trace, edit_mid),
    }
    with clock.measure() as cf_compile_s:
        for fn in kinds.values():
            fn()  # warm-up
    rounds = {name: [] for name in kinds}
    for _ in range(args.repeats):  # interleaved, so a load change hits every kind alike
        for name, fn in kinds.items():
            out, s = best_time(fn, 1)
            rounds[name].append(s)
            if name != "factual" and len(out.tokens) != n:
                raise RuntimeError(f"{name} produced {len(out.tokens)} tokens, not {n}")
    seconds = {name: float(np.median(v)) for name, v in rounds.items()}
    over_factual = {  # each round's ratio to the factual run of the same round, then the median
        name: float(np.median(np.asarray(v) / np.asarray(rounds["factual"])))
        for name, v in rounds.items()
    }
    log("batch-1 kinds: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))

    edits = [ReplaceTokens(mid, [other(trace.tokens[mid], i)]) for i in range(args.batch)]
    with clock.measure() as batch_compile_s:  # compiles the batch's shapes, runs one step
        counterfactuals(lm, trace, edits, max_new_tokens=mid + 1)
    subset = min(args.sequential, args.batch)
    batched_runs, subset_runs = [], []
    for _ in range(args.repeats):  # interleaved rounds, as for the batch-1 kinds
        batched, s = best_time(lambda: counterfactuals(lm, trace, edits), 1)
        batched_runs.append(s)
        one_by_one, s = best_time(
            lambda: [counterfactual(lm, trace, iv) for iv in edits[:subset]], 1
        )
        subset_runs.append(s)
    batched_s, subset_s = float(np.median(batched_runs)), float(np.median(subset_runs))
    speedups = np.asarray(subset_runs) * args.batch / subset / np.asarray(batched_runs)
    log(f"batched {args.batch}: {batched_s:.2f} s")
    sequential_s = subset_s * args.batch / subset
    log(f"one by one: {subset} in {subset_s:.2f} s -> {args.batch} in {sequential_s:.2f} s")
    matches = all(a.tokens == b.tokens for a, b in zip(one_by_one, batched, strict=False))

    f = seconds["factual"]
    result = {
        "cf_over_factual": round(over_factual["cf_edit0"], 3),
        "cf_reuse_middle_over_factual": round(over_factual["cf_reuse_middle"], 3),
        "batched64_speedup": round(float(np.median(speedups)), 2),
        "cf_null_middle_over_factual": round(over_factual["cf_null_middle"], 3),
        # Every round's ratio, to show the spread the medians summarise.
        "cf_over_factual_rounds": [
            round(x, 3) for x in np.asarray(rounds["cf_edit0"]) / np.asarray(rounds["factual"])
        ],  # noqa: E501
        "batched64_speedup_rounds": [round(float(x), 2) for x in speedups],
        "factual_s": round(f, 3),
        "cf_edit0_s": round(seconds["cf_edit0"], 3),
        "cf_null_middle_s": round(seconds["cf_null_middle"], 3),
        "cf_reuse_middle_s": round(seconds["cf_reuse_middle"], 3),
        "batch": args.batch,
        "batched_s": round(batched_s, 3),
        "sequential_timed": subset,
        "sequential_subset_s": round(subset_s, 3),
        "sequential_scaled_s": round(sequential_s, 3),
        "batched_matches_sequential": bool(matches),
        "compile_s": round(compile_s[0], 2),
        "cf_extra_compile_s": round(cf_compile_s[0], 2),
        "batch_compile_s": round(batch_compile_s[0], 2),
        "new_tokens": n,
        "edit_middle_step": mid,
        "prompt_len": len(prompt),
        "repeats": args.repeats,
        "model": lm.model_id,
        "jax": jax.__version__,
        **machine(),
    }
    if args.json:
        print(json.dumps(result))
        return
    r = result
    print(
        f"{r['model']} float32, prompt {r['prompt_len']} tokens, {n} sampled tokens (temperature 1, "
        f"no stop), jax {r['jax']}; {r['cpu']}, {r['cores']} cores, load {r['load_avg_1m']}, "
        f"{r['date']}"
    )
    if n != 256:
        print(f"({n} tokens, not 256, to keep both CPU benchmarks within 10 minutes)")
    print(f"medians of {args.repeats} interleaved rounds")
    print("measure | seconds | / factual")
    print(f"factual ({n} steps) | {f:.3f} | 1")
    print(f"cf, edit at step 0, full replay | {r['cf_edit0_s']} | {r['cf_over_factual']}")
    print(
        f"cf, null edit at step {mid}, full replay | {r['cf_null_middle_s']} | "
        f"{r['cf_null_middle_over_factual']}"
    )
    print(
        f"cf, edit at step {mid}, cache reuse | {r['cf_reuse_middle_s']} | "
        f"{r['cf_reuse_middle_over_factual']}"
    )
    print(
        f"{r['batch']} cfs in one batch | {r['batched_s']} | speedup over one by one "
        f"{r['batched64_speedup']}x (one by one: {subset} timed, {r['sequential_subset_s']} s, "
        f"scaled to {r['batch']}: {r['sequential_scaled_s']} s); batched == one by one: {matches}"
    )
    print(
        f"compile {r['compile_s']} s (factual), +{r['cf_extra_compile_s']} s (cf kinds), "
        f"+{r['batch_compile_s']} s (batch {r['batch']}); total {time.perf_counter() - started:.0f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
