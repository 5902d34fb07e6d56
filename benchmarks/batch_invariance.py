"""Where a row's results depend on its batch (issue 30): classes of batch sizes that agree.

For each op of a decode step at SmolLM2's shapes (the dense layers, RMSNorm's row reduction, the
decode attention, the log-softmax over the vocabulary), and for `generate` on the whole model,
row 0 is computed in batches of M rows (the other rows random or other prompts) and the batch
sizes whose row 0 is bit-identical are grouped: one group means the op is batch-invariant. Each
op is measured in XLA's plain form and in cfjax's (`cfjax.core.invariant`).

    python benchmarks/batch_invariance.py                 # float32 and bfloat16, SmolLM2
    python benchmarks/batch_invariance.py --config tiny --json   # smoke test
    python benchmarks/batch_invariance.py --row-sweep --json     # the CPU's tile limits

`--row-sweep` measures what `invariant.ROWS`, `WIDE_ROWS` and `HEAD_ROWS` rest on, on this
machine: for each weight matmul of a decode step, the row counts 1..256 of one untiled
`invariant.matmul` (a tile's dot) whose row 0 is bit-identical, as ranges. The limits hold where
2..ROWS (2..WIDE_ROWS for 1,024+ features, 2..HEAD_ROWS for the head) lie in one class.
`--transposed` sweeps the layer weights stored `[N, K]` and contracted on their second axis, as
the head is (a layout cfjax does not use: the thirty-sixth session's measurement, RESULTS.md).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from common import DEFAULT_MODEL, load_lm

SIZES = (1, 2, 3, 4, 8, 9, 16, 32, 64)
PROMPTS = ["Write one sentence about rain.", "Name a fruit.", "What is two plus two?", "Say hello.",
           "Describe a cat.", "Tell me a joke.", "Why is the sky blue?", "Count to five."]  # fmt: skip


def classes(fn, row: np.ndarray, rest, sizes=SIZES, operands=()) -> list[list[int]]:
    """Groups of batch sizes M whose row 0 of `fn(batch, *operands)` is bit-identical; `rest(M)`
    gives a batch whose row 0 is overwritten by `row`. (Weights go in `operands`: one closed
    over is a constant of every size's program, 113 MB each for SmolLM2's head.)"""
    f = jax.jit(fn)
    groups: dict[bytes, list[int]] = {}
    for m in sizes:
        x = rest(m)
        x[0] = row
        groups.setdefault(np.asarray(f(jnp.asarray(x), *operands))[0].tobytes(), []).append(m)
    return list(groups.values())


def ops(config, dtype) -> dict:
    """Per op of a decode step at `config`'s shapes: the classes of XLA's plain form and of
    cfjax's (`cfjax.core.invariant`, `attention.attention_tiles`)."""
    from cfjax.core import attention, invariant

    rng = np.random.default_rng(0)
    d, hd, kv, g = config.dim, config.head_dim, config.n_kv_heads, config.n_heads // config.n_kv_heads  # fmt: skip
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    out = {}
    shapes = {"qkv": (d, (config.n_heads + 2 * kv) * hd), "o": (config.n_heads * hd, d),
              "gate_up": (d, 2 * config.ffn_dim), "down": (config.ffn_dim, d),
              "head": (d, config.vocab_size)}  # fmt: skip
    both = lambda plain, ours, row, rest: {"xla": classes(plain, row, rest), "cfjax": classes(ours, row, rest)}  # noqa: E731  # fmt: skip
    for name, (k, n) in shapes.items():
        w = jnp.asarray(rand(k, n) * 0.05, dtype)
        out[f"dense {name} {k}x{n}"] = both(lambda x, w=w: x.astype(dtype) @ w, lambda x, w=w: invariant.dense(x.astype(dtype), w),
                                            rand(k), lambda m, k=k: rand(m, k))  # fmt: skip
    mean_square = lambda x: x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5)  # noqa: E731
    tree_square = lambda x: x * jax.lax.rsqrt(invariant.tree_sum(x * x)[:, None] / d + 1e-5)  # noqa: E731
    out[f"rmsnorm {d}"] = both(mean_square, tree_square, rand(d), lambda m: rand(m, d))
    out["log_softmax vocab"] = both(lambda x: jax.nn.log_softmax(x, -1), invariant.log_softmax,
                                    rand(config.vocab_size), lambda m: rand(m, config.vocab_size))  # fmt: skip
    s = 192  # cache slots
    keys, values = rand(kv, hd, s), rand(kv, s, hd)

    def plain(q):  # the previous decode attention: XLA's reductions and softmax
        scores = (q.reshape(-1, kv, g, hd)[..., None] * keys[None, :, None]).sum(-2)
        probs = jax.nn.softmax(scores, axis=-1)
        return (probs[..., None] * values[None, :, None]).sum(-2).reshape(q.shape[0], -1)

    def ours(q):
        q = q.reshape(-1, kv, g, 1, hd)
        b = q.shape[0]
        k, v = (jnp.broadcast_to(a, (b, *a.shape)) for a in (keys, values))
        return attention.attention_tiles(q, k, v, jnp.ones((1, 1, 1, 1, s), bool), np.float32(hd**-0.5)).reshape(b, -1)  # fmt: skip

    out[f"decode attention {s} slots"] = both(plain, ours, rand(kv * g * hd), lambda m: rand(m, kv * g * hd))  # fmt: skip
    return out


