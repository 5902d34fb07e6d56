"""Decode speed on the CPU: cfjax `generate` against transformers `generate`, side by side.

Same weights (SmolLM2-135M-Instruct float32: cfjax's embedded default, and transformers reading
the very same GGUF file), same chat prompt, temperature-1 sampling with no stop token so every
row runs every step, batch 1 / 16 / 64. Reports tokens/s of both (cfjax warm: its compile time is
measured separately from JAX's compile events), the ratio, the achieved memory bandwidth
(bytes read per step: params + KV cache at the average length, times steps/s) against a copy
bandwidth measured in the same run, and the peak RSS of each side (transformers runs in a child
process, so each side's peak is its own). At the `--plain-batches` sizes (default 1) it also times
`plain_scan.py`, a textbook JAX decode with the same keys, and checks that it sampled exactly
cfjax's tokens: what the counterfactual engine costs over plain generation in JAX;
`matmul_floor.py`, the same steps' weight matmuls alone: the most any XLA decode step could gain;
and the same matmuls in torch, in transformers' process: how fast the peer's own matrix-vector
products stream, hence the ratio cfjax would show if it ran exactly at XLA's floor.

    python benchmarks/decode.py                      # table
    python benchmarks/decode.py --json               # [{"batch", "cfjax_tok_s", ...}, ...]
    python benchmarks/decode.py --config tiny --batches 1 --new-tokens 8 --json   # smoke test

`--config tiny` uses random weights of the tiny preset (a random transformers model saved to a
temporary folder and loaded by both sides), so it needs no model download.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPT = "Write a short story about a cat who learns to fly."
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


# --------------------------------------------------------------------------------------------
# Shared helpers (counterfactual.py imports these)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux's VmHWM (the high-water mark of this process image's memory). getrusage's ru_maxrss
    is the fallback: on Linux it carries the parent's RSS at fork across exec into a child.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU model name (lscpu's), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    """Where and when: CPU model, core count, load average, date."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class CompileClock:
    """Sums JAX's compile-event durations (tracing, lowering, XLA compile) while active."""

    def __init__(self):
        self.seconds = 0.0
        self._on = False
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_kwargs) -> None:
        if self._on and event in COMPILE_EVENTS:
            self.seconds += duration

    @contextlib.contextmanager
    def measure(self):
        """Yields a one-entry list that holds the compile seconds spent inside the block."""
        before, self._on = self.seconds, True
        out = [0.0]
        try:
            yield out
        finally:
            self._on = False
            out[0] = self.seconds - before


def tiny_hf_model(directory: Path, config: str = "tiny", seed: int = 0) -> Path:
    """A random transformers Llama of a cfjax preset (untied embeddings), saved to `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import cfjax

    logging.disable_progress_bar()
    c = cfjax.preset(config)
    hf = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(hf).float().save_pretrained(directory)
    return directory


def load_lm(model: str, config: str | None = None):
    """(cfjax LM, transformers source) for a model name or path, or random params of `config`.

    The transformers source `{"path": ..., "gguf_file": ...}` points at the very weights cfjax
    loaded (for the embedded default: the GGUF file it converted); random params have none.
    """
    import jax

    import cfjax
    from cfjax import model as cfmodel

    if config is not None:
        c = cfjax.preset(config)
        params = cfmodel.init_params(c, jax.random.key(0))
        return cfjax.LM(c, params, model_id=f"random-{config}"), None
    from cfjax.weights import KNOWN_MODELS

    lm = cfjax.load(model)
    known = KNOWN_MODELS.get(model)
    if known is not None and known.package is not None:
        gguf = known.locate(model)
        return lm, {"path": str(gguf.parent), "gguf_file": gguf.name}
    path = Path(model)
    if path.suffix == ".gguf":
        return lm, {"path": str(path.parent), "gguf_file": path.name}
    return lm, {"path": str(path)}


def prompt_for(lm, prompt: str, prompt_len: int, seed: int = 0) -> list[int]:
    """The chat prompt's token ids, or `prompt_len` random ids for a model without tokenizer."""
    if lm.tokenizer is not None:
        return list(lm.tokenizer.chat([{"role": "user", "content": prompt}]))
    rng = np.random.default_rng(seed)
    return rng.integers(0, lm.config.vocab_size, prompt_len).tolist()


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Measured memory copy bandwidth, read + write bytes/s: the best of one and all threads.

    numpy `copyto` between two preallocated (already faulted-in) arrays of `nbytes`; the
    threaded variant copies one slice per core at once (numpy releases the GIL).
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    threads = os.cpu_count() or 1
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def one() -> None:
        np.copyto(dst, src)

    def many(pool) -> None:
        list(pool.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))

    out = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for name, fn in (("1_thread", one), (f"{threads}_threads", lambda: many(pool))):
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            out[name] = 2 * nbytes / best
    out["best"] = max(out.values())
    return out


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured streaming-read bandwidth, bytes/s: the access pattern of a batch-1 decode step.

    A matrix-vector product over a preallocated float32 matrix of `nbytes` (BLAS gemv reads
    each weight once and writes almost nothing), as one call and as one slice per core on
    threads; the best of both. Decoding reads weights and writes little, so this is its
    roofline; a copy's read + write figure is higher than any read-only stream reaches.
    """
    matrix = np.ones((nbytes // 4 // 1024, 1024), np.float32)
    vector = np.ones(1024, np.float32)
    threads = os.cpu_count() or 1
    slices = np.array_split(matrix, threads)
    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for fn in (lambda: matrix @ vector, lambda: list(pool.map(lambda m: m @ vector, slices))):
            fn()
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
    return matrix.nbytes / best


def best_time(fn, repeats: int):
    """(result of the last call, best wall time in seconds) over `repeats` calls of `fn()`."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def timed_runs(batch: int, repeats: int) -> int:
    """Runs to time at one batch size: `repeats` at batch 1, whose runs are short and whose
    single timings moved by up to 25% on this VM; one for the longer batched runs."""
    return repeats if batch == 1 else 1


