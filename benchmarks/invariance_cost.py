"""What batch invariance costs, and what `batch_invariant=False` buys back, on this machine.

`generate` on SmolLM2-135M-Instruct float32 (no stop token, temperature 1) at batch 1 and at
batch 64, the default batch-invariant engine against `lm.replace(batch_invariant=False)` (XLA's
own sums and matmuls), both warm. Rounds interleave the two modes, and each round's ratio is
paired (single runs on this VM move by ±9% between rounds); the medians are reported.

    python benchmarks/invariance_cost.py           # table
    python benchmarks/invariance_cost.py --json    # {"batch": {"variant_over_invariant", ...}}
    python benchmarks/invariance_cost.py --config tiny --batches 1 4 --new-tokens 8 --json  # smoke
    python benchmarks/invariance_cost.py --model-blocks 8   # against model_blocks=8 instead
    python benchmarks/invariance_cost.py --batches 1 --new-tokens 1 --prompt-tokens 1272  # prefill

`--model-blocks N` pits the default engine against `lm.replace(model_blocks=N)` (each matmul
in N fixed blocks, bit-exact on model-parallel meshes whose model axis divides N): the fields
are then `blocked_*`.
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np
from common import (  # fmt: skip
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    CompileClock,
    interleaved,
    load_lm,
    machine,
    paired_ratio,
    prompt_for,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)")  # fmt: skip
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--prompt-tokens", type=int, help="a prompt of this many tokens (the chat prompt's, repeated)")  # fmt: skip
    ap.add_argument("--model-blocks", type=int, help="compare with model_blocks=N, not batch_invariant=False")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    args = ap.parse_args()

    import jax

    import cfjax
    from cfjax import Sampler

    lm, _ = load_lm(args.model, args.config)
    if args.model_blocks:
        other, other_lm = "blocked", lm.replace(model_blocks=args.model_blocks)
    else:
        other, other_lm = "variant", lm.replace(batch_invariant=False)
    modes = {"invariant": lm, other: other_lm}
    prompt = prompt_for(lm, DEFAULT_PROMPT, 40)
    if args.prompt_tokens:  # a long prompt: where the prefill's cost shows
        prompt = (prompt * -(-args.prompt_tokens // len(prompt)))[: args.prompt_tokens]
    clock = CompileClock()
    result: dict = {}
    for batch in args.batches:

        def run(m, batch=batch):
            return cfjax.generate(m, [prompt] * batch, key=1, sampler=Sampler(1.0),
                                  max_new_tokens=args.new_tokens, stop_tokens=())  # fmt: skip

        compile_s = {}
        for name, m in modes.items():
            with clock.measure() as c:
                run(m)  # warm-up: compiles this mode's programs
            compile_s[name] = round(c[0], 2)
        calls = {name: functools.partial(run, m) for name, m in modes.items()}
        outs, times = interleaved(calls, args.rounds)
        same = sum(a.tokens == b.tokens for a, b in zip(outs["invariant"], outs[other], strict=True))  # fmt: skip
        result[str(batch)] = {
            f"{other}_over_invariant": round(paired_ratio(times["invariant"], times[other]), 3),
            "invariant_tok_s": round(
                batch * args.new_tokens / float(np.median(times["invariant"])), 1
            ),  # fmt: skip
            f"{other}_tok_s": round(batch * args.new_tokens / float(np.median(times[other])), 1),
            "invariant_s": round(float(np.median(times["invariant"])), 3),
            f"{other}_s": round(float(np.median(times[other])), 3),
            "compile_s": compile_s,
            "rows_with_equal_tokens": f"{same}/{batch}",
        }
        if not args.json:
            print(f"batch {batch}: {result[str(batch)]}", flush=True)
    out = {"batches": result, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt), "rounds": args.rounds,
           "model": lm.model_id, "jax": jax.__version__, **machine()}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
