"""Attribution on the CPU: one sweep over a prompt's words as one batch, against the same
counterfactuals run one by one.

SmolLM2-135M-Instruct float32, a 40-word chat prompt, temperature-1 sampling with no stop token
(every answer has exactly `--new-tokens` steps). `cfjax.attribute(lm, fact, interventional=False)`
(every word removed, one engine batch, its prefill reusing the prefix each edited prompt shares
with the factual one) against `counterfactual(lm, fact, EditPrompt(...))` per word. The one-by-one side times `--sequential` words and scales to all of them, as the output
says. Both warm (one untimed run of each first); the speedup is the median over `--repeats`
interleaved rounds of each round's ratio (single runs on this VM move by ±9% between rounds).
The batched rows are checked equal, token for token, to the one-by-one runs.

    python benchmarks/attribution.py           # table
    python benchmarks/attribution.py --json    # {"speedup", ...}
    python benchmarks/attribution.py --config tiny --words 6 --new-tokens 8 --json   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from common import DEFAULT_MODEL, CompileClock, machine

PROMPT = (
    "Our old captain Ahab sailed the grey northern sea for forty years with a crew of twelve "
    "brave sailors, one small dog and a cat named Pip; write a short story about his last voyage "
    "home through the storm and wind"
)


def random_lm(config_name: str, tokenizer):
    """Random weights of a preset with `tokenizer`'s vocabulary, and the tokenizer."""
    import jax

    import cfjax
    from cfjax.core.model import init_params

    config = dataclasses.replace(cfjax.preset(config_name), vocab_size=tokenizer.vocab_size)
    lm = cfjax.LM(config, init_params(config, jax.random.key(0), scale=4.0), model_id=f"random-{config_name}")  # fmt: skip
    return lm.replace(tokenizer=tokenizer)


def measure(lm, words: int = 40, new_tokens: int = 32, sequential: int = 4, repeats: int = 3) -> dict:  # fmt: skip
    """The sweep over the first `words` words of `PROMPT` against `sequential` of its
    counterfactuals one by one (scaled to all), `repeats` interleaved rounds, both warm."""
    import cfjax
    from cfjax import EditPrompt, Sampler
    from cfjax.causal.attribution import attribute

    if not 2 <= words <= len(PROMPT.split()):
        raise ValueError(f"words: between 2 and {len(PROMPT.split())}")
    prompt = " ".join(PROMPT.split()[:words])
    clock = CompileClock()
    fact = cfjax.generate(lm, prompt, key=1, sampler=Sampler(1.0), max_new_tokens=new_tokens, stop_tokens=())  # fmt: skip

    def batched():
        return attribute(lm, fact, interventional=False)

    with clock.measure() as compile_s:
        effects = batched()
    n = len(effects)
    subset = effects[: min(sequential, n)]

    def one_by_one():
        return [cfjax.counterfactual(lm, fact, EditPrompt(prompt=e.trace.prompt)) for e in subset]

    with clock.measure() as single_compile_s:
        one_by_one()
    batch_runs, single_runs = [], []
    for _ in range(repeats):  # interleaved, so a load change hits both sides alike
        t = time.perf_counter()
        effects = batched()
        batch_runs.append(time.perf_counter() - t)
        t = time.perf_counter()
        singles = one_by_one()
        single_runs.append(time.perf_counter() - t)
    speedups = np.asarray(single_runs) * n / len(subset) / np.asarray(batch_runs)
    same = all(e.trace.tokens == s.tokens for e, s in zip(effects, singles, strict=False))
    return {
        "speedup": round(float(np.median(speedups)), 2),
        "speedup_rounds": [round(float(x), 2) for x in speedups],
        "units": n,
        "batched_s": round(float(np.median(batch_runs)), 3),
        "sequential_timed": len(subset),
        "sequential_subset_s": round(float(np.median(single_runs)), 3),
        "sequential_scaled_s": round(float(np.median(single_runs)) * n / len(subset), 3),
        "batched_matches_one_by_one": bool(same),
        "compile_s": round(compile_s[0], 2),
        "one_by_one_compile_s": round(single_compile_s[0], 2),
        "new_tokens": new_tokens,
        "prompt_words": words,
        "prompt_tokens": len(fact.prompt_tokens),
        "repeats": repeats,
        "model": lm.model_id,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)")  # fmt: skip
    ap.add_argument("--config", help="random weights of this preset, with the model's tokenizer")
    ap.add_argument("--words", type=int, default=40, help="words of the prompt (its first N)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sequential", type=int, default=4, help="one-by-one runs timed (scaled)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    args = ap.parse_args()

    import jax

    import cfjax

    if not 2 <= args.words <= len(PROMPT.split()):
        raise SystemExit(f"--words: between 2 and {len(PROMPT.split())}")
    started = time.perf_counter()
    lm = cfjax.load(args.model)
    if args.config is not None:  # random weights of the preset, the real tokenizer's vocabulary
        lm = random_lm(args.config, lm.tokenizer)
    result = {**measure(lm, args.words, args.new_tokens, args.sequential, args.repeats),
              "jax": jax.__version__, **machine()}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    r = result
    print(f"{r['model']} float32, a {args.words}-word prompt ({r['prompt_tokens']} tokens), "
          f"{args.new_tokens} sampled tokens; {r['cpu']}, {r['cores']} cores, {r['date']}")  # fmt: skip
    print(f"attribute, {r['units']} words removed, one batch: {r['batched_s']} s")
    print(f"one by one: {r['sequential_timed']} in {r['sequential_subset_s']} s -> {r['units']} in {r['sequential_scaled_s']} s")  # fmt: skip
    print(f"speedup {r['speedup']}x (median of {args.repeats} rounds: {r['speedup_rounds']}); "
          f"batched == one by one: {r['batched_matches_one_by_one']}; "
          f"compile {r['compile_s']} s + {r['one_by_one_compile_s']} s; "
          f"total {time.perf_counter() - started:.0f} s")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