# --------------------------------------------------------------------------------------------
# The transformers side (a child process: its own peak RSS, no JAX thread pool beside it)


def transformers_worker(spec: dict) -> list[dict]:
    """Time transformers `generate(do_sample=True)` for each batch; runs in the child."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    threads = spec["threads"]
    torch.set_num_threads(threads)
    src = spec["source"]
    if "build_config" in src:  # random weights: made here, loaded by cfjax afterwards
        tiny_hf_model(Path(src["path"]), src["build_config"])
    kwargs = {"gguf_file": src["gguf_file"]} if "gguf_file" in src else {}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src["path"], dtype=torch.float32, **kwargs)
    model.eval()
    load_s = time.perf_counter() - t
    n = spec["new_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def config(steps: int) -> GenerationConfig:
        # Plain temperature-1 sampling (no top-k/top-p), and exactly `steps` new tokens.
        return GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=pad,
        )

    rows = []
    torch.manual_seed(0)
    for batch in spec["batches"]:
        ids = torch.tensor([spec["prompt"]] * batch, dtype=torch.long)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, generation_config=config(4))  # warm-up
            out, seconds = best_time(
                functools.partial(
                    model.generate, ids, attention_mask=mask, generation_config=config(n)
                ),
                timed_runs(batch, spec["repeats"]),
            )
        if out.shape != (batch, len(spec["prompt"]) + n):
            raise RuntimeError(f"transformers produced {tuple(out.shape)} tokens, not {n} new")
        row = {"batch": batch, "seconds": seconds, "tok_s": batch * n / seconds}
        if batch in spec["floor_batches"]:
            _, floor_s = best_time(
                functools.partial(torch_matmul_floor, model, batch, n),
                timed_runs(batch, spec["repeats"]),
            )
            row["floor_tok_s"] = batch * n / floor_s
        rows.append({**row, "peak_rss_mb": peak_rss_mb()})
    return [{**r, "load_s": load_s, "threads": threads, "torch": torch.__version__} for r in rows]


def torch_matmul_floor(model, batch: int, steps: int):
    """`matmul_floor.py` in torch: `steps` steps of the model's own weight matmuls alone (q, k,
    v, o, gate, up, down per layer, then the LM head), each input depending on the one before.
    What the peer's matrix-vector products can stream: transformers' ceiling on this machine."""
    import torch
    import torch.nn.functional as F

    def squash(x):  # as in matmul_floor.py: bounded activations, one elementwise pass
        return x / (1.0 + x.abs().amax(-1, keepdim=True))

    layers = model.model.layers
    h = torch.full((batch, model.config.hidden_size), 0.01, dtype=model.dtype)
    with torch.inference_mode():
        for _ in range(steps):
            for layer in layers:
                a, m = layer.self_attn, layer.mlp
                x = squash(h)
                a.k_proj(x), a.v_proj(x)  # read and computed, as a step does (for the cache)
                h = h + a.o_proj(a.q_proj(x))
                x = squash(h)
                h = h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
            logits = model.lm_head(squash(h))
            h = squash(h + logits.amax(-1, keepdim=True))
    return h


def run_transformers(
    source: dict,
    prompt: list[int],
    batches: list[int],
    new_tokens: int,
    repeats: int,
    floor_batches: list[int],
) -> list:
    """Run `transformers_worker` in a child process and return its rows (with the torch
    matmul floor's `floor_tok_s` at `floor_batches`)."""
    spec = {
        "source": source,
        "prompt": prompt,
        "batches": batches,
        "floor_batches": floor_batches,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": os.cpu_count() or 1,
    }
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--transformers-worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        env=env,
        check=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The cfjax side


class _StopWarmup(Exception):
    pass


def _stop_after(chunks: int):
    """A `stream` callback that ends the run after `chunks` decode chunks."""
    seen = [0]

    def callback(_text: str) -> None:
        seen[0] += 1
        if seen[0] >= chunks:
            raise _StopWarmup

    return callback


def cfjax_decode(
    lm, prompt: list[int], batch: int, new_tokens: int, clock: CompileClock, repeats: int
) -> dict:
    """Warm cfjax `generate` tokens/s at one batch size, and the compile time it needed."""
    from cfjax.causal.factual import generate
    from cfjax.core.scm import Sampler

    prompts = [prompt] * batch

    def run(**kw):
        return generate(
            lm,
            prompts,
            key=1,
            sampler=Sampler(temperature=1.0),
            max_new_tokens=new_tokens,
            stop_tokens=(),
            **kw,
        )

    # Warm-up with the timed run's exact shapes. Streaming calls back after each decode chunk;
    # stopping after the first has compiled the prefill and the chunk program every chunk runs
    # (a recompile in a later chunk would show in the timed run's `recompile_s`) but skips the
    # other steps. Without a tokenizer nothing streams and the warm-up simply runs in full.
    t = time.perf_counter()
    with clock.measure() as compile_s:
        with contextlib.suppress(_StopWarmup):
            run(stream=_stop_after(1))
    warmup_s = time.perf_counter() - t
    with clock.measure() as recompile_s:
        traces, seconds = best_time(run, timed_runs(batch, repeats))
    lengths = {len(tr.tokens) for tr in traces}
    if lengths != {new_tokens}:
        raise RuntimeError(f"cfjax rows produced {sorted(lengths)} tokens, not {new_tokens}")
    return {
        "tokens": np.array([list(tr.tokens) for tr in traces]),
        "seconds": seconds,
        "tok_s": batch * new_tokens / seconds,
        "compile_s": compile_s[0],
        "warmup_s": warmup_s,
        "recompile_s": recompile_s[0],
        "peak_rss_mb": peak_rss_mb(),
    }


def compiled_tok_s(jitted, lm, args: tuple, batch: int, steps: int, repeats: int) -> dict:
    """Tokens/s of `jitted(lm.config, *args, steps)`, compiled ahead of time, timed like cfjax."""
    import jax

    t = time.perf_counter()
    compiled = jitted.lower(lm.config, *args, steps).compile()
    compile_s = time.perf_counter() - t
    run = lambda: np.asarray(jax.block_until_ready(compiled(*args)))  # noqa: E731
    out, seconds = best_time(run, timed_runs(batch, repeats))
    return {"out": out, "tok_s": batch * steps / seconds, "compile_s": compile_s}


def plain_decode(lm, prompts: list[list[int]], steps: int, repeats: int) -> dict:
    """`plain_scan.generate` (textbook JAX decode) with `cfjax_decode`'s keys (`key=1`), and the
    matmul floor (`matmul_floor.run`: the same steps' weight matmuls alone) at the same batch."""
    import jax.numpy as jnp
    import matmul_floor
    import plain_scan

    from cfjax.causal.factual import row_keys

    batch = len(prompts)
    plain_args = (lm.params, jnp.asarray(prompts, jnp.int32), row_keys(1, batch))
    plain = compiled_tok_s(plain_scan.generate, lm, plain_args, batch, steps, repeats)
    floor_args = (lm.params, matmul_floor.inputs(lm.config, lm.params, batch))
    floor = compiled_tok_s(matmul_floor.run, lm, floor_args, batch, steps, repeats)
    return {
        "tokens": plain["out"],
        "tok_s": plain["tok_s"],
        "compile_s": plain["compile_s"],
        "floor_tok_s": floor["tok_s"],
    }


def bytes_per_step(lm, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a decode step must read: every param once, plus the KV cache at its average length."""
    from gpu_check import tree_bytes

    c = lm.config
    avg_len = prompt_len + (new_tokens - 1) / 2
    kv = 2 * c.n_layers * batch * avg_len * c.n_kv_heads * c.head_dim * lm.dtype.itemsize
    return tree_bytes(lm.params) + kv


def main() -> None:
    """Run both sides for every batch size; print the table (or the JSON rows)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)"
    )
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--prompt-len", type=int, default=40, help="random prompt length (--config)")
    ap.add_argument("--no-transformers", action="store_true", help="time cfjax only")
    ap.add_argument(
        "--repeats", type=int, default=2, help="timed runs at batch 1, best kept (%(default)s)"
    )
    ap.add_argument(
        "--plain-batches",
        type=int,
        nargs="*",
        default=[1],
        help="batch sizes at which to also time plain_scan.py (default: %(default)s)",
    )
    ap.add_argument("--copy-mib", type=int, default=1024, help="copy-bandwidth array size")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON only")
    ap.add_argument("--transformers-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transformers_worker:
        print(json.dumps(transformers_worker(json.loads(args.transformers_worker))))
        return

    import jax

    started = time.perf_counter()
    clock = CompileClock()
    transformers = not args.no_transformers
    # Where the yardsticks run: the textbook decode, XLA's matmul floor and torch's.
    yardstick_batches = sorted(set(args.plain_batches) & set(args.batches))
    # The transformers side runs first, in a child process; for random weights it also makes
    # them (saved as a transformers model that cfjax then loads), so this process needs no torch.
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            import cfjax

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
        cf = {}
        for batch in args.batches:
            cf[batch] = cfjax_decode(lm, prompt, batch, args.new_tokens, clock, args.repeats)
            if not args.json:
                print(f"  cfjax batch {batch}: {cf[batch]['tok_s']:.1f} tok/s", file=sys.stderr)
        plain = {}
        for batch in yardstick_batches:
            plain[batch] = plain_decode(lm, [prompt] * batch, args.new_tokens, args.repeats)
            if not args.json:
                print(
                    f"  plain scan batch {batch}: {plain[batch]['tok_s']:.1f} tok/s",
                    file=sys.stderr,
                )
    bw = copy_bandwidth(args.copy_mib << 20)
    read = read_bandwidth(args.copy_mib << 20)
    where = machine()
    rows = []
    for batch in args.batches:
        c, t, pl = cf[batch], tf.get(batch), plain.get(batch)
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
            "cfjax_over_plain_scan": round(c["tok_s"] / pl["tok_s"], 3) if pl else None,
            "plain_scan_same_tokens": bool(np.array_equal(pl["tokens"], c["tokens"]))
            if pl
            else None,
            "plain_scan_compile_s": round(pl["compile_s"], 2) if pl else None,
            # The floor: the same steps' weight matmuls alone (benchmarks/matmul_floor.py).
            "matmul_floor_tok_s": round(pl["floor_tok_s"], 2) if pl else None,
            "cfjax_over_matmul_floor": round(c["tok_s"] / pl["floor_tok_s"], 3) if pl else None,
            # The peer's own floor (the same matmuls in torch): how fast its matrix-vector
            # products stream, and the ratio cfjax would show if it ran exactly at XLA's floor.
            "torch_matmul_floor_tok_s": round(t["floor_tok_s"], 2) if t and pl else None,
            "transformers_over_torch_floor": (
                round(t["tok_s"] / t["floor_tok_s"], 3) if t and pl else None
            ),
            "matmul_floor_over_transformers": (
                round(pl["floor_tok_s"] / t["tok_s"], 3) if t and pl else None
            ),
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
