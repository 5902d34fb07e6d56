"""Abduction cost: posterior samples of observed text, each followed by a counterfactual.

SmolLM2-135M-Instruct float32, the decode benchmark's chat prompt, an observed response of
`--observed` tokens (200; written by the model at temperature 1 with another key and no stop
token, so every run has the same length), `--samples` posterior samples (64) at temperature 1,
and for each a counterfactual with a different token at the middle step, generated to the
observed length.

- cfjax: `abduct` + `counterfactuals`, warm (one untimed run first), with the stored
  observation and KV cache cleared before each timed run, so that the scoring pass is timed.
- reference: Ravfogel et al.'s way (`abduction_peer.py`, transformers in a child process): per
  sample, a full HF forward, numpy top-down truncated-Gumbel noise, then HF `generate` with the
  noise added. It is one sample after another, so `--reference-samples` of them are timed and
  scaled to `--samples` (the JSON says how many ran).

    python benchmarks/abduction.py            # table
    python benchmarks/abduction.py --json     # {"cfjax_s", "reference_s", "speedup", ...}
    python benchmarks/abduction.py --config tiny --observed 24 --samples 4 --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    CompileClock,
    lm_with_hf_source,
    prompt_for,
    provenance,
    run_peer,
)


def main() -> None:
    """Time both sides; print the table (or the JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--observed", type=int, default=200, help="observed response tokens")
    ap.add_argument("--samples", type=int, default=64, help="posterior samples")
    ap.add_argument("--reference-samples", type=int, default=16, help="reference samples timed")
    ap.add_argument("--repeats", type=int, default=2, help="timed cfjax runs (best kept)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    args = ap.parse_args()

    from cfjax import ReplaceTokens, Sampler, abduct, counterfactuals, generate

    started = time.perf_counter()
    clock = CompileClock()
    tmp = tempfile.TemporaryDirectory()
    lm, source = lm_with_hf_source(args.model, args.config, Path(tmp.name))
    prompt = prompt_for(lm, args.prompt, 40)
    n, mid = args.observed, args.observed // 2
    observed = generate(lm, prompt, key=7, sampler=Sampler(1.0), max_new_tokens=n, stop_tokens=())
    tokens = observed.tokens
    new_token = (tokens[mid] + 1) % lm.config.vocab_size
    edit = ReplaceTokens(mid, [new_token])

    def work():
        lm.caches.clear()
        lm.observations.clear()
        posts = abduct(lm, prompt, tokens, key=0, sampler=Sampler(1.0),
                       num_samples=args.samples, stop_tokens=())  # fmt: skip
        return posts, counterfactuals(lm, posts, [edit] * args.samples)

    with clock.measure() as compile_s:
        work()
    cfjax_s = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        posts, cfs = work()
        cfjax_s = min(cfjax_s, time.perf_counter() - t)
    null = counterfactuals(lm, posts, [ReplaceTokens(0, [tokens[0]])] * args.samples)
    replays = all(c.tokens == tokens for c in null)
    distinct = len({tuple(c.tokens) for c in cfs})
    if any(len(c.tokens) != n for c in cfs):
        raise RuntimeError("a counterfactual stopped before the observed length")

    spec = {"prompt": prompt, "observed": tokens, "edit_at": mid, "new_token": new_token,
            "samples": min(args.reference_samples, args.samples)}  # fmt: skip
    ref = run_peer("abduction_peer.py", {**spec, "source": source})
    reference_s = ref["per_sample_s"] * args.samples
    result = {
        "cfjax_s": round(cfjax_s, 3),
        "reference_s": round(reference_s, 3),
        "speedup": round(reference_s / cfjax_s, 2),
        "samples": args.samples,
        "observed_tokens": n,
        "edit_at": mid,
        "reference_samples_timed": ref["samples"],
        "reference_per_sample_s": round(ref["per_sample_s"], 3),
        "reference_replay_misses": ref["replay_misses"],
        "cfjax_replays_observation": bool(replays),
        "distinct_counterfactuals": distinct,
        **provenance(lm, ref, compile_s[0], started),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"abduction: {args.samples} posterior samples of a {n}-token response, an edit at "
          f"step {mid} each ({lm.model_id})")  # fmt: skip
    print(f"  cfjax abduct + counterfactuals   {cfjax_s:8.2f} s")
    print(f"  reference (Ravfogel et al., HF)  {reference_s:8.2f} s  "
          f"({ref['samples']} timed, {ref['per_sample_s']:.2f} s each)")  # fmt: skip
    print(f"  speedup                          {reference_s / cfjax_s:8.2f}x")
    print(f"  every sample replays the observation: {replays}; distinct counterfactuals: "
          f"{distinct}")  # fmt: skip


if __name__ == "__main__":
    main()
