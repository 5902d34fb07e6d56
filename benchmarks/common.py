"""Helpers the benchmarks share: the machine, timing, model loading, yardsticks, byte counts.

One module that imports no other benchmark but the leaf yardsticks (plain_scan, matmul_floor),
so decode.py, counterfactual.py, profile_decode.py and gpu_check.py share it without a circle.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

# The benchmarks time compilation: a program loaded from cfjax's persistent compilation cache
# would hide it. Set the variable to a folder to measure with a cache on purpose.
os.environ.setdefault("CFJAX_COMPILATION_CACHE", "")

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPT = "Write a short story about a cat who learns to fly."
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


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
    from cfjax.core import model as cfmodel

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


def tree_bytes(tree) -> int:
    """Total bytes of a pytree's arrays."""
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def compiled_run(jitted, lm, args: tuple, steps: int) -> tuple:
    """(a call of `jitted(lm.config, *args, steps)` compiled ahead of time that waits for its
    numpy result, the compile seconds)."""
    import jax

    t = time.perf_counter()
    compiled = jitted.lower(lm.config, *args, steps).compile()
    compile_s = time.perf_counter() - t
    return (lambda: np.asarray(jax.block_until_ready(compiled(*args)))), compile_s


def plain_runs(lm, prompts: list[list[int]], steps: int, scan_layers: bool = False) -> dict:
    """{"plain": (run, compile s), "floor": (run, compile s)}: `plain_scan.generate` (textbook
    JAX decode) with `cfjax_decode`'s keys (`key=1`), and the matmul floor (`matmul_floor.run`:
    the same steps' weight matmuls alone) at the same batch, compiled. `scan_layers`: also
    "layers", the textbook decode with a `lax.scan` over stacked layers (a copy of the weights,
    `plain_scan.stack_layers`)."""
    import jax.numpy as jnp
    import matmul_floor
    import plain_scan

    from cfjax.runtime.request import row_keys

    batch = len(prompts)
    plain_args = (lm.params, jnp.asarray(prompts, jnp.int32), row_keys(1, batch))
    floor_args = (lm.params, matmul_floor.inputs(lm.config, lm.params, batch))
    runs = {
        "plain": compiled_run(plain_scan.generate, lm, plain_args, steps),
        "floor": compiled_run(matmul_floor.run, lm, floor_args, steps),
    }
    if scan_layers:
        stacked = (plain_scan.stack_layers(lm.params), *plain_args[1:])
        runs["layers"] = compiled_run(plain_scan.generate, lm, stacked, steps)
    return runs


def interleaved(runs: dict, rounds: int) -> tuple[dict, dict]:
    """({name: last output}, {name: wall seconds per round}) of `runs` (name -> call) over
    `rounds` rounds in which they take turns: a slow spell of this shared VM falls on all of
    them alike, so the ratio of two runs' times within a round is paired (take its median)."""
    outs, times = {}, {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return outs, {name: np.asarray(t) for name, t in times.items()}


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """The median over rounds of `numerator[i] / denominator[i]` (times from `interleaved`)."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def plain_decode(lm, prompts: list[list[int]], steps: int, repeats: int, scan_layers: bool = False) -> dict:  # fmt: skip
    """The textbook decode and the matmul floor (`plain_runs`), each the best of its runs at
    batch 1 (`timed_runs`), taking turns; with `scan_layers` the textbook decode over stacked
    layers too (`layers_*`)."""
    runs = plain_runs(lm, prompts, steps, scan_layers)
    outs, times = interleaved({k: r[0] for k, r in runs.items()}, timed_runs(len(prompts), repeats))
    tok_s = {k: len(prompts) * steps / t.min() for k, t in times.items()}
    out = {
        "tokens": outs["plain"],
        "tok_s": tok_s["plain"],
        "compile_s": runs["plain"][1],
        "floor_tok_s": tok_s["floor"],
    }
    if scan_layers:
        out.update(layers_tokens=outs["layers"], layers_tok_s=tok_s["layers"], layers_compile_s=runs["layers"][1])  # fmt: skip
    return out


def sample_decode(lm, prompt: list[int], batch: int, steps: int, repeats: int) -> dict:
    """`jax.jit(jax.vmap(cfjax.core.sample))` over `batch` keys (`cfjax_decode`'s: key 1 split
    per row), one prompt: the functional core timed like `generate`, on the same tokens."""
    import jax
    import jax.numpy as jnp

    from cfjax import core
    from cfjax.runtime.request import row_keys

    n = len(prompt)
    padded = jnp.zeros(core.bucket_length(n), jnp.int32).at[:n].set(jnp.asarray(prompt))
    sampler = core.Sampler(temperature=1.0)
    one = lambda params, key: (
        core.sample(  # noqa: E731
            lm.config, params, padded, n, key, sampler, max_new_tokens=steps
        ).tokens
    )
    keys = row_keys(1, batch)
    t = time.perf_counter()
    compiled = jax.jit(jax.vmap(one, in_axes=(None, 0))).lower(lm.params, keys).compile()
    compile_s = time.perf_counter() - t
    run = lambda: np.asarray(jax.block_until_ready(compiled(lm.params, keys)))  # noqa: E731
    out, seconds = best_time(run, timed_runs(batch, repeats))
    return {"tokens": out, "tok_s": batch * steps / seconds, "compile_s": compile_s}


def bytes_per_step(lm, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes a decode step must read: every param once, plus the KV cache at its average length."""
    c = lm.config
    avg_len = prompt_len + (new_tokens - 1) / 2
    kv = 2 * c.n_layers * batch * avg_len * c.n_kv_heads * c.head_dim * lm.dtype.itemsize
    return tree_bytes(lm.params) + kv


def lm_with_hf_source(model: str, config: str | None, folder: Path):
    """(cfjax LM, transformers source) that both sides load: `model`, or random weights of a
    preset saved as an HF folder under `folder` (so that the peer builds the same model)."""
    if config is None:
        return load_lm(model)
    import cfjax

    path = tiny_hf_model(folder / "hf", config)
    return cfjax.load(path), {"path": str(path)}


def run_peer(script: str, spec: dict) -> dict:
    """Run `benchmarks/<script> SPEC_JSON` in a child process (offline, quiet, every core) and
    return the JSON object of its last stdout line."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}  # fmt: skip
    spec = {**spec, "threads": os.cpu_count() or 1}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent / script), json.dumps(spec)],
        stdout=subprocess.PIPE, env=env, check=True, text=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def provenance(lm, peer: dict, compile_s: float, started: float) -> dict:
    """The fields every side-by-side JSON ends with: model, versions, machine, times."""
    import jax

    return {
        "cfjax_compile_s": round(compile_s, 2),
        "model": lm.model_id,
        "jax": jax.__version__,
        "torch": peer["torch"],
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
