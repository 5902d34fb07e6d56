"""Where a decode step's time goes: a `jax.profiler` trace of warm decode chunks, summed by op.

Runs one warm-up, then traces `--steps` decode steps (whole chunks) and adds up the duration of
every XLA op the device ran, grouped by op kind (dot, ynn_fusion, loop fusions ...) and output
shape, read from the compiled chunk's own HLO. This is the profile behind benchmarks/RESULTS.md.

    python benchmarks/profile_decode.py                        # SmolLM2 f32, batch 1
    python benchmarks/profile_decode.py --batch 64 --steps 64
    python benchmarks/profile_decode.py --config tiny --steps 8 --json   # random weights
    python benchmarks/profile_decode.py --batch 64 --variant   # batch_invariant=False

On the CPU, XLA's thunks run one after another, so the sum is close to the wall time; the
per-op overhead of the profiler is small next to ops of tens of microseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import DEFAULT_MODEL, load_lm, machine  # benchmarks/, beside this file

from cfjax.core import kernel, scm
from cfjax.runtime import driver


def op_shapes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its result shape, from compiled HLO text."""
    return dict(re.findall(r"%([\w.-]+) = ([\w\[\],{}:()]+) ", hlo_text))


def group(name: str, shapes: dict[str, str]) -> str:
    """`dot.1990` -> `dot f32[1,49152]`: the op kind (number dropped) and its result shape."""
    kind = re.sub(r"\.\d+$", "", name)
    shape = shapes.get(name)
    return f"{kind} {re.sub(r'{[^}]*}', '', shape)}" if shape else kind


def trace_ops(fn) -> dict[str, tuple[float, int]]:
    """Run `fn` under `jax.profiler`; {HLO op: (total seconds, count)} over all threads.

    Events are keyed by the `hlo_op` the runtime attaches to each op it runs (a CPU thunk, a
    GPU kernel), so host-side spans are left out. Where device planes exist (a GPU), only
    their events count: the host's launch spans of the same ops would count them twice.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            fn()
        (path,) = Path(tmp).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    planes = list(data.planes)
    devices = [p for p in planes if p.name.startswith("/device:")]
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for plane in devices or planes:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is not None:
                    totals[op][0] += event.duration_ns / 1e9
                    totals[op][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def profile(lm, batch: int, steps: int, chunk: int = kernel.DEFAULT_CHUNK, prompt_len: int = 42):
    """Trace `steps` warm decode steps of `lm` at `batch`; the per-op table as a dict."""
    c = lm.config
    prompt = [1 + (7 * i) % (c.vocab_size - 1) for i in range(prompt_len)]
    bucket = kernel.bucket_length(prompt_len)
    padded = np.zeros((batch, bucket), np.int32)
    padded[:, :prompt_len] = prompt
    lengths = np.full((batch,), prompt_len, np.int32)
    keys = jax.random.split(jax.random.key(0), batch)
    sampler = scm.Sampler(temperature=1.0)
    request = driver.Request([prompt] * batch, keys, [sampler] * batch, steps)
    length = kernel.cache_length(bucket, steps, chunk)

    def prefilled():
        """The decode's starting point: a cache holding the prompts (the prefill not timed)."""
        state, start = driver.prefill(c, lm.params, padded, lengths, length)
        jax.block_until_ready(state)
        return state, driver.Resume(
            state.cache, np.asarray(start), bucket, 0, [prompt[-1]] * batch, chunk
        )

    def run(resume) -> float:
        t = time.perf_counter()
        driver.run(c, lm.params, request, stop_tokens=(), chunk=chunk, resume=resume)
        return time.perf_counter() - t

    run(prefilled()[1])  # compile
    resume, wall = prefilled()[1], []
    events = trace_ops(lambda: wall.append(run(resume)))
    state, resume = prefilled()
    width = min(chunk, steps)
    rows = kernel.Rows(keys, jnp.asarray(resume.start), scm.stack(request.samplers, c.vocab_size),
                       jnp.full((batch, width), kernel.NOT_FORCED, jnp.int32),
                       jnp.zeros((batch, width), jnp.int32))  # fmt: skip
    hlo = driver.decode_chunk.lower(
        c, kernel.Options(early_exit=True), lm.params, jax.tree_util.tree_map(jnp.asarray, rows),
        state, jnp.int32(width),
    ).compile().as_text()  # fmt: skip
    shapes = op_shapes(hlo)
    rows: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, (seconds, count) in events.items():
        # Instructions of the compiled chunk only (not the prefill's), and not the loop itself:
        # its span holds the ops inside it, which are counted one by one.
        if name in shapes and not name.startswith(("while", "conditional", "call")):
            key = group(name, shapes)
            rows[key][0] += seconds
            rows[key][1] += count
    total = sum(s for s, _ in rows.values())
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    ms = 1e3 / steps
    table = [
        {"op": k, "ms_per_step": round(s * ms, 4), "share": round(s / total, 4),
         "calls_per_step": round(n / steps, 2)}
        for k, (s, n) in ranked
    ]  # fmt: skip
    return {
        "model": lm.model_id,
        "batch": batch,
        "steps": steps,
        "wall_ms_per_step": round(wall[0] * ms, 3),
        "ops_ms_per_step": round(total * ms, 3),
        "ops": table,
        "jax": jax.__version__,
    }


def print_table(result: dict, top: int) -> None:
    """The per-op table, `top` rows."""
    print("ms/step | share | calls/step | op (result shape)")
    for r in result["ops"][:top]:
        print(
            f"{r['ms_per_step']:8.3f} | {r['share']:5.1%} | {r['calls_per_step']:7.1f} | {r['op']}"
        )


def main() -> None:
    """Trace warm decode steps and print the per-op table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--dtype", default=None, help="with --config: the random weights' dtype (default float32)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=128, help="decode steps traced")
    ap.add_argument("--chunk", type=int, default=kernel.DEFAULT_CHUNK)
    ap.add_argument("--prompt-len", type=int, default=42)
    ap.add_argument("--top", type=int, default=20, help="rows printed")
    ap.add_argument("--variant", action="store_true", help="profile batch_invariant=False")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    lm = load_lm(args.model, args.config)[0]
    if args.config is not None and args.dtype is not None:  # drawn in that dtype, as gpu_check's
        from cfjax.core import model

        lm = lm.replace(params=model.init_params(lm.config, jax.random.key(0), dtype=jnp.dtype(args.dtype)))  # fmt: skip
    if args.variant:
        lm = lm.replace(batch_invariant=False)
    result = {**profile(lm, args.batch, args.steps, args.chunk, args.prompt_len), **machine()}
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{lm.model_id}, batch {args.batch}, {args.steps} steps: wall "
        f"{result['wall_ms_per_step']} ms/step, ops {result['ops_ms_per_step']} ms/step "
        f"({result['cpu']}, load {result['load_avg_1m']}, jax {jax.__version__})"
    )
    print_table(result, args.top)


if __name__ == "__main__":
    main()
