"""Decode speed on the CPU: cfjax `generate` against transformers `generate`, side by side.

Same weights (SmolLM2-135M-Instruct float32: cfjax's embedded default, and transformers reading
the very same GGUF file), same chat prompt, temperature-1 sampling with no stop token so every
row runs every step, batch 1 and 64 (`--batches`). Reports tokens/s of both (cfjax warm: its
compile time is measured separately from JAX's compile events), the ratio, the achieved memory bandwidth
(bytes read per step: params + KV cache at the average length, times steps/s) against a copy
bandwidth measured in the same run, and the peak RSS of each side (transformers runs in a child
process, so each side's peak is its own). At the `--plain-batches` sizes (default 1) it also times
`plain_scan.py`, a textbook JAX decode with the same keys, and checks that it sampled exactly
cfjax's tokens: what the counterfactual engine costs over plain generation in JAX;
`matmul_floor.py`, the same steps' weight matmuls alone: the most any XLA decode step could gain;
and the same matmuls in torch, in transformers' process: how fast the peer's own matrix-vector
products stream, hence the ratio cfjax would show if it ran exactly at XLA's floor. There
cfjax and the two JAX yardsticks take turns over `--repeats` rounds, and cfjax over each is the
median of the rounds' paired ratios (single runs on this VM move by up to 25%). At the
`--sample-batches` sizes (none by default; e.g. 64) it times `jax.jit(jax.vmap(cfjax.core.sample))`
over the same keys, beside `generate`, and checks that it sampled the same tokens; at the
`--int8-batches` sizes (none by default) the int8 variant. Both are off by default so that this
and `counterfactual.py` finish within 10 minutes here. At the
`--speculative-batches` sizes (default 1) it times speculative decoding (`draft=`, `--draft`:
the int8 variant by default, or `firstN`, the model's first N layers with its head) against
plain decoding of the same rows, as the median over `--speculative-pairs` interleaved pairs of
`--speculative-tokens` steps, with the draft's acceptance rate and the number of rows whose
tokens differ from plain decoding (flips: 0 when exact).

    python benchmarks/decode.py                      # table
    python benchmarks/decode.py --json               # [{"batch", "cfjax_tok_s", ...}, ...]
    python benchmarks/decode.py --config tiny --batches 1 --new-tokens 8 --json   # smoke test

`--config tiny` uses random weights of the tiny preset (a random transformers model saved to a
temporary folder and loaded by both sides), so it needs no model download.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    CompileClock,
    best_time,
    bytes_per_step,
    copy_bandwidth,
    interleaved,
    load_lm,
    machine,
    paired_ratio,
    peak_rss_mb,
    plain_runs,
    prompt_for,
    read_bandwidth,
    sample_decode,
    timed_runs,
)
from peer import run_transformers


def cfjax_warm(lm, prompt: list[int], batch: int, new_tokens: int, clock: CompileClock):
    """(a call of cfjax `generate` at one batch size, its compile figures), compiled."""
    import dataclasses

    from cfjax.causal.factual import generate
    from cfjax.core.scm import Sampler
    from cfjax.runtime import driver
    from cfjax.runtime.request import row_keys

    prompts = [prompt] * batch

    def run():
        return generate(
            lm,
            prompts,
            key=1,
            sampler=Sampler(temperature=1.0),
            max_new_tokens=new_tokens,
            stop_tokens=(),
        )

    # Warm-up with the timed run's exact shapes: one step of a request whose cache is sized for
    # all of them compiles the prefill and the chunk program every chunk runs (a recompile in
    # the timed run would show in its `recompile_s`) without running the other steps; where
    # the cache grows a chunk at a time (`driver.grows_by_default`), one step resumed at each chunk's
    # first step compiles that chunk's program.
    warm = driver.Request(prompts, row_keys(1, batch), [Sampler(temperature=1.0)] * batch, 1,
                          cache_steps=new_tokens)  # fmt: skip
    t = time.perf_counter()
    with clock.measure() as compile_s:
        done = driver.run(lm.config, lm.params, warm, stop_tokens=())
        later = range(driver.DEFAULT_CHUNK, new_tokens, driver.DEFAULT_CHUNK)
        for step in later if driver.grows_by_default(batch, None, None) else ():
            resume = driver.Resume(done.cache, done.start, done.bucket, step, [prompt[-1]] * batch)
            request = dataclasses.replace(warm, steps=step + 1)
            done = driver.run(lm.config, lm.params, request, stop_tokens=(), resume=resume)
    return run, {"compile_s": compile_s[0], "warmup_s": time.perf_counter() - t}


def cfjax_result(traces, seconds: float, batch: int, new_tokens: int, compiled: dict) -> dict:
    """The figures of cfjax's timed runs: `traces` of the last, the best `seconds`."""
    lengths = {len(tr.tokens) for tr in traces}
    if lengths != {new_tokens}:
        raise RuntimeError(f"cfjax rows produced {sorted(lengths)} tokens, not {new_tokens}")
    return {
        "tokens": np.array([list(tr.tokens) for tr in traces]),
        "seconds": seconds,
        "tok_s": batch * new_tokens / seconds,
        **compiled,
        "peak_rss_mb": peak_rss_mb(),
    }


