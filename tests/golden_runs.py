"""Golden runs: every route through the engine on fixed inputs, recorded token for token.

Recorded once before the engine became one decode kernel (issue 29), in `tests/data/golden.json`;
`tests/test_golden.py` runs them again and asserts every token, log-prob and noise index
bit-identical. To record after an intended change of results (never to make a test pass):
    .venv/bin/python tests/golden_runs.py tests/data/golden.json
The sharded run is recorded by `tests/sharded_checks.py` (8 fake devices) under "sharded".
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import cfjax
from cfjax.core import model

SAMPLERS = {
    "greedy": cfjax.Sampler(temperature=0.0),
    "t0.7": cfjax.Sampler(temperature=0.7),
    "topk": cfjax.Sampler(temperature=1.0, top_k=5),
    "topp": cfjax.Sampler(temperature=1.0, top_p=0.8),
}
PROMPTS = [[3, 17, 99, 5, 200, 42, 7], [1, 2, 3], [9] * 40]
STOP = (11,)  # a stop token of the tiny model, so that some rows end early


def record(t) -> dict:
    """What must not change: tokens, log-probs (exact floats), noise indices, text."""
    return {"tokens": list(t.tokens), "logprobs": [float(x) for x in t.logprobs],
            "noise_index": list(t.noise_index), "text": t.text}  # fmt: skip


def tiny_lm() -> cfjax.LM:
    c = cfjax.preset("tiny")
    return cfjax.LM(c, model.init_params(c, jax.random.key(0), scale=4.0), model_id="tiny")


def tiny_runs() -> dict:
    lm = tiny_lm()
    out = {}
    for name, s in SAMPLERS.items():
        rows = cfjax.generate(lm, PROMPTS, key=4, sampler=s, max_new_tokens=20, stop_tokens=STOP)
        out[f"generate/{name}"] = [record(t) for t in rows]
    fact = cfjax.generate(lm, PROMPTS[0], key=3, sampler=cfjax.Sampler(0.8), max_new_tokens=24)
    out["factual"] = record(fact)
    other = jax.tree_util.tree_map(lambda x: x * 1.2 if x.dtype == jnp.float32 else x, lm.params)
    vector = jax.random.normal(jax.random.key(8), (lm.config.dim,)) * 2.0
    kinds = {
        "replace": cfjax.ReplaceTokens(5, (9,)),
        "insert": cfjax.ReplaceTokens(5, (9, 10), count=0),
        "delete": cfjax.ReplaceTokens(5, (), count=2),
        "prompt": cfjax.EditPrompt(tokens=(3, 17, 98, 5)),
        "sampler": cfjax.ChangeSampler(temperature=0.3),
        "topk": cfjax.ChangeSampler(top_k=5),
        "model": cfjax.ChangeModel(other),
        "steer": cfjax.Steer(0, vector, 4.0),
        "auto": cfjax.AutoIntervention(4, top_p=1.0),
        "two": [cfjax.ReplaceTokens(2, (9,)), cfjax.ReplaceTokens(8, (1,))],
        "null": cfjax.ReplaceTokens(6, (fact.tokens[6],)),
    }
    for name, iv in kinds.items():
        out[f"cf/{name}"] = record(cfjax.counterfactual(lm, fact, iv))
    out["cf/resume_at"] = record(
        cfjax.counterfactual(lm, fact, cfjax.ReplaceTokens(5, (9,)), resume_at=3)
    )
    out["cf/no_reuse"] = record(cfjax.counterfactual(lm, fact, cfjax.ReplaceTokens(9, (2,)), reuse_cache=False))  # fmt: skip
    out["cf/capped"] = record(cfjax.counterfactual(lm, fact, cfjax.ReplaceTokens(9, (2,)), max_new_tokens=12))  # fmt: skip
    batch = [
        cfjax.ReplaceTokens(i, ((fact.tokens[i] + 1) % lm.config.vocab_size,)) for i in range(16)
    ]
    out["cf/batch16"] = [record(t) for t in cfjax.counterfactuals(lm, fact, batch)]
    out["interventionals"] = [
        record(t)
        for t in cfjax.interventionals(lm, [fact] * 3, [cfjax.ReplaceTokens(5, (9,))] * 3, keys=6)
    ]
    for name, s in (("t1", cfjax.Sampler(1.0)), ("t0.7-topp", cfjax.Sampler(0.7, top_p=0.9))):
        abducted = cfjax.abduct(lm, PROMPTS[0], fact.tokens[:12], key=5, sampler=s, num_samples=3,
                                full_support=True, max_new_tokens=20)  # fmt: skip
        out[f"abduct/{name}"] = [record(t) for t in abducted]
        cfs = cfjax.counterfactuals(lm, abducted, [cfjax.ReplaceTokens(3, (9,))] * 3)
        out[f"abduct/{name}/cf"] = [record(t) for t in cfs]
    twin = lm.replace(params=other, model_id="tiny2")
    for name, models in (("stacked", [lm, twin]), ("int8", [lm, cfjax.quantize(lm, "int8")])):
        res = cfjax.coupled(
            models, PROMPTS[:2], key=2, sampler=cfjax.Sampler(0.9), max_new_tokens=16
        )
        out[f"coupled/{name}"] = [[record(t) for t in rows] for rows in res]
    out["sample/jit_vmap"] = _sample_jit_vmap(lm)
    draft = cfjax.quantize(lm, "int8")
    spec = cfjax.generate(lm, PROMPTS, key=4, sampler=cfjax.Sampler(0.9), max_new_tokens=20,
                          stop_tokens=STOP, draft=draft)  # fmt: skip
    out["speculative/generate"] = [record(t) for t in spec]
    out["speculative/cf"] = record(
        cfjax.counterfactual(lm, fact, cfjax.ReplaceTokens(5, (9,)), draft=draft)
    )
    wide = cfjax.generate(
        lm, [[5, 6, 7 + b] for b in range(16)], key=7, max_new_tokens=40, chunk=16
    )
    out["wide16"] = [record(t) for t in wide]
    out["wide16/cf"] = [record(t) for t in cfjax.counterfactuals(lm, wide, [cfjax.ReplaceTokens(20, (4,))] * 16)]  # fmt: skip
    bf = cfjax.quantize(lm, "bfloat16")
    bfact = cfjax.generate(bf, PROMPTS, key=4, sampler=cfjax.Sampler(0.8), max_new_tokens=20)
    out["bfloat16"] = [record(t) for t in bfact]
    out["bfloat16/cf"] = record(cfjax.counterfactual(bf, bfact[0], cfjax.ReplaceTokens(3, (9,))))
    return out


def _sample_jit_vmap(lm) -> dict:
    prompt = np.zeros((32,), np.int32)
    prompt[:7] = PROMPTS[0]
    keys = jax.random.split(jax.random.key(1), 4)

    @jax.jit
    def f(keys, temps):
        one = lambda k, t: cfjax.core.sample(lm.config, lm.params, prompt, 7, k, cfjax.Sampler(t),  # noqa: E731
                                             max_new_tokens=24, stop_tokens=STOP)  # fmt: skip
        return jax.vmap(one)(keys, temps)

    got = f(keys, jnp.asarray([0.0, 0.5, 1.0, 1.5]))
    return {"tokens": np.asarray(got.tokens).tolist(), "length": np.asarray(got.length).tolist(),
            "logprobs": np.asarray(got.logprobs).astype(float).tolist()}  # fmt: skip


def smollm2_runs() -> dict:
    lm = cfjax.load("smollm2-135m-instruct")
    out = {}
    prompts = ["Tell me a story about a captain named Ahab.", "Name a fruit."]
    for name in ("greedy", "t0.7", "topp"):
        rows = cfjax.generate(lm, prompts, key=9, sampler=SAMPLERS[name], max_new_tokens=16)
        out[f"generate/{name}"] = [record(t) for t in rows]
    fact = cfjax.generate(lm, prompts[0], key=9, sampler=cfjax.Sampler(0.7), max_new_tokens=24)
    words = fact.text.split()
    kinds = {
        "replace_text": cfjax.ReplaceText("Ahab", "Maeve"),
        "insert_text": cfjax.InsertText(" indeed", words[1]),
        "delete_text": cfjax.DeleteText(words[3]),
        "prompt": cfjax.EditPrompt(prompt="Tell me a story about a captain named Maeve."),
        "system": cfjax.EditPrompt(system="You are a pirate."),
        "sampler": cfjax.ChangeSampler(temperature=0.3),
    }
    for name, iv in kinds.items():
        out[f"cf/{name}"] = record(cfjax.counterfactual(lm, fact, iv))
    abducted = cfjax.abduct(lm, prompts[1], "An apple.", key=3, sampler=cfjax.Sampler(1.0),
                            num_samples=2, max_new_tokens=16)  # fmt: skip
    out["abduct"] = [record(t) for t in abducted]
    out["abduct/cf"] = [record(t) for t in cfjax.counterfactuals(lm, abducted, [cfjax.ReplaceText("apple", "orange")] * 2)]  # fmt: skip
    return out


def main(path: str) -> None:
    golden = {"tiny": tiny_runs(), "smollm2": smollm2_runs()}
    try:
        with open(path) as f:
            golden["sharded"] = json.load(f).get("sharded")
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        json.dump(golden, f, separators=(",", ":"))


if __name__ == "__main__":
    main(sys.argv[1])
