"""Sharded runs on 8 fake CPU devices, against the same runs on one device (issues 18 and 30).

Data-parallel meshes give one device's bits; model-parallel ones do with `model_blocks=8`
(`check_model_blocks`), and agree up to rounding without (recorded).

Run by tests/test_sharding.py in a child process (the device count is fixed when jax starts):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_checks.py OUT.json
Every check asserts; OUT.json records what was measured (logit differences, token flips).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

import cfjax
from cfjax import sharding
from cfjax.causal import ReplaceTokens
from cfjax.core import spec

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_llama  # noqa: E402
from golden_runs import record  # noqa: E402

# Eight heads and eight KV heads, so that (1, 8), (2, 4) and (8, 1) meshes all split them.
HF = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
          num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
PROMPTS = [[1, 5 + b, 17, 33, 64, 9 + 3 * b] for b in range(8)]


def expected_partition(config, path, leaf):
    """The rule table's PartitionSpec of a params leaf (an independent transcription)."""
    name = "/".join(map(str, path))
    columns = ("qkv/kernel", "gate_up/kernel", "lm_head/kernel")
    if config.model_blocks > 1 and name.endswith(columns):  # split by whole blocks of rows
        return jax.sharding.PartitionSpec("model", None)
    if name.endswith("qkv/kernel") or name.endswith("gate_up/kernel"):
        return jax.sharding.PartitionSpec(None, "model")
    if name.endswith("o/kernel") or name.endswith("down/kernel"):
        return jax.sharding.PartitionSpec("model", None)
    if name == "embed/embedding":
        return jax.sharding.PartitionSpec("model", None)
    if name == "lm_head/kernel":
        return jax.sharding.PartitionSpec(None, "model")
    return jax.sharding.PartitionSpec(None)


def check_placement(lm, mesh, report):
    for kp, x in jax.tree_util.tree_flatten_with_path(lm.params)[0]:
        path = tuple(k.key for k in kp)
        want = expected_partition(lm.config, path, x)
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim), (
            path,
            x.sharding,
            want,
        )
        # No device holds a whole copy of a split leaf: each shard is its share.
        sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
        for shard in x.addressable_shards:
            want_shape = tuple(
                n // (sizes[a] if a else 1)
                for n, a in zip(x.shape, tuple(want) + (None,) * x.ndim, strict=False)  # fmt: skip
            )
            assert shard.data.shape == want_shape, (path, shard.data.shape, want_shape)
    report.setdefault("placement_checked", []).append(dict(sizes))


def check_cache(lm, trace, mesh, batch):
    hit = lm.caches.get(lm.params, trace.prompt_tokens, trace.tokens)
    assert hit is not None, "the sharded run stored no cache"
    data = mesh.shape["data"]
    rows = "data" if data > 1 and batch % data == 0 else None
    want = NamedSharding(mesh, jax.sharding.PartitionSpec(rows, "model", None, None))
    for x in hit.stored.cache.k + hit.stored.cache.v:
        assert x.sharding.is_equivalent_to(want, 4), (x.sharding, want)


def first_flip(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def lp_diff(traces, refs) -> float:
    """The largest log-prob difference of rows with the same tokens (inf if tokens differ)."""
    if [t.tokens for t in traces] != [t.tokens for t in refs]:
        return float("inf")

    def diff(a, b):  # equal entries (infinite ones included) differ by 0
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf where both are -inf: equal, 0 below
            return float(np.where(a == b, 0.0, np.abs(a - b)).max(initial=0.0))

    return max(diff(a.logprobs, b.logprobs) for a, b in zip(traces, refs, strict=True))


def vmapped_sample(config, params, sampler) -> tuple:
    """`jit(vmap(core.sample))` over the 8 prompts: (tokens, log-probs)."""
    prompt = jnp.zeros((8, 16), jnp.int32).at[:, :6].set(jnp.asarray(PROMPTS))
    run = lambda p, k: cfjax.core.sample(config, params, p, 6, k, sampler, max_new_tokens=16)  # noqa: E731  # fmt: skip
    out = jax.jit(jax.vmap(run))(prompt, jax.random.split(jax.random.key(8), 8))
    return np.asarray(out.tokens), np.asarray(out.logprobs)


def check_bfloat16(path, iv, report) -> None:
    """bfloat16: a data-parallel mesh gives one device's bits (each device tiles its own rows
    as one device tiles them); model-parallel meshes sum a contraction split over devices in
    another order (recorded: log-prob differences, rows whose tokens differ)."""
    one = cfjax.load(path, dtype="bfloat16")
    run = lambda lm: cfjax.generate(lm, PROMPTS, key=3, sampler=cfjax.Sampler(0.9), max_new_tokens=24, stop_tokens=())  # noqa: E731  # fmt: skip
    ref = run(one)
    ref_cfs = cfjax.counterfactuals(one, ref, iv)
    ref_sampled = vmapped_sample(one.config, one.params, cfjax.Sampler(0.9))
    for data, model in ((8, 1), (2, 4), (1, 8)):
        lm = cfjax.load(path, mesh=sharding.mesh(data=data, model=model), dtype="bfloat16")
        got = run(lm)
        cfs = cfjax.counterfactuals(lm, got, iv)
        report[f"bfloat16_{data}x{model}"] = {
            "logprob_max_diff": max(lp_diff([a], [b]) for a, b in zip(got, ref, strict=True)),
            "rows_with_other_tokens": sum(
                a.tokens != b.tokens for a, b in zip(got, ref, strict=True)
            ),  # fmt: skip
        }
        if model == 1:  # also a user's own jit(vmap(core.sample)) under jax.set_mesh
            with jax.set_mesh(spec.mesh_of(lm.params)):
                sampled = vmapped_sample(one.config, lm.params, cfjax.Sampler(0.9))
            assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(sampled, ref_sampled, strict=True))  # fmt: skip
            for a, b in zip(got + cfs, ref + ref_cfs, strict=True):
                assert a.tokens == b.tokens, (data, model)
                assert np.asarray(a.logprobs).tobytes() == np.asarray(b.logprobs).tobytes(), (data, model)  # fmt: skip


