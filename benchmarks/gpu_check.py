"""Every accelerator check in one run, in the order of what issue 31 asks first.

1. Per batch (`rows`): decode speed against the HBM roofline and the first run's compile time;
   at the first batch a null intervention (its cost over the factual run, token flips in
   bfloat16), at the others batch invariance (row 0 alone, among identical rows, among other
   prompts: flips and the largest log-prob difference).
2. Speculative decoding with the int8 variant of the same weights as the draft (speed over
   plain decoding, acceptance, flips, the draft's step cost); transformers `generate` on the
   same config and shapes in a child process (dynamic cache; static cache + `torch.compile` on
   an accelerator); the first batch's compile split (`compile_split.py` in child processes:
   prefill and decode chunk compiled by XLA with the persistent cache off, then loaded from the
   cache this run filled); a textbook JAX decode (layers unrolled, and a `lax.scan` over
   stacked layers) and the weight matmuls alone on the same weights (`plain_scan_*`,
   `plain_scan_layers_*`, `matmul_floor_*`).
3. With `--profile-steps N`: per batch, the 10 costliest ops of N warm steps traced in a child
   process with CUDA command buffers off (`rows[i].profile`, each `op` and `ms_per_step`).
4. Optional (not with `--quick`; with `--budget-s`, started only while the budget lasts, else
   listed in `skipped`): the yardsticks at the other batches; the compile split of the model
   with `batch_invariant=False` (`compile_split_variant`: what the invariant forms cost to
   compile); issue 34's attribution sweep with the real Llama 3 tokenizer (the llama-models
   wheel, carried in `.whl/`; `make gpu-wheels`); and per batch the same rows with
   `model_blocks=8` (the blocked matmuls that make model-parallel meshes bit-exact).

`check_s` gives each check's seconds, `total_s` the run's; `--out` rewrites the JSON after every
check. Random weights of a named config (no download): on a GPU `--config llama3-8b`; on this
CPU the same script runs with `--config tiny` so it stays tested. Prints JSON (with `--json`
nothing else).

    python benchmarks/gpu_check.py --config llama3-8b --prompt-len 512 --new-tokens 256 \
        --batches 1 64 --json
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import plain_decode, tree_bytes  # benchmarks/, beside this file

import cfjax
from cfjax import ReplaceTokens, Sampler, counterfactual, generate
from cfjax.compilation import use_compilation_cache
from cfjax.core import kernel, model
from cfjax.runtime import ahead, driver

# Peak HBM bandwidth (bytes/s, the vendor's figure) by a part of the device kind, the first
# that matches: for the roofline. The H100's three forms differ by 2x, and a GH200 or an A100
# comes with more than one memory, so a kind not named here uses a measured copy.
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100 80GB HBM3", 3.35e12),  # SXM
    ("NVIDIA H200", 4.8e12),  # SXM and NVL
    ("A100-SXM4-80GB", 2.039e12),
)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write bytes per second)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        x = f(x)
    x.block_until_ready()
    return 2 * nbytes * 5 / (time.perf_counter() - t)


def peak_bandwidth() -> tuple[float, str]:
    """(bytes/s, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    for name, bw in PEAK_BANDWIDTH:
        if name in kind:
            return bw, f"{kind} spec"
    return copy_bandwidth(), f"{kind} measured copy"


def write_json(path: Path | None, result: dict) -> None:
    """`result` as JSON at `path` (if given), replaced whole: a reader never sees half a file."""
    if path is not None:
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(result))
        part.replace(path)


def timed(fn):
    """(result, seconds) with the device synchronised."""
    t = time.perf_counter()
    out = fn()
    jax.effects_barrier()
    return out, time.perf_counter() - t