def ranges(sizes: list[int]) -> str:
    """`[1, 2, 3, 7]` as `"1-3, 7"`."""
    runs: list[list[int]] = []
    for m in sizes:
        if runs and m == runs[-1][1] + 1:
            runs[-1][1] = m
        else:
            runs.append([m, m])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def row_sweep(config, dtype, most: int = 256, transposed: bool = False) -> dict[str, list[str]]:
    """Per weight matmul of a decode step at `config`'s shapes (the head as a tied `[V, D]`
    weight), the classes of row counts 1..`most` of one `invariant.matmul` (a tile's dot);
    `transposed`: the layer weights stored `[N, K]` instead, contracted on their second axis
    (the head, already so, left out)."""
    from cfjax.core import invariant

    rng = np.random.default_rng(0)
    d, kv, hd = config.dim, config.n_kv_heads, config.head_dim
    shapes = {"qkv": (d, (config.n_heads + 2 * kv) * hd, 0), "o": (config.n_heads * hd, d, 0),
              "gate_up": (d, 2 * config.ffn_dim, 0), "down": (config.ffn_dim, d, 0),
              "head": (config.vocab_size, d, 1)}  # fmt: skip
    out = {}
    if transposed:
        shapes = {f"{name} [N, K]": (n, k, 1) for name, (k, n, c) in shapes.items() if c == 0}
    for name, (k, n, contract) in shapes.items():
        w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) * 0.05, dtype)
        features = k if contract == 0 else n
        row = rng.standard_normal(features).astype(np.float32)
        rest = lambda m, f=features: rng.standard_normal((m, f)).astype(np.float32)  # noqa: E731
        fn = lambda x, w, c=contract: invariant.matmul(x.astype(dtype), w, c)  # noqa: E731
        found = classes(fn, row, rest, range(1, most + 1), (w,))
        out[f"{name} {k}x{n}"] = [ranges(c) for c in found]
        jax.clear_caches()  # the op's 256 programs
    return out


def whole_model(lm) -> list[list[str]]:
    """Classes of `generate` batches whose row 0 (the same prompt and key) is bit-identical."""
    import cfjax

    keys = jax.random.split(jax.random.key(9), 64)
    others = ["Name a colour.", "Say goodbye.", "What is three?", "Describe a dog.",
              "A poem, please.", "Name a city.", "Why is grass green?", "Count to three."] * 8  # fmt: skip
    chat = lm.tokenizer is not None
    prompts = PROMPTS if chat else [[1 + i, 5, 9, 17] for i in range(8)]
    others = others if chat else [[40 + i % 50, 7, 3] for i in range(64)]
    runs = {f"B{m}": [prompts[0]] + others[: m - 1] for m in SIZES}
    runs["B8 other prompts"] = prompts
    groups: dict[tuple, list[str]] = {}
    for name, batch in runs.items():
        out = cfjax.generate(lm, batch, key=keys[: len(batch)], sampler=cfjax.Sampler(0.8), max_new_tokens=20)  # fmt: skip
        row = out[0]
        groups.setdefault((tuple(row.tokens), tuple(row.logprobs)), []).append(name)
    return list(groups.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (%(default)s)")
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    ap.add_argument("--row-sweep", action="store_true", help="the tile limits' measurement only")
    ap.add_argument("--rows", type=int, default=256, help="--row-sweep's most rows (%(default)s)")
    ap.add_argument("--transposed", action="store_true", help="--row-sweep: layer weights [N, K]")
    args = ap.parse_args()
    result = {"jax": jax.__version__, "backend": jax.default_backend(), "by_dtype": {}}
    config = load_lm(args.model, args.config)[0].config if args.row_sweep else None
    for name in args.dtypes:
        import cfjax

        if args.row_sweep:
            sweep = row_sweep(config, jnp.dtype(name), args.rows, args.transposed)
            result["by_dtype"][name] = {"row_sweep": sweep}
            if not args.json:
                for op, found in sweep.items():
                    print(f"{name:9s} {op:16s} {' | '.join(found)}")
            continue
        lm = cfjax.quantize(load_lm(args.model, args.config)[0], "bfloat16") if name == "bfloat16" else load_lm(args.model, args.config)[0]  # fmt: skip
        result["by_dtype"][name] = {
            "ops": ops(lm.config, jnp.dtype(name)),
            "generate": whole_model(lm),
        }
        if not args.json:
            for op, forms in result["by_dtype"][name]["ops"].items():
                print(f"{name:9s} {op:28s} xla {forms['xla']}  cfjax {forms['cfjax']}")
            print(f"{name:9s} {'generate (row 0)':28s} {result['by_dtype'][name]['generate']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
