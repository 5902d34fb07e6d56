"""What padded batch sizes save: a sweep of many batch sizes, padded against unpadded.

An attribution per prompt, a sweep over sample counts or the explorer runs batches of many
sizes, and each size is its own compiled prefill and decode chunk. `generate` of N chat
prompts (16 new tokens, temperature 1) for each N of the sweep, on SmolLM2-135M-Instruct,
with the default `pad_batch=True` (N runs as `driver.padded_rows(N)` rows) against
`lm.replace(pad_batch=False)`. Each mode runs in a fresh child process with the persistent
compilation cache off, so every program it needs is compiled once: the cold pass of the sweep
is compile + run, a second (warm) pass the run alone, where the padded rows cost; every run's
tokens are compared. Rounds alternate the modes (A, B, A, B); the medians of the paired ratios
are reported.

    python benchmarks/batch_sizes.py           # table
    python benchmarks/batch_sizes.py --json    # {"padded": {...}, "unpadded": {...}, ratios}
    python benchmarks/batch_sizes.py --config tiny --sizes 9 11 --new-tokens 4 --rounds 1 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import DEFAULT_MODEL, CompileClock, load_lm, machine

# The batch sizes of an attribution study over 24 prompts of 9 to 45 words (a row per word):
# `random.Random(0).randint(9, 45)`, 24 times: 18 distinct sizes, 12 once padded.
SIZES = [33, 35, 11, 25, 41, 40, 34, 28, 39, 31, 22, 41, 17, 27, 17, 15, 25, 43, 18, 28, 15, 13, 30, 39]  # fmt: skip
PROMPTS = ["Write one sentence about rain.", "Name a fruit.", "Describe a cat in five words.",
           "What is the capital of France?", "Tell me a joke about the sea."]  # fmt: skip


def child(args) -> dict:
    """One mode's sweep in this process: cold (compile + run) and warm passes."""
    import jax

    import cfjax

    lm, _ = load_lm(args.model, args.config)
    lm = lm if args.child == "padded" else lm.replace(pad_batch=False)
    chat = lm.tokenizer is not None
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: (
            compiled.append(e) if e == "/jax/core/compile/backend_compile_duration" else None
        )  # fmt: skip
    )
    clock = CompileClock()

    tokens = []

    def sweep() -> float:
        t = time.perf_counter()
        tokens.clear()
        for n in args.sizes:
            prompts = [PROMPTS[i % len(PROMPTS)] if chat else [1 + i % 200, 7, 9] for i in range(n)]
            out = cfjax.generate(lm, prompts, key=n, chat=chat, sampler=cfjax.Sampler(1.0),
                                 max_new_tokens=args.new_tokens, stop_tokens=())  # fmt: skip
            tokens.append([r.tokens for r in out])
        return time.perf_counter() - t

    with clock.measure() as compile_s:
        cold = sweep()
    programs = len(compiled)
    warm = sweep()
    digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()
    return {
        "cold_s": cold,
        "warm_s": warm,
        "compile_s": compile_s[0],
        "programs": programs,
        "tokens": digest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)")  # fmt: skip
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="batch sizes of the sweep")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="child-process pairs (medians reported)")
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    ap.add_argument("--child", choices=["padded", "unpadded"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from cfjax.runtime.driver import padded_rows

    forward = [a for a in sys.argv[1:] if a != "--json"]
    runs = {"padded": [], "unpadded": []}
    for _ in range(args.rounds):
        for mode in runs:
            cmd = [sys.executable, str(Path(__file__)), *forward, "--child", mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    ratio = lambda field: float(np.median([p[field] / u[field] for p, u in zip(runs["padded"], runs["unpadded"], strict=True)]))  # noqa: E731  # fmt: skip
    result = {
        "machine": machine(),
        "model": args.config or args.model,
        "sizes": args.sizes,
        "padded_sizes": [padded_rows(n) for n in args.sizes],
        "new_tokens": args.new_tokens,
        **{
            mode: {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k != "tokens"}
            for mode, rs in runs.items()
        },  # fmt: skip
        "same_tokens": len({r["tokens"] for rs in runs.values() for r in rs}) == 1,
        "padded_over_unpadded_cold": ratio("cold_s"),
        "padded_over_unpadded_warm": ratio("warm_s"),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']}: {len(args.sizes)} batch sizes {args.sizes} -> {result['padded_sizes']}, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds (medians)")  # fmt: skip
    print(f"{'mode':10} {'programs':>9} {'compile s':>10} {'cold s':>8} {'warm s':>8}")
    for mode in runs:
        r = result[mode]
        print(f"{mode:10} {r['programs']:9.0f} {r['compile_s']:10.1f} {r['cold_s']:8.1f} {r['warm_s']:8.1f}")  # fmt: skip
    print(f"the same tokens in every run: {result['same_tokens']}")
    print(f"padded / unpadded: cold {result['padded_over_unpadded_cold']:.2f}, warm {result['padded_over_unpadded_warm']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
