"""The paper's method for the stability study, in transformers at batch 1 (a child process).

Per prompt and temperature: a factual answer (greedy over logits / τ + Gumbel noise, the noise
drawn up front, as the paper saves its random states); at each intervention position a token of
the step's top-p 0.9 set other than the factual one (none: the position is skipped, as in the study); the counterfactual regenerated from the
prompt and the kept prefix with the saved noise, and an interventional one with fresh noise.

    python study_peer.py SPEC_JSON   ->  one JSON line {"seconds", "per_prompt_s", ...}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def worker(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor

    torch.set_num_threads(spec["threads"])
    src = spec["source"]
    kwargs = {"gguf_file": src["gguf_file"]} if "gguf_file" in src else {}
    model = AutoModelForCausalLM.from_pretrained(src["path"], dtype=torch.float32, **kwargs).eval()
    n, vocab = spec["new_tokens"], model.config.vocab_size

    class Noisy(LogitsProcessor):  # the paper's sampler: argmax(logits / τ + noise[step])
        def __init__(self, noise, tau):
            self.noise, self.tau, self.i, self.scores = noise, tau, 0, []

        def __call__(self, input_ids, scores):
            self.scores.append(scores[0].clone())
            out = scores / self.tau + self.noise[self.i]
            self.i += 1
            return out

    def run(prefix, noise, tau, steps):
        gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=steps,
                               min_new_tokens=steps, pad_token_id=0)  # fmt: skip
        proc = Noisy(noise, tau)
        with torch.inference_mode():
            out = model.generate(torch.tensor([prefix]), attention_mask=torch.ones(1, len(prefix), dtype=torch.long),
                                 logits_processor=[proc], generation_config=gen)  # fmt: skip
        return out[0, len(prefix) :].tolist(), proc.scores

    rng = np.random.default_rng(0)
    gen_torch = torch.Generator().manual_seed(0)
    tokens = done = 0

    def study(prompt):
        nonlocal tokens, done
        for tau in spec["temperatures"]:
            noise = -torch.log(-torch.log(torch.rand(n, vocab, generator=gen_torch)))
            fact, scores = run(prompt, noise, tau, n)
            tokens += n
            for i in range(spec["interventions"]):
                low, high = (
                    max(n * i // spec["interventions"], 1),
                    min(n * (i + 1) // spec["interventions"], n - 2),
                )
                p = int(rng.integers(low, high))
                probs = torch.softmax(scores[p] / tau, -1).numpy()
                order = np.argsort(-probs)
                keep = order[: max(1, int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1)]
                keep = [t for t in keep if t != fact[p]]
                if not keep:  # as the study does: no other token in the set, no intervention
                    continue
                new = int(rng.choice(keep))
                prefix = prompt + fact[:p] + [new]
                run(prefix, noise[p + 1 :], tau, n - p - 1)  # counterfactual: saved noise
                fresh = -torch.log(-torch.log(torch.rand(n - p - 1, vocab, generator=gen_torch)))
                run(prefix, fresh, tau, n - p - 1)  # interventional: fresh noise
                tokens += 2 * (n - p - 1)
                done += 1

    run(spec["prompts"][0], torch.zeros(4, vocab), 1.0, 4)  # warm-up
    start = time.perf_counter()
    for prompt in spec["prompts"]:
        study(prompt)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "prompts": len(spec["prompts"]), "tokens": tokens,
            "interventions_done": done,
            "per_prompt_s": seconds / len(spec["prompts"]), "torch": torch.__version__}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
