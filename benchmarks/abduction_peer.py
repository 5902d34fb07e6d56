"""The abduction reference: Ravfogel et al.'s way, in transformers, in a child process.

Their `lm-counterfactuals` code (sampling.py, utils.py) does one sample at a time: a full HF
forward of prompt + observed text, numpy top-down truncated-Gumbel noise per step (the
hindsight sampler, temperature 1), then `model.generate` with a logits processor that adds that
noise (greedy decoding over logits + noise) for the counterfactual. Transcribed here (not
imported: it is a research repository, not a package) and timed per sample.

    python abduction_peer.py SPEC_JSON   ->  one JSON line {"seconds", "per_sample_s", ...}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def topdown(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Posterior noise of one step given token k (their `topdown_vectorized`)."""
    logalphas = logits.astype(np.float64)
    top = rng.gumbel() + np.logaddexp.reduce(logalphas)
    g = rng.gumbel(size=len(logalphas)) + logalphas
    g = -np.log(np.exp(-g) + np.exp(-top))
    g[k] = top
    return g - logalphas


def worker(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor

    torch.set_num_threads(spec["threads"])
    src = spec["source"]
    kwargs = {"gguf_file": src["gguf_file"]} if "gguf_file" in src else {}
    model = AutoModelForCausalLM.from_pretrained(src["path"], dtype=torch.float32, **kwargs).eval()

    class AddNoise(LogitsProcessor):  # their GumbelProcessor: precomputed noise, step by step
        def __init__(self, noise):
            self.noise, self.i = noise, 0

        def __call__(self, input_ids, scores):
            out = scores + self.noise[self.i]
            self.i += 1
            return out

    prompt, observed = spec["prompt"], spec["observed"]
    edit_at, new_token, steps = spec["edit_at"], spec["new_token"], len(observed)
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=steps - edit_at - 1,
                           min_new_tokens=steps - edit_at - 1, pad_token_id=0)  # fmt: skip
    rng = np.random.default_rng(0)

    def one_sample() -> tuple[int, list[int]]:
        ids = torch.tensor([prompt + observed], dtype=torch.long)
        with torch.inference_mode():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float().numpy()
        noise = np.stack([topdown(logits[s], observed[s], rng) for s in range(steps)])
        misses = int(np.sum(np.argmax(logits + noise, axis=1) != np.asarray(observed)))
        cf_prefix = prompt + observed[:edit_at] + [new_token]
        proc = AddNoise(torch.tensor(noise[edit_at + 1 :], dtype=torch.float32))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([cf_prefix]), attention_mask=torch.ones(1, len(cf_prefix), dtype=torch.long),
                logits_processor=[proc], generation_config=gen,
            )  # fmt: skip
        return misses, out[0, len(cf_prefix) :].tolist()

    one_sample()  # warm-up
    start = time.perf_counter()
    misses = 0
    for _ in range(spec["samples"]):
        m, tokens = one_sample()
        misses += m
        if len(tokens) != steps - edit_at - 1:
            raise RuntimeError(f"the reference generated {len(tokens)} tokens")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "samples": spec["samples"],
        "per_sample_s": seconds / spec["samples"],
        "replay_misses": misses,  # steps where the reference's noise fails its own observation
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
