"""The peer: transformers `generate` and torch's own matmul floor, in a child process.

A child process keeps the peer's peak RSS its own and keeps no JAX thread pool beside it.
`run_transformers` starts `python peer.py SPEC_JSON` and reads its rows from stdout.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import best_time, peak_rss_mb, timed_runs, tiny_hf_model


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
        [sys.executable, __file__, json.dumps(spec)],
        stdout=subprocess.PIPE,
        env=env,
        check=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(transformers_worker(json.loads(sys.argv[1]))))