class Checks:
    """The checks' bookkeeping: each one's seconds (`check_s`), the JSON rewritten after each
    (`--out`), and the budget: an optional check starts only while it is not spent."""

    def __init__(self, result: dict, out: Path | None, budget_s: float):
        self.result, self.out, self.budget_s = result, out, budget_s
        self.started = time.perf_counter()
        result["check_s"] = {}

    def save(self) -> None:
        self.result["total_s"] = round(time.perf_counter() - self.started, 1)
        write_json(self.out, self.result)

    @contextlib.contextmanager
    def step(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.result["check_s"][name] = round(time.perf_counter() - t, 1)
            self.save()

    def in_budget(self, name: str) -> bool:
        """Whether optional check `name` may start; if not, it is listed in `skipped`."""
        spent = time.perf_counter() - self.started
        if not self.budget_s or spent < self.budget_s:
            return True
        self.result.setdefault("skipped", []).append(f"{name}: the {self.budget_s:g} s budget was spent ({spent:.0f} s)")  # fmt: skip
        self.save()
        return False


def main() -> None:
    """Run the checks and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--profile-steps", type=int, default=0, help="then trace this many warm steps per batch, per op")  # fmt: skip
    ap.add_argument("--attribution-words", type=int, default=40, help="then an attribution sweep (0: none)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=0, help="start the optional checks (yardsticks at the other batches, compile_split_variant, attribution, model_blocks) only within this many seconds (0: always)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the JSON here after every check (what a run cut short by a time limit leaves)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="64 new tokens, no profile, no optional checks (≤ 3 min on an H200)")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.profile_steps, args.attribution_words = min(args.new_tokens, 64), 0, 0
    checks = Checks({}, args.out, args.budget_s)
    result = checks.result
    folder = compilation_cache()
    result["compilation_cache"] = {
        "folder": folder,
        # compile_s is XLA's own only where nothing of this run's is on disk yet.
        "entries_at_start": len(list(Path(folder).iterdir())),
        # Whether a run compiles its decode chunk beside its prefill (`runtime.ahead`).
        "compile_ahead": ahead.enabled(),
    }
    config = cfjax.preset(args.config)
    dtype = jnp.dtype(args.dtype)
    init = jax.jit(lambda k: model.init_params(config, k, dtype=dtype))
    key = jax.random.key(0)
    # Compile and run apart, and wait for the arrays: the GPU run of session 1 spent 86 s here.
    with checks.step("init"):
        init, init_compile_s = timed(lambda: init.lower(key).compile())
        params, init_run_s = timed(lambda: jax.block_until_ready(init(key)))
    lm = cfjax.LM(config, params, model_id=f"random-{args.config}")
    bw, bw_source = peak_bandwidth()
    param_bytes = tree_bytes(params)
    rows = []
    result.update({
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "config": args.config,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "param_gb": round(param_bytes / 1e9, 2),
        "bandwidth_gb_s": round(bw / 1e9, 1),
        "bandwidth_source": bw_source,
        "init_compile_s": round(init_compile_s, 1),
        "init_run_s": round(init_run_s, 1),
        "rows": rows,
        "complete": False,  # until every check has run (see `--out`)
    })  # fmt: skip
    checks.save()
    # What issue 31 asks of every run first; diagnostics after; the optional checks last.
    rng = np.random.default_rng(0)
    runs = []  # per row: its prompts and row 0's tokens, for the checks that follow
    for batch in args.batches:
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        with checks.step(f"batch_{batch}"):
            row, traces, warm_s = batch_row(lm, prompts, args.new_tokens, bw, param_bytes)
            rows.append(row)
            checks.save()
            if batch == args.batches[0]:
                row.update(null_intervention(lm, traces[0], warm_s))
            else:
                row.update(invariance(lm, prompts, args.new_tokens))
        runs.append((prompts, traces[0].tokens))
        if not args.json:  # progress: a long GPU run shows each batch as it finishes
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    first, (prompts, tokens) = rows[0], runs[0]
    with checks.step("speculative"):
        first.update(speculative(lm, prompts, args.new_tokens, first["tok_s"], tokens))
    with checks.step("transformers"):
        add_transformers(rows, config, args)
    with checks.step("compile_split"):
        result["compile_split"] = compile_split(args, cache=False)
        result["compile_split_cached"] = compile_split(args, cache=True)
    with checks.step("yardsticks"):
        first.update(yardsticks(lm, prompts, args.new_tokens, first["tok_s"], tokens))
    if args.profile_steps:
        with checks.step("profiles"):
            for row in rows:  # per batch, in a child process with CUDA command buffers off
                row["profile"] = batch_profile(args, row["batch"])
                checks.save()
    for row, (prompts, tokens) in zip(rows[1:], runs[1:], strict=True):
        if not args.quick and checks.in_budget(f"yardsticks at batch {row['batch']}"):
            with checks.step(f"yardsticks_{row['batch']}"):
                row.update(yardsticks(lm, prompts, args.new_tokens, row["tok_s"], tokens))
    if not args.quick and checks.in_budget("compile_split_variant"):
        with checks.step("compile_split_variant"):  # what the invariant forms cost to compile
            result["compile_split_variant"] = compile_split(args, cache=False, variant=True)
    if args.attribution_words and checks.in_budget("attribution"):
        with checks.step("attribution"):
            result["attribution"] = attribution(lm, args.attribution_words)
    for row, (prompts, tokens) in zip(rows, runs, strict=True):
        if not args.quick and checks.in_budget(f"model_blocks at batch {row['batch']}"):
            with checks.step(f"model_blocks_{row['batch']}"):
                row.update(blocks_cost(lm, prompts, args.new_tokens, row["tok_s"], tokens))
    result["complete"] = True
    checks.save()
    if not args.json:
        print_summary(result)
    print(json.dumps(result))


def compilation_cache() -> str:
    """The persistent compilation cache this run and its children share: the folder the
    environment names (`CFJAX_COMPILATION_CACHE`, JAX's own), else a new empty one (the
    benchmarks run without a cache by default: `common`). A compile then pays XLA's time once,
    and `compile_split_cached` shows what a second process pays."""
    if not jax.config.jax_compilation_cache_dir:
        folder = tempfile.mkdtemp(prefix="gpu-check-xla-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["CFJAX_COMPILATION_CACHE"] = folder
        use_compilation_cache()  # (before this process compiles anything)
    return jax.config.jax_compilation_cache_dir


def batch_row(lm, prompts, steps: int, bw: float, param_bytes: int) -> tuple[dict, list, float]:
    """A batch's speed, twice generated (the first compiles), against the HBM roofline: its
    row, its traces and the warm run's seconds."""
    batch, config = len(prompts), lm.config
    run = functools.partial(generate, lm, prompts, key=1, sampler=Sampler(temperature=1.0),
                            max_new_tokens=steps, stop_tokens=())  # fmt: skip
    _, first_s = timed(run)  # includes compilation
    traces, warm_s = timed(run)
    tok_s = batch * steps / warm_s
    slots = kernel.cache_length(kernel.bucket_length(len(prompts[0])), steps)
    kv_bytes = 2 * config.n_layers * batch * slots * config.n_kv_heads * config.head_dim
    kv_bytes *= jnp.dtype(model.compute_dtype(lm.params)).itemsize
    roofline = batch * bw / (param_bytes + kv_bytes)
    row = {
        "batch": batch,
        "tok_s": round(tok_s, 1),
        "roofline_tok_s": round(roofline, 1),
        "roofline_fraction": round(tok_s / roofline, 3),
        "compile_s": round(first_s - warm_s, 1),
    }
    return row, traces, warm_s


def null_intervention(lm, trace, warm_s: float) -> dict:
    """Force the factual token at the middle, full replay (no cache reuse) and resumed from
    the cache: their cost over the factual run's, and their flips (any is a numerics bug)."""
    mid = len(trace.tokens) // 2
    null = ReplaceTokens(mid, [trace.tokens[mid]])
    counterfactual(lm, trace, null, reuse_cache=False)  # compile both paths first
    counterfactual(lm, trace, null)
    replay, replay_s = timed(functools.partial(counterfactual, lm, trace, null, reuse_cache=False))
    resumed, resumed_s = timed(functools.partial(counterfactual, lm, trace, null))
    flips = sum(a != b for a, b in zip(replay.tokens, trace.tokens, strict=True))
    flips += sum(a != b for a, b in zip(resumed.tokens, trace.tokens, strict=True))
    return {
        "cf_over_factual": round(replay_s / warm_s, 3),
        "cf_reuse_middle_over_factual": round(resumed_s / warm_s, 3),
        "null_intervention_flips": int(flips),
    }


def print_summary(result: dict) -> None:
    """The run's headline, its compile split, per-batch profiles and the attribution row."""
    print(f"{result['device']}  jax {result['jax']}  {result['config']} {result['dtype']}")
    print(f"params {result['param_gb']} GB, bandwidth {result['bandwidth_gb_s']} GB/s ({result['bandwidth_source']})")  # fmt: skip
    splits = ("compile_split", "compile_split_cached", "compile_split_variant")
    for name in (*splits, "attribution", "check_s"):
        if name in result:
            print(f"{name}:", "  ".join(f"{k}={v}" for k, v in result[name].items()))
    for row in result["rows"]:
        if isinstance(row.get("profile"), list):
            print(f"batch {row['batch']}, costliest ops a step:")
            for op in row["profile"]:
                print(f"  {op['ms_per_step']:9.3f} ms  {op['op']}")


def yardsticks(lm, prompts, steps: int, tok_s: float, tokens) -> dict:
    """The same run as a textbook JAX decode (`plain_scan.py`) and as the weight matmuls alone
    (`matmul_floor.py`): is a gap to the roofline cfjax's or XLA's? And the textbook decode
    with a `lax.scan` over stacked layers (`plain_scan_layers_*`): what a program of one block
    saves in compile time and costs in speed on this backend (issue 31's compile target; a
    stacked layout would change every loader). An error (e.g. a config the textbook decode
    does not implement) is reported instead of losing the other checks."""
    try:
        plain = plain_decode(lm, prompts, steps, repeats=2, scan_layers=True)
    except Exception as e:  # noqa: BLE001
        return {"plain_scan_error": f"{type(e).__name__}: {e}"}
    same = np.cumprod(plain["tokens"][0] == np.asarray(tokens))
    return {
        "plain_scan_tok_s": round(plain["tok_s"], 1),
        "cfjax_over_plain_scan": round(tok_s / plain["tok_s"], 3),
        # bfloat16 rounds differently in the two programs, so they may part ways.
        "plain_scan_same_first_tokens": int(same.sum()),
        "plain_scan_compile_s": round(plain["compile_s"], 2),
        "plain_scan_layers_tok_s": round(plain["layers_tok_s"], 1),
        "plain_scan_layers_compile_s": round(plain["layers_compile_s"], 2),
        # The same arithmetic in another program: equal tokens in float32, in bfloat16 most.
        "plain_scan_layers_same_tokens": float(np.mean(plain["layers_tokens"] == plain["tokens"])),
        "matmul_floor_tok_s": round(plain["floor_tok_s"], 1),
        "cfjax_over_matmul_floor": round(tok_s / plain["floor_tok_s"], 3),
    }


def speculative(lm, prompts, steps: int, tok_s: float, tokens, lookahead: int = 4) -> dict:
    """The same rows decoded speculatively with the int8 variant of the same weights as the
    draft: its speed over plain decoding, the draft's acceptance, and the tokens that differ
    from plain decoding (a flip: the multi-token pass rounding a near-tie otherwise); and what
    a step of the draft alone costs against a step of the target alone (`draft_step_cost`)."""
    try:
        from cfjax.causal.factual import draft_for
        from cfjax.runtime.request import row_keys

        int8 = cfjax.quantize(lm, "int8")
        draft = draft_for(lm, int8, lookahead)
        request = driver.Request(
            [list(p) for p in prompts], row_keys(1, len(prompts)),
            [Sampler(temperature=1.0)] * len(prompts), steps,
        )  # fmt: skip
        run = functools.partial(driver.run, lm.config, lm.params, request, stop_tokens=(), draft=draft)  # fmt: skip
        _, first_s = timed(run)
        out, warm_s = timed(run)
        alone = functools.partial(driver.run, int8.config, int8.params, request, stop_tokens=())
        timed(alone)
        draft_s = timed(alone)[1]
    except Exception as e:  # noqa: BLE001 (the checks above must still be printed)
        return {"speculative_error": f"{type(e).__name__}: {e}"}
    spec_tok_s = len(prompts) * steps / warm_s
    emitted = max(len(t) for t in out.tokens)
    return {
        "speculative_tok_s": round(spec_tok_s, 1),
        "speculative_over_plain": round(spec_tok_s / tok_s, 3),
        "acceptance_rate": round((emitted - out.rounds) / (out.rounds * lookahead), 3),
        "tokens_per_round": round(emitted / out.rounds, 2),
        "speculative_flips": int(sum(a != b for a, b in zip(out.tokens[0], tokens, strict=True))),
        "speculative_compile_s": round(first_s - warm_s, 1),
        "draft_step_cost": round(draft_s * tok_s / (len(prompts) * steps), 3),
    }


def blocks_cost(lm, prompts, steps: int, tok_s: float, tokens, blocks: int = 8) -> dict:
    """The same rows with `model_blocks=8` (each weight matmul as 8 blocks, bit-exact on
    model-parallel meshes): its speed over the default engine and the row-0 tokens that differ
    from it (float32 partials summed in another order may round a near-tie otherwise)."""
    try:
        blocked = lm.replace(model_blocks=blocks)
        run = functools.partial(generate, blocked, prompts, key=1, sampler=Sampler(temperature=1.0),
                                max_new_tokens=steps, stop_tokens=())  # fmt: skip
        _, first_s = timed(run)
        out, warm_s = timed(run)
    except Exception as e:  # noqa: BLE001 (the checks above must still be printed)
        return {"model_blocks_error": f"{type(e).__name__}: {e}"}
    blocked_tok_s = len(prompts) * steps / warm_s
    return {
        "model_blocks_tok_s": round(blocked_tok_s, 1),
        "model_blocks_over_default": round(blocked_tok_s / tok_s, 3),
        "model_blocks_other_tokens": int(
            sum(a != b for a, b in zip(out[0].tokens, tokens, strict=True))
        ),
        "model_blocks_compile_s": round(first_s - warm_s, 1),
    }


def invariance(lm, prompts, steps: int) -> dict:
    """Batch invariance of row 0 (issue 30): its tokens and log-probs alone, in a batch of
    identical rows and in the batch of different prompts, each row with its own key. Flips:
    tokens that differ from the row alone; the largest log-prob difference where they agree."""
    from cfjax.runtime.request import row_keys

    keys = row_keys(1, len(prompts))
    run = lambda ps, ks: generate(
        lm, ps, key=ks, sampler=Sampler(temperature=1.0), max_new_tokens=steps, stop_tokens=()
    )  # noqa: E731,E501
    alone = run([prompts[0]], keys[:1])[0]
    flips, diff = 0, 0.0
    for batch in ([prompts[0]] * len(prompts), prompts):
        other = run(batch, keys)[0]
        flips += sum(a != b for a, b in zip(other.tokens, alone.tokens, strict=True))
        agree = next((i for i, (a, b) in enumerate(zip(other.tokens, alone.tokens, strict=True)) if a != b), len(alone.tokens))  # fmt: skip
        diff = max(diff, float(np.max(np.abs(np.subtract(other.logprobs[:agree], alone.logprobs[:agree])), initial=0.0)))  # fmt: skip
    return {"invariance_flips": int(flips), "invariance_max_logprob_diff": diff}


def attribution(lm, words: int) -> dict:
    """Issue 34's sweep (`attribution.py`: every word of a `words`-word prompt removed, one
    engine batch, 32 tokens) against its counterfactuals one by one, on these weights with the
    real Llama 3 tokenizer (a config of another vocabulary, the CPU's tiny one, gets random
    weights of that vocabulary). An error (e.g. llama-models not installed) is reported."""
    try:
        import attribution as sweep  # benchmarks/, beside this file

        from cfjax.tokenizer.loader import load

        tokenizer = load("llama3")
        if lm.config.vocab_size == tokenizer.vocab_size:
            lm = lm.replace(tokenizer=tokenizer)
        else:
            lm = sweep.random_lm(lm.model_id.removeprefix("random-"), tokenizer)
        out = sweep.measure(lm, words=words)
    except Exception as e:  # noqa: BLE001 (the checks above must still be printed)
        return {"error": f"{type(e).__name__}: {e}"}
    keep = ("speedup", "speedup_rounds", "units", "batched_s", "sequential_scaled_s",
            "batched_matches_one_by_one", "compile_s", "one_by_one_compile_s", "prompt_tokens")  # fmt: skip
    return {k: out[k] for k in keep}


def add_transformers(rows: list[dict], config, args) -> None:
    """Per row, transformers `generate` on the same config and shapes in a child process
    (`gpu_peer.py`): the dynamic cache, and on an accelerator the static cache compiled by
    `torch.compile`, with cfjax's speed over the latter. An error is reported in the rows."""
    spec = {"config": config.to_dict(), "dtype": args.dtype, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "batches": [r["batch"] for r in rows],
            "compile": jax.default_backend() != "cpu"}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).with_name("gpu_peer.py")), json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})  # fmt: skip
    if proc.returncode != 0:
        for row in rows:
            row["transformers_error"] = (proc.stderr.strip().splitlines() or ["gpu_peer.py failed"])[-1]  # fmt: skip
        return
    peer = json.loads(proc.stdout.strip().splitlines()[-1])
    for row, theirs in zip(rows, peer["rows"], strict=True):
        static = theirs["static_tok_s"]
        row["transformers_dynamic_tok_s"] = round(theirs["dynamic_tok_s"], 1)
        row["transformers_static_tok_s"] = None if static is None else round(static, 1)
        row["over_transformers_static"] = (
            None if static is None else round(row["tok_s"] / static, 3)
        )
        row["torch"] = peer["torch"]