def check_model_blocks(path, tied_path, iv, report) -> None:
    """`model_blocks=8`: on (2, 4) and (1, 8) meshes `generate`, `counterfactuals` and a user's
    `jit(vmap(core.sample))` give one device's bits, in float32 and bfloat16, with a head of its
    own and a tied one (blocks of the vocabulary)."""
    sampler = cfjax.Sampler(0.9)
    run = lambda lm: cfjax.generate(lm, PROMPTS, key=3, sampler=sampler, max_new_tokens=24, stop_tokens=())  # noqa: E731  # fmt: skip
    for dtype, source in (("float32", path), ("bfloat16", path), ("bfloat16", tied_path)):
        one = cfjax.load(source, dtype=dtype, model_blocks=8)
        ref = run(one)
        refs = ref + cfjax.counterfactuals(one, ref, iv)
        ref_sampled = vmapped_sample(one.config, one.params, sampler)
        for data, model in ((2, 4), (1, 8)):
            mesh = sharding.mesh(data=data, model=model)
            lm = cfjax.load(source, dtype=dtype, mesh=mesh, model_blocks=8)
            check_placement(lm, mesh, report)
            got = run(lm)
            got = got + cfjax.counterfactuals(lm, got, iv)
            with jax.set_mesh(mesh):
                sampled = vmapped_sample(one.config, lm.params, sampler)
            name = f"model_blocks_{dtype}{'_tied' if source == tied_path else ''}_{data}x{model}"
            report[name] = lp_diff(got, refs)
            for a, b in zip(got, refs, strict=True):
                assert a.tokens == b.tokens, name
                assert np.asarray(a.logprobs).tobytes() == np.asarray(b.logprobs).tobytes(), name
            assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(sampled, ref_sampled, strict=True)), name  # fmt: skip
    # Blocks on params placed for no blocks would split them otherwise than the rules: refused.
    try:
        cfjax.load(path, mesh=sharding.mesh(data=2, model=4)).replace(model_blocks=8)
        raise AssertionError("model_blocks on params placed for columns")
    except ValueError as e:
        assert "cfjax.load(..., mesh=mesh, model_blocks=n)" in str(e), e


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_llama(Path(tmp) / "hf", init_std=0.3, **HF)
        one = cfjax.load(Path(tmp) / "hf")  # one device
        sampler = cfjax.Sampler(0.9, top_k=50)
        ref = cfjax.generate(one, PROMPTS, key=3, sampler=sampler, max_new_tokens=24, stop_tokens=())  # fmt: skip
        iv = [ReplaceTokens(4, [7]), ReplaceTokens(10, [99])] * 4
        ref_cfs = cfjax.counterfactuals(one, ref, iv)
        ref_cf = cfjax.counterfactual(one, ref[0], ReplaceTokens(6, [3]))
        tokens = np.random.default_rng(0).integers(0, 256, size=(2, 48))
        ref_logits = np.asarray(cfjax.forward(one, tokens))

        def sample(params):
            return vmapped_sample(one.config, params, sampler)[0]

        ref_sample = sample(one.params)
        two = one.replace(
            params=jax.tree_util.tree_map(lambda x: x * 0.9, one.params), model_id="b"
        )
        ref_coupled = cfjax.coupled([one, two], PROMPTS[:4], key=2, sampler=sampler, max_new_tokens=12, stop_tokens=())  # fmt: skip
        observed = ref[1].tokens[:12]
        ref_abducted = cfjax.abduct(
            one, PROMPTS[1], observed, key=4, sampler=sampler, num_samples=4
        )
        ref_abducted_cf = cfjax.counterfactuals(one, ref_abducted, [ReplaceTokens(3, [11])] * 4)
        long_ref = cfjax.generate(one, PROMPTS[:2], key=5, sampler=cfjax.Sampler(1.0), max_new_tokens=200, stop_tokens=())  # fmt: skip
        cfjax.save(one, Path(tmp) / "converted")

        for data, model in ((8, 1), (2, 4), (1, 8)):
            mesh = sharding.mesh(data=data, model=model)
            # Read onto the shards: from the HF safetensors stream and from the orbax copy.
            lm = cfjax.load(Path(tmp) / "hf", mesh=mesh)
            check_placement(lm, mesh, report)
            check_placement(cfjax.load(Path(tmp) / "converted", mesh=mesh), mesh, report)
            diff = float(np.abs(np.asarray(cfjax.forward(lm, tokens)) - ref_logits).max())
            report[f"logits_max_diff_{data}x{model}"] = diff
            report["logits_max_abs"] = float(np.abs(ref_logits).max())
            assert diff <= 1e-5 * max(1.0, report["logits_max_abs"]), diff
            got = cfjax.generate(lm, PROMPTS, key=3, sampler=sampler, max_new_tokens=24, stop_tokens=())  # fmt: skip
            check_cache(lm, got[0], mesh, len(PROMPTS))
            cfs = cfjax.counterfactuals(lm, got, iv)
            cf = cfjax.counterfactual(lm, got[0], ReplaceTokens(6, [3]))
            long = cfjax.generate(lm, PROMPTS[:2], key=5, sampler=cfjax.Sampler(1.0), max_new_tokens=200, stop_tokens=())  # fmt: skip
            sampled = sample(lm.params)
            lm_b = lm.replace(
                params=sharding.shard_params(lm.config, two.params, mesh), model_id="b"
            )
            pair = cfjax.coupled([lm, lm_b], PROMPTS[:4], key=2, sampler=sampler, max_new_tokens=12, stop_tokens=())  # fmt: skip
            abducted = cfjax.abduct(lm, PROMPTS[1], observed, key=4, sampler=sampler, num_samples=4)
            abducted_cf = cfjax.counterfactuals(lm, abducted, [ReplaceTokens(3, [11])] * 4)
            flips = [first_flip(a.tokens, b.tokens) for a, b in zip(long, long_ref, strict=True)]
            report[f"flips_200_tokens_{data}x{model}"] = flips
            same = {
                "generate": [t.tokens for t in got] == [t.tokens for t in ref],
                "counterfactuals": [t.tokens for t in cfs] == [t.tokens for t in ref_cfs],
                "counterfactual": cf.tokens == ref_cf.tokens,
                "core.sample": bool((sampled == ref_sample).all()),
                "coupled": [[t.tokens for t in r] for r in pair]
                == [[t.tokens for t in r] for r in ref_coupled],  # fmt: skip
                "abduct": [t.tokens for t in abducted_cf] == [t.tokens for t in ref_abducted_cf],
                "200 tokens": all(f is None for f in flips),
            }
            report[f"same_{data}x{model}"] = same
            pairs = {"generate": (got, ref), "counterfactuals": (cfs, ref_cfs),
                     "abduct": (abducted_cf, ref_abducted_cf), "coupled": (sum(pair, []), sum(ref_coupled, []))}  # fmt: skip
            report[f"logprob_max_diff_{data}x{model}"] = {k: lp_diff(*v) for k, v in pairs.items()}
            # On any one mesh a row is batch-invariant: alone, it is its row of the batch.
            alone = cfjax.generate(lm, PROMPTS[5], key=got[5].key, sampler=sampler, max_new_tokens=24, stop_tokens=())  # fmt: skip
            assert alone.tokens == got[5].tokens, (data, model)
            assert np.asarray(alone.logprobs).tobytes() == np.asarray(got[5].logprobs).tobytes(), (data, model)  # fmt: skip
            if model == 1:  # data parallel: each device tiles its own rows, bit for bit
                assert all(v == 0.0 for v in report[f"logprob_max_diff_{data}x{model}"].values()), report  # fmt: skip
            if (data, model) == (2, 4):  # the sharded golden run (tests/golden_runs.py)
                report["golden"] = {
                    "generate": [record(t) for t in got],
                    "counterfactuals": [record(t) for t in cfs],
                    "abduct_cf": [record(t) for t in abducted_cf],
                }
            assert all(same.values()), (data, model, same, flips)
        check_bfloat16(Path(tmp) / "hf", iv, report)
        hf_llama(Path(tmp) / "tied", init_std=0.3, **{**HF, "tie_word_embeddings": True})
        check_model_blocks(Path(tmp) / "hf", Path(tmp) / "tied", iv, report)
        # Bad input: a model axis that does not divide the KV heads, an unknown axis.
        tiny = cfjax.LM(cfjax.preset("tiny"), cfjax.core.model.init_params(cfjax.preset("tiny"), jax.random.key(0)))  # fmt: skip
        try:
            sharding.shard_params(tiny.config, tiny.params, sharding.mesh(data=2, model=4))
            raise AssertionError("a model axis of 4 split 2 KV heads")
        except ValueError as e:
            assert "model axis (4) does not divide the 2 KV heads" in str(e), e
            report["kv_error"] = str(e)
        assert spec.RULES["kv_heads"] == "model"
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