def cfjax_decode(lm, prompt, batch: int, new_tokens: int, clock: CompileClock, repeats: int):
    """Warm cfjax `generate` tokens/s at one batch size (best of its timed runs), and the
    compile time it needed."""
    run, compiled = cfjax_warm(lm, prompt, batch, new_tokens, clock)
    with clock.measure() as recompile_s:
        traces, seconds = best_time(run, timed_runs(batch, repeats))
    return cfjax_result(traces, seconds, batch, new_tokens, {**compiled, "recompile_s": recompile_s[0]})  # fmt: skip


def with_yardsticks(lm, prompt, batch: int, new_tokens: int, clock: CompileClock, rounds: int):
    """(cfjax's figures as `cfjax_decode`'s, the yardsticks'): cfjax `generate`, the textbook
    decode and the matmul floor (`plain_runs`) taking turns over `rounds` rounds; tokens/s
    are each one's best run, and cfjax over each yardstick is the median of the rounds' paired
    ratios (single runs here move by up to 25%)."""
    run, compiled = cfjax_warm(lm, prompt, batch, new_tokens, clock)
    yard = plain_runs(lm, [prompt] * batch, new_tokens)
    runs = {"cfjax": run, "plain": yard["plain"][0], "floor": yard["floor"][0]}
    with clock.measure() as recompile_s:  # only cfjax's compiles count here (jit, not AOT)
        outs, times = interleaved(runs, rounds)
    compiled["recompile_s"] = recompile_s[0]
    cf = cfjax_result(outs["cfjax"], times["cfjax"].min(), batch, new_tokens, compiled)
    return cf, {
        "tokens": outs["plain"],
        "tok_s": batch * new_tokens / times["plain"].min(),
        "compile_s": yard["plain"][1],
        "floor_tok_s": batch * new_tokens / times["floor"].min(),
        "cfjax_over_plain": paired_ratio(times["plain"], times["cfjax"]),
        "cfjax_over_floor": paired_ratio(times["floor"], times["cfjax"]),
        "cfjax_over_floor_rounds": (times["floor"] / times["cfjax"]).round(3).tolist(),
    }


def first_layers(lm, n: int):
    """A draft of `lm`: its first `n` layers, final norm and head (no training needed)."""
    import dataclasses

    import cfjax

    config = dataclasses.replace(lm.config, n_layers=n, name=f"{lm.config.name}-first{n}")
    params = {**lm.params, "layers": {i: lm.params["layers"][i] for i in range(n)}}
    return cfjax.LM(config, params, lm.tokenizer, f"{lm.model_id}@first{n}")


def speculative_decode(lm, draft, prompt, batch, new_tokens, lookahead, pairs) -> dict:
    """Plain and speculative decoding of the same rows, interleaved: medians, acceptance, flips."""
    import dataclasses

    from cfjax.causal.factual import draft_for
    from cfjax.core.scm import Sampler
    from cfjax.runtime import driver
    from cfjax.runtime.request import row_keys

    request = driver.Request([prompt] * batch, row_keys(1, batch), [Sampler()] * batch, new_tokens)
    spec_draft = draft_for(lm, draft, lookahead)
    plain = lambda: driver.run(lm.config, lm.params, request, stop_tokens=())  # noqa: E731
    spec = lambda: driver.run(lm.config, lm.params, request, stop_tokens=(), draft=spec_draft)  # noqa: E731,E501
    # Compile both with one step of a request of the same shapes (its cache sized for them all).
    warm = dataclasses.replace(request, steps=1, cache_steps=new_tokens)
    driver.run(lm.config, lm.params, warm, stop_tokens=())
    driver.run(lm.config, lm.params, warm, stop_tokens=(), draft=spec_draft)
    plain_s, spec_s = [], []
    for _ in range(pairs):
        p, s = best_time(plain, 1), best_time(spec, 1)
        plain_s.append(p[1])
        spec_s.append(s[1])
    p, s = p[0], s[0]
    emitted = max(len(t) for t in s.tokens)
    return {
        "draft": draft.model_id,
        "lookahead": lookahead,
        "tok_s": batch * new_tokens / float(np.median(spec_s)),
        "plain_tok_s": batch * new_tokens / float(np.median(plain_s)),
        "over_plain": float(np.median(np.asarray(plain_s) / np.asarray(spec_s))),
        # Draft tokens kept per token proposed; a round emits the kept ones plus the target's.
        "acceptance_rate": (emitted - s.rounds) / (s.rounds * lookahead),
        "tokens_per_round": emitted / s.rounds,
        "flips": sum(a != b for a, b in zip(s.tokens, p.tokens, strict=True)),
        "pairs": pairs,
        "new_tokens": new_tokens,
    }


