"""gpu_check's peer: transformers `generate` on a random Llama of the same config and shapes, in
a child process (CUDA when torch sees it, else the CPU), with the dynamic cache and with the
static cache compiled by `torch.compile` (issue 31).

    python benchmarks/gpu_peer.py SPEC_JSON    # SPEC: config (`LlamaConfig.to_dict()`), dtype,
                                               # prompt_len, new_tokens, batches, compile (bool)
Prints one JSON line: per batch `dynamic_tok_s`, `static_tok_s` (null when not compiled) and
the torch version. Temperature-1 sampling of exactly `new_tokens` tokens, as gpu_check's; the
rope is the plain one (a Llama 3.1 scaling changes no cost).
"""

from __future__ import annotations

import json
import sys
import time


def hf_config(c: dict):
    """transformers' `LlamaConfig` of a cfjax config (`LlamaConfig.to_dict()`)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["dim"], intermediate_size=c["ffn_dim"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_kv_heads"], head_dim=c["head_dim"], rms_norm_eps=c["norm_eps"],
        max_position_embeddings=c["max_seq_len"], tie_word_embeddings=c["tie_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
    )  # fmt: skip


def run(spec: dict) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds, not minutes, for 8B
        model = LlamaForCausalLM(hf_config(spec["config"])).to(dtype).eval()
    n = spec["new_tokens"]

    def config(steps: int, static: bool) -> GenerationConfig:
        return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
                                cache_implementation="static" if static else None)  # fmt: skip

    def timed(ids, static: bool) -> float:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config(n, static))  # fmt: skip
            sync()
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config(n, static))  # fmt: skip
            sync()
        return time.perf_counter() - t

    rows = []
    for batch in spec["batches"]:
        ids = torch.randint(1, model.config.vocab_size, (batch, spec["prompt_len"]), device=device)
        row = {"batch": batch, "dynamic_tok_s": batch * n / timed(ids, False), "static_tok_s": None}
        rows.append(row)
    if spec["compile"]:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        for row in rows:
            ids = torch.randint(1, model.config.vocab_size, (row["batch"], spec["prompt_len"]), device=device)  # fmt: skip
            row["static_tok_s"] = row["batch"] * n / timed(ids, True)
    return {"device": device, "torch": torch.__version__, "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
