"""Where a batch's compile time goes: the prefill and the decode chunk program of a run, each
traced and lowered (`lower_s`) and compiled by XLA (`compile_s`) apart, from abstract arguments
of the run's shapes (no weights are made). `gpu_check.py` runs it in child processes: once with
the persistent compilation cache off (`CFJAX_COMPILATION_CACHE=`), what XLA's compile costs, and
once with the cache its own run filled, where both programs should load from disk
(`cache_hits`: no new cache entry written) and compile in next to no time. First it compiles
the two side by side, as a run does (`runtime.ahead`): `together_compile_s`, the wall time.

    python benchmarks/compile_split.py --config llama3-8b --batch 1 --prompt-len 512 \
        --new-tokens 256 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import cfjax
from cfjax import Sampler
from cfjax.core import kernel, model, scm
from cfjax.runtime import ahead, driver


def timed(fn):
    """(result, seconds)."""
    t = time.perf_counter()
    return fn(), time.perf_counter() - t


def cache_entries() -> set[str]:
    """The persistent compilation cache's entries now (empty with the cache off)."""
    folder = jax.config.jax_compilation_cache_dir
    return {p.name for p in Path(folder).iterdir()} if folder and Path(folder).is_dir() else set()


def split(config, dtype, batch: int, prompt_len: int, steps: int) -> dict:
    """Lower and compile the run's prefill and decode chunk (as `driver.run` calls them on one
    device, without stop tokens); per program `*_lower_s`, `*_compile_s`, and with the cache on
    whether the compile wrote no cache entry (`cache_hits`, a program loaded from disk). First,
    the wall time of the two compiled side by side, as a run compiles them (`runtime.ahead`):
    `together_compile_s`."""
    bucket = kernel.bucket_length(prompt_len)
    length = kernel.cache_length(bucket, steps)
    window = kernel.prefill_window(prompt_len, bucket)
    params = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0), dtype=dtype))
    prompt = jax.ShapeDtypeStruct((batch, bucket), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    state, start = jax.eval_shape(
        lambda p, t, n: kernel.prefill(config, p, t, n, length, window), params, prompt, lengths
    )
    # As `driver.run` passes them: the rows' fixed values and the state committed to the device
    # (a committed argument lowers otherwise), the per-step inputs and the count not.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def commit(tree):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)  # fmt: skip

    forced = jax.ShapeDtypeStruct((batch, kernel.DEFAULT_CHUNK), jnp.int32)  # a chunk's width
    keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype)
    sampler = jax.eval_shape(lambda: scm.stack([Sampler(temperature=1.0)] * batch, config.vocab_size))  # fmt: skip
    rows = kernel.Rows(*commit((keys, start, sampler)), forced, forced)
    state, count = commit(state), jax.ShapeDtypeStruct((), jnp.int32)
    options = kernel.Options(early_exit=True)  # as `run`'s, without stop tokens
    programs = {
        "prefill": lambda: driver.prefill.lower(config, params, prompt, lengths, length, window),
        "chunk": lambda: driver.decode_chunk.lower(config, options, params, rows, state, count),
    }
    # First as a run compiles them (`runtime.ahead`): the chunk beside the prefill.
    lowered = {name: lower() for name, lower in programs.items()}
    t = time.perf_counter()
    chunk = ahead.compile_beside([("chunk", lowered["chunk"])])["chunk"]
    lowered["prefill"].compile()
    chunk.result()
    out, hits = {"together_compile_s": time.perf_counter() - t}, {}
    jax.clear_caches()  # then each apart, anew
    for name, lower in programs.items():
        lowered, out[f"{name}_lower_s"] = timed(lower)
        before = cache_entries()
        _, out[f"{name}_compile_s"] = timed(lowered.compile)
        hits[name] = bool(before) and cache_entries() <= before
    out = {"batch": batch, **{k: round(v, 2) for k, v in out.items()}}
    if jax.config.jax_compilation_cache_dir:
        out["cache_hits"] = hits
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-variant", action="store_true", help="the model with batch_invariant=False")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    config = cfjax.preset(args.config)
    if args.batch_variant:
        config = dataclasses.replace(config, batch_invariant=False)
    out = split(config, jnp.dtype(args.dtype), args.batch, args.prompt_len, args.new_tokens)  # fmt: skip
    print(json.dumps(out) if args.json else "  ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