def compile_split(args, cache: bool, variant: bool = False) -> dict:
    """`compile_split.py` for the first batch in a child process (it makes no weights): with
    the persistent compilation cache off, what XLA's compile of the prefill and of the decode
    chunk costs; with it on (the folder this run filled), what a second process pays, and
    whether both programs came from disk (`cache_hits`); `variant`: of the model with
    `batch_invariant=False` (XLA's own sums and one matmul per weight). An error is reported
    in the result."""
    env = dict(os.environ)
    if not cache:  # (JAX's own setting would turn it back on)
        env["CFJAX_COMPILATION_CACHE"] = ""
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, str(Path(__file__).with_name("compile_split.py")), "--config", args.config,
           "--dtype", args.dtype, "--batch", str(args.batches[0]), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--json"] + ["--batch-variant"] * variant  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["compile_split.py failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def batch_profile(args, batch: int) -> list[dict] | dict:
    """The 10 costliest ops of a warm decode step at `batch` (`op`, `ms_per_step`), traced by
    `profile_decode.py` in a child process with CUDA command buffers off (they hide the
    kernels from the profiler; the timings above keep them on), its GPU memory taken as it
    needs it (this process holds its own). An error is reported in place of the ops."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).with_name("profile_decode.py")), "--config", args.config,
           "--dtype", args.dtype, "--batch", str(batch), "--steps", str(args.profile_steps),
           "--prompt-len", str(args.prompt_len), "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["profile_decode.py failed"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{"op": o["op"], "ms_per_step": o["ms_per_step"]} for o in out["ops"][:10]]


if __name__ == "__main__":
    main()