def _speculative_fields(r: dict | None) -> dict:
    keys = ("speculative_tok_s", "speculative_over_plain", "acceptance_rate",
            "tokens_per_round", "speculative_flips", "speculative_draft", "speculative_lookahead")  # fmt: skip
    if r is None:
        return dict.fromkeys(keys)
    values = (round(r["tok_s"], 2), round(r["over_plain"], 3), round(r["acceptance_rate"], 3),
              round(r["tokens_per_round"], 2), r["flips"], r["draft"], r["lookahead"])  # fmt: skip
    return dict(zip(keys, values, strict=True))


def main() -> None:
    """Run both sides for every batch size; print the table (or the JSON rows)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)"
    )
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--prompt-len", type=int, default=40, help="random prompt length (--config)")
    ap.add_argument("--no-transformers", action="store_true", help="time cfjax only")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs at batch 1, best kept; at --plain-batches sizes, rounds in which cfjax "
        "and the yardsticks take turns (%(default)s)",
    )
    ap.add_argument(
        "--plain-batches",
        type=int,
        nargs="*",
        default=[1],
        help="batch sizes at which to also time plain_scan.py (default: %(default)s)",
    )
    ap.add_argument(
        "--sample-batches",
        type=int,
        nargs="*",
        default=[],
        help="batch sizes at which to also time jit(vmap(cfjax.core.sample)) (%(default)s)",
    )
    ap.add_argument(
        "--int8-batches",
        type=int,
        nargs="*",
        default=[],
        help="batch sizes at which to also time the int8 variant (cfjax.quantize) (%(default)s)",
    )
    ap.add_argument(
        "--speculative-batches",
        type=int,
        nargs="*",
        default=[1],
        help="batch sizes at which to also time speculative decoding (%(default)s)",
    )
    ap.add_argument("--draft", default="int8", help="the draft: int8 or firstN (%(default)s)")
    ap.add_argument("--lookahead", type=int, default=4, help="draft tokens per round")
    ap.add_argument("--speculative-tokens", type=int, default=128)
    ap.add_argument("--speculative-pairs", type=int, default=3)
    ap.add_argument("--copy-mib", type=int, default=512, help="copy-bandwidth array size")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = ap.parse_args()

    import jax

    import cfjax

    started = time.perf_counter()
    clock = CompileClock()
    transformers = not args.no_transformers
    # Where the yardsticks run: the textbook decode, XLA's matmul floor and torch's.
    yardstick_batches = sorted(set(args.plain_batches) & set(args.batches))
    # The transformers side runs first, in a child process; for random weights it also makes
    # them (saved as a transformers model that cfjax then loads), so this process needs no torch.
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            vocab = cfjax.preset(args.config).vocab_size
            prompt = np.random.default_rng(0).integers(0, vocab, args.prompt_len).tolist()
            hf_dir = Path(tmp) / f"{args.config}-hf"
            source = {"path": str(hf_dir), "build_config": args.config} if transformers else None
        else:
            lm, source = load_lm(args.model)
            prompt = prompt_for(lm, args.prompt, args.prompt_len)
            source = source if transformers else None
        tf = {}
        if source is not None:
            for r in run_transformers(
                source, prompt, args.batches, args.new_tokens, args.repeats, yardstick_batches
            ):
                tf[r["batch"]] = r
                if not args.json:
                    print(
                        f"  transformers batch {r['batch']}: {r['tok_s']:.1f} tok/s",
                        file=sys.stderr,
                    )
        if args.config:
            if source is not None:
                lm = cfjax.load(hf_dir).replace(model_id=f"random-{args.config}")
            else:
                lm = load_lm(args.model, args.config)[0]
        cf, plain = {}, {}
        for batch in args.batches:
            if batch in yardstick_batches:
                cf[batch], plain[batch] = with_yardsticks(
                    lm, prompt, batch, args.new_tokens, clock, timed_runs(batch, args.repeats)
                )
            else:
                cf[batch] = cfjax_decode(lm, prompt, batch, args.new_tokens, clock, args.repeats)
            if not args.json:
                print(f"  cfjax batch {batch}: {cf[batch]['tok_s']:.1f} tok/s", file=sys.stderr)
                if batch in plain:
                    pl = plain[batch]
                    print(f"  plain scan batch {batch}: {pl['tok_s']:.1f} tok/s, matmul floor "
                          f"{pl['floor_tok_s']:.1f} tok/s", file=sys.stderr)  # fmt: skip
        int8 = {}
        int8_batches = sorted(set(args.int8_batches) & set(args.batches))
        if int8_batches:
            lm8 = cfjax.quantize(lm, "int8")
            for batch in int8_batches:
                int8[batch] = cfjax_decode(lm8, prompt, batch, args.new_tokens, clock, args.repeats)  # fmt: skip
                if not args.json:
                    print(f"  cfjax int8 batch {batch}: {int8[batch]['tok_s']:.1f} tok/s", file=sys.stderr)  # fmt: skip
        core_sample = {}
        for batch in sorted(set(args.sample_batches) & set(args.batches)):
            core_sample[batch] = sample_decode(lm, prompt, batch, args.new_tokens, args.repeats)
            if not args.json:
                print(
                    f"  jit(vmap(core.sample)) batch {batch}: "
                    f"{core_sample[batch]['tok_s']:.1f} tok/s",
                    file=sys.stderr,
                )
        speculative = {}
        spec_batches = sorted(set(args.speculative_batches) & set(args.batches))
        if spec_batches:
            if args.draft == "int8":
                draft = cfjax.quantize(lm, "int8")
            elif args.draft.startswith("first") and args.draft[5:].isdigit():
                draft = first_layers(lm, int(args.draft[5:]))
            else:
                raise SystemExit(f"--draft: int8 or firstN, not {args.draft!r}")
            for batch in spec_batches:
                speculative[batch] = speculative_decode(
                    lm, draft, prompt, batch, args.speculative_tokens, args.lookahead,
                    args.speculative_pairs,
                )  # fmt: skip
                if not args.json:
                    r = speculative[batch]
                    print(f"  speculative batch {batch}: {r['tok_s']:.1f} tok/s, "
                          f"x{r['over_plain']:.3f} plain, acceptance {r['acceptance_rate']:.2f}, "
                          f"flips {r['flips']}", file=sys.stderr)  # fmt: skip
    bw = copy_bandwidth(args.copy_mib << 20)
    read = read_bandwidth(args.copy_mib << 20)
    where = machine()
    rows = []
    for batch in args.batches:
        c, t, pl, cs = cf[batch], tf.get(batch), plain.get(batch), core_sample.get(batch)
        per_step = bytes_per_step(lm, batch, len(prompt), args.new_tokens)
        achieved = per_step * args.new_tokens / c["seconds"]
        row = {
            "batch": batch,
            "cfjax_tok_s": round(c["tok_s"], 2),
            "transformers_tok_s": round(t["tok_s"], 2) if t else None,
            "ratio": round(c["tok_s"] / t["tok_s"], 3) if t else None,
            "bandwidth_fraction": round(achieved / bw["best"], 3),
            # What the counterfactual engine costs over plain generation, on the same tokens.
            "plain_scan_tok_s": round(pl["tok_s"], 2) if pl else None,
            "cfjax_over_plain_scan": round(pl["cfjax_over_plain"], 3) if pl else None,
            "plain_scan_same_tokens": bool(np.array_equal(pl["tokens"], c["tokens"]))
            if pl
            else None,
            "plain_scan_compile_s": round(pl["compile_s"], 2) if pl else None,
            # The floor: the same steps' weight matmuls alone (benchmarks/matmul_floor.py).
            "matmul_floor_tok_s": round(pl["floor_tok_s"], 2) if pl else None,
            # Both ratios: medians of rounds in which cfjax and the yardsticks took turns.
            "cfjax_over_matmul_floor": round(pl["cfjax_over_floor"], 3) if pl else None,
            "cfjax_over_matmul_floor_rounds": pl["cfjax_over_floor_rounds"] if pl else None,
            # The peer's own floor (the same matmuls in torch): how fast its matrix-vector
            # products stream, and the ratio cfjax would show if it ran exactly at XLA's floor.
            "torch_matmul_floor_tok_s": round(t["floor_tok_s"], 2) if t and pl else None,
            "transformers_over_torch_floor": (
                round(t["tok_s"] / t["floor_tok_s"], 3) if t and pl else None
            ),
            "matmul_floor_over_transformers": (
                round(pl["floor_tok_s"] / t["tok_s"], 3) if t and pl else None
            ),
            # The functional core under jit(vmap(...)) beside generate, on the same tokens.
            "core_sample_tok_s": round(cs["tok_s"], 2) if cs else None,
            "core_sample_over_generate": round(cs["tok_s"] / c["tok_s"], 3) if cs else None,
            "core_sample_same_tokens": (
                bool(np.array_equal(cs["tokens"], c["tokens"])) if cs else None
            ),
            "core_sample_compile_s": round(cs["compile_s"], 2) if cs else None,
            # The weight-only int8 variant through the same decode path (its own tokens).
            "int8_tok_s": round(int8[batch]["tok_s"], 2) if batch in int8 else None,
            "int8_over_float32": round(int8[batch]["tok_s"] / c["tok_s"], 3)
            if batch in int8
            else None,  # fmt: skip
            # Speculative decoding (`draft=`) against plain decoding of the same rows.
            **_speculative_fields(speculative.get(batch)),
            "achieved_gb_s": round(achieved / 1e9, 2),
            "copy_gb_s": round(bw["best"] / 1e9, 2),
            # Against a one-thread copy (what one core streams): the weaker yardstick.
            "copy_1thread_gb_s": round(bw["1_thread"] / 1e9, 2),
            "bandwidth_fraction_1thread": round(achieved / bw["1_thread"], 3),
            "roofline_tok_s": round(batch * bw["best"] / per_step, 2),
            # Against a read-only stream (what a decode step does): the realistic roofline.
            "read_gb_s": round(read / 1e9, 2),
            "read_bandwidth_fraction": round(achieved / read, 3),
            "read_roofline_tok_s": round(batch * read / per_step, 2),
            "bytes_per_step_mb": round(per_step / 1e6, 1),
            "transformers_bandwidth_fraction": (
                round(per_step * args.new_tokens / t["seconds"] / bw["best"], 3) if t else None
            ),
            "compile_s": round(c["compile_s"], 2),
            "recompile_s": round(c["recompile_s"], 2),
            "cfjax_seconds": round(c["seconds"], 2),
            "transformers_seconds": round(t["seconds"], 2) if t else None,
            "cfjax_peak_rss_mb": round(c["peak_rss_mb"]),
            "transformers_peak_rss_mb": round(t["peak_rss_mb"]) if t else None,
            "new_tokens": args.new_tokens,
            "timed_runs": timed_runs(batch, args.repeats),
            "prompt_len": len(prompt),
            "model": lm.model_id,
            "jax": jax.__version__,
            "torch": t["torch"] if t else None,
            "threads": t["threads"] if t else os.cpu_count(),
            **where,
        }
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"{lm.model_id} float32, prompt {len(prompt)} tokens, {args.new_tokens} sampled tokens "
        f"(temperature 1, no stop), jax {jax.__version__} vs torch "
        f"{rows[0]['torch']} ({rows[0]['threads']} threads)"
    )
    print(
        f"{where['cpu']}, {where['cores']} cores, load {where['load_avg_1m']}, {where['date']}; "
        f"copy bandwidth {bw['best'] / 1e9:.1f} GB/s (read + write, best of 1 / all threads; "
        f"one thread {bw['1_thread'] / 1e9:.1f} GB/s); read bandwidth {read / 1e9:.1f} GB/s"
    )
    head = (
        "batch",
        "cfjax tok/s",
        "transformers tok/s",
        "ratio",
        "plain scan tok/s",
        "cfjax / plain",
        "matmul floor tok/s",
        "cfjax / floor",
        "core.sample tok/s",
        "int8 tok/s",
        "GB/s",
        "bw fraction",
        "roofline tok/s",
        "read bw fraction",
        "read roofline tok/s",
        "compile s",
        "cfjax RSS MB",
        "transformers RSS MB",
    )
    keys = (
        "batch",
        "cfjax_tok_s",
        "transformers_tok_s",
        "ratio",
        "plain_scan_tok_s",
        "cfjax_over_plain_scan",
        "matmul_floor_tok_s",
        "cfjax_over_matmul_floor",
        "core_sample_tok_s",
        "int8_tok_s",
        "achieved_gb_s",
        "bandwidth_fraction",
        "roofline_tok_s",
        "read_bandwidth_fraction",
        "read_roofline_tok_s",
        "compile_s",
        "cfjax_peak_rss_mb",
        "transformers_peak_rss_mb",
    )
    print(" | ".join(head))
    for r in rows:
        print(" | ".join("-" if r[k] is None else str(r[k]) for k in keys))
    print(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
