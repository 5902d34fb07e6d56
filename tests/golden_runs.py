"""Golden runs: every route through the engine on fixed inputs, recorded token for token.

Recorded first before the engine became one decode kernel (issue 29), in `tests/data/golden.json`;
`tests/test_golden.py` runs them again and asserts every token, log-prob and noise index
bit-identical to the record of this machine's numerics.

XLA:CPU's float32 kernels round differently on other CPUs (an AMD EPYC Zen 4 against the Intel
Xeon of the first records: every token, noise index and text the same, float32 log-probs moved by
up to 3.2e-4; bfloat16 runs bit for bit), so the file holds one record per machine class, each
with `numerics_probe()`, a fingerprint of XLA's arithmetic on the machine that recorded it. A
machine whose probe has a record is held to it bit for bit; one without (another CPU, another jax)
to the same tokens, noise indices and texts and log-probs within `CROSS_MACHINE_LOGPROB`.

To record after an intended change of results (never to make a test pass), on one machine,
dropping the other machines' records (now stale), the sharded run taken from a report of
`tests/sharded_checks.py` (8 fake devices):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python tests/sharded_checks.py r.json
    .venv/bin/python tests/golden_runs.py tests/data/golden.json --machine "..." --sharded r.json
and with `--add`, another machine's record of unchanged code beside the others. The file also
holds the `cfjax.causal.environment.NUMERICS` its records were made under, which every trace's
`made_on` carries: re-recording changed results needs a new value of it (`updated` refuses
otherwise), so that traces made before the change warn when they are replayed after it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import cfjax
from cfjax.causal import environment
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


# Float32 log-probs of one route on two CPUs: 3.2e-4 apart at most (the tiny model's scaled
# weights, `cf/model`); more apart is a change of results, not of machine.
CROSS_MACHINE_LOGPROB = 2e-3


def numerics_probe() -> str:
    """A fingerprint of XLA's arithmetic on this machine and jax: the bits of float32 and
    bfloat16 dots of the engine's shapes and of the elementwise functions it uses, with the jax
    and jaxlib versions. Independent of cfjax's code, so that a change of results on a machine
    with a record is caught as one."""
    import jaxlib

    rng = np.random.default_rng(0)
    digest = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__}".encode())
    add = lambda x: digest.update(np.asarray(x).tobytes())  # noqa: E731
    f32_dot = jax.jit(jnp.dot)
    bf16_dot = jax.jit(lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                            preferred_element_type=jnp.float32))  # fmt: skip
    for m, k, n in [(1, 64, 128), (2, 64, 128), (16, 128, 64), (64, 64, 256), (1, 576, 960),
                    (2, 576, 960), (32, 1536, 576), (64, 576, 3072)]:  # fmt: skip
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        add(f32_dot(a, b))
        add(bf16_dot(a, b))
    x = rng.standard_normal((64, 64), np.float32)
    for f in (jnp.exp, lambda v: jnp.log(jnp.abs(v) + 1e-3), lambda v: jax.lax.rsqrt(jnp.abs(v) + 1e-3),
              lambda v: jnp.sin(v * 40), jnp.tanh, lambda v: jax.nn.log_softmax(v, -1),
              lambda v: jnp.sum(v, -1), lambda v: v / (v.T + 3.0)):  # fmt: skip
        add(jax.jit(f)(x))
    return digest.hexdigest()[:16]


def golden_file() -> dict:
    """`{"numerics", "records"}`: the cfjax numerics the records were made under, and the recorded
    machines, each `{"machine", "probe", "tiny", "smollm2", "sharded"}`."""
    return json.loads((Path(__file__).parent / "data" / "golden.json").read_text())


def records() -> list[dict]:
    """The recorded machines (see `golden_file`)."""
    return golden_file()["records"]


def differences(want, got, where="", close=False) -> list[str]:
    """The paths where two JSON values differ (at most one per run); with `close`, log-prob
    lists differ only where they are more than `CROSS_MACHINE_LOGPROB` apart."""
    if isinstance(want, dict) and isinstance(got, dict):
        keys = sorted(set(want) | set(got))
        return [d for k in keys for d in differences(want.get(k), got.get(k), f"{where}/{k}", close)]  # fmt: skip
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        if want != got and all(isinstance(x, (dict, list)) for x in want):
            return [d for i, (a, b) in enumerate(zip(want, got, strict=True)) for d in differences(a, b, f"{where}[{i}]", close)]  # fmt: skip
        if close and "logprobs" in where and want != got:
            a, b = np.asarray(want, np.float64), np.asarray(got, np.float64)
            same = a == b  # -inf (a forced token) on both included
            gap = np.max(np.abs(a[~same] - b[~same]), initial=0.0)
            return [] if gap <= CROSS_MACHINE_LOGPROB else [f"{where}: log-probs {gap:.2e} apart"]
    return [] if want == got else [f"{where}: {str(want)[:120]} != {str(got)[:120]}"]


def check(part: str, runs) -> str | None:
    """Assert `runs` (the `part` of a record: "tiny", "smollm2", "sharded") against the records:
    bit for bit against one of them, or, on a machine without a record, tokens and texts exact
    and log-probs close to the newest. Returns a note for a machine without a record."""
    known = records()
    if any(r[part] == runs for r in known):
        return None
    probe = numerics_probe()
    own = [r for r in known if r["probe"] == probe]
    if own:
        found = differences(own[0][part], runs)
        raise AssertionError(f"{part} differs from this machine's record ({own[0]['machine']}): {found[:10]}")  # fmt: skip
    found = differences(known[0][part], runs, close=True)
    assert not found, f"{part}: a machine without a record (probe {probe}) {found[:10]}"
    return (f"{part}: no record of this machine's numerics (probe {probe}); tokens and texts as "
            f"recorded on {known[0]['machine']}, log-probs within {CROSS_MACHINE_LOGPROB}")  # fmt: skip


def updated(stored: dict, mine: dict, add: bool, numerics: str) -> dict:
    """The golden file after recording `mine` (this machine's record) into `stored` under cfjax's
    `numerics`: alone, or (`add`) beside the other machines' records of unchanged code. A
    SystemExit naming the fix where the records would no longer say which arithmetic made them:
    changed results under an unchanged `numerics`, or `add` across a change of it."""
    known = stored.get("records", [])
    own = next((r for r in known if r["probe"] == mine["probe"]), None)
    changed = own is None or any(own[k] != mine[k] for k in ("tiny", "smollm2", "sharded"))
    if add and stored.get("numerics", numerics) != numerics:
        raise SystemExit(f"golden: the records are of cfjax numerics {stored.get('numerics')!r}, "
                         f"the code's is {numerics!r}: record this machine alone, without --add")  # fmt: skip
    if add and own is not None and changed:
        raise SystemExit("golden: this machine's results changed; bump cfjax.causal.environment."
                         "NUMERICS and record it alone, without --add")  # fmt: skip
    if not add and known and stored.get("numerics") == numerics and changed:
        raise SystemExit(f"golden: the results changed under cfjax numerics {numerics!r}; bump "
                         "cfjax.causal.environment.NUMERICS first (traces made before warn then)")  # fmt: skip
    kept = [r for r in known if r is not own] if add else []
    return {"numerics": numerics, "records": [mine, *kept]}


def main() -> None:
    """Record this machine's runs: alone, or (`--add`) beside the records of other machines."""
    import argparse

    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("path", type=Path, help="tests/data/golden.json")
    cli.add_argument("--machine", required=True, help='what recorded it, e.g. "AMD EPYC Zen 4"')
    cli.add_argument("--add", action="store_true", help="keep the other machines' records")
    cli.add_argument("--sharded", type=Path, help="a report of sharded_checks.py: its golden run")
    args = cli.parse_args()
    stored = json.loads(args.path.read_text()) if args.path.exists() else {}
    probe = numerics_probe()
    sharded = next((r["sharded"] for r in stored.get("records", []) if r["probe"] == probe), None)
    if args.sharded:
        sharded = json.loads(args.sharded.read_text())["golden"]
    mine = {"machine": args.machine, "probe": probe, "tiny": tiny_runs(),
            "smollm2": smollm2_runs(), "sharded": sharded}  # fmt: skip
    file = updated(stored, mine, args.add, environment.NUMERICS)
    args.path.write_text(json.dumps(file, separators=(",", ":")))


if __name__ == "__main__":
    main()
