"""Batch-invariant arithmetic: sums and matmuls whose result for a row does not depend on the
batch it is computed in (DESIGN.md §3, issue 30).

XLA may order a reduction however it likes, and picks it by shape: a row's RMSNorm statistic,
its attention sums and its matmuls came out rounded differently in a batch of 1, 3, 8 or 64
rows, and by a cache of 192 or 256 slots. Here every reduction the decode kernel needs is
spelled out so that the order of its additions is fixed by construction:

- `tree_sum` adds halves elementwise. Elementwise adds are never reassociated by XLA, on any
  backend, so the order is the one written here; `tree_max`, `softmax` and `log_softmax` build
  on it, and keep XLA:CPU from moving a reduction and its `exp` into a fusion whose `exp`
  rounds otherwise (see `tree_max`).
- `slot_sum` sums over cache slots in blocks of `BLOCK` (a tree within a block, blocks in slot
  order). The prefill computes prompts from slot 0, and the decode has them left-padded into
  buckets that are multiples of `BLOCK` (kernel.MIN_BUCKET), so a row's tokens sit at the same
  offset within their blocks whatever the batch, and the masked slots add exact zeros.
- `dense` feeds a matmul tiles of rows: of one fixed shape on accelerators and in the CPU's
  prefill (`fixed_rows`), and in the CPU's decode step of row counts measured not to change a
  row's rounding (see `tiles`); under `vmap` it folds the mapped axis into the rows
  (`custom_vmap`), so `core.sample` under `vmap` tiles the same way. `row_tiles` gives other
  dots the same tiles (the CPU attention's).
- With `config.model_blocks = n > 1`, `dense` cuts each weight into n fixed blocks along the
  axis a model-parallel mesh splits (the contraction, or a tied head's vocabulary) and runs
  one dot per block (`blocked_matmul`): a device holding n / model of the blocks runs the same
  dots as one device does, so a model-parallel mesh gives one device's bits.

A model whose config says `batch_invariant=False` traces its network under
`batch_invariance(False)`: every helper here is then XLA's own op (a reduce, one matmul, no
rounding barrier), faster, with a row's rounding free to depend on its batch again. The
sampler's sums (`scm`, `truncation`, `posterior`) stay invariant in both modes (cheap per row).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cfjax.core.trace_mode import mode, traced_under

BLOCK = 32  # cache slots per block of `slot_sum`; divides every prompt bucket
ROWS = 32  # most rows in one matmul tile on the CPU
# XLA:CPU rounds a row of a dot that contracts at least WIDE features alike for every row count
# in 2..WIDE_ROWS (float32 and bfloat16, 1024..14336 features): such a matmul, the SmolLM2 down
# projection, every Llama 8B weight, takes up to WIDE_ROWS rows in one tile. The Xeons and the
# Zen 4 measured kept one rounding to 256 rows; an AMD EPYC Zen 3 rounds otherwise from 61
# rows on (`benchmarks/batch_invariance.py --row-sweep`), so 60, the most every CPU measured
# shares. A dot against a weight's second axis (a tied head `[V, D]`) of any width (measured
# for D 64..960, V 64..49152, every CPU above) takes up to HEAD_ROWS: ~21% of a SmolLM2 step's
# FLOPs, one dot at batch 64, not two.
WIDE, WIDE_ROWS, HEAD_ROWS = 1024, 60, 256
# Rows of every matmul tile on GPU and TPU (weight reads dominate there), and the fewest of a
# tile in the CPU's prefill.
FIXED_ROWS = 64
# XLA:CPU rounds a row of a dot alike for every row count from 64 on (measured to 16,384 rows,
# 64..2,048 features, float32 and bfloat16, either weight layout): the CPU's prefill runs each
# weight matmul in tiles of 64 to PREFILL_ROWS rows, one dot for most prefills, 1.2x (128
# rows) to 1.6x (1,024) faster than 64-row tiles and the same bits.
PREFILL_ROWS = 4096
# Up to this many tiles are dots side by side in the program, which XLA:CPU runs concurrently
# (a SmolLM2 batch-64 step: 279 -> 245 ms against a loop); more run in a loop (`lax.map`), which
# keeps a long prefill's program small. Every tile is a dot of one shape either way: same bits.
UNROLLED_TILES = 4


def batch_invariance(enabled: bool, blocks: int = 1, prefill: bool = False):
    """Trace the helpers below in their batch-invariant forms (`True`, the default) or as XLA's
    own ops, with each weight matmul of `dense` in `blocks` fixed blocks (`blocked_matmul`);
    `prefill`: the program computes prompt tokens only (see `fixed_rows`). Set by `model.apply`
    from the static `config.batch_invariant` and `config.model_blocks`, so each mode is its own
    compiled program."""
    return traced_under(mode()._replace(invariant=bool(enabled), blocks=int(blocks), prefill=bool(prefill)))  # fmt: skip


def enabled() -> bool:
    """Whether programs traced now take the batch-invariant forms."""
    return mode().invariant


def forms_for(platform: str | None):
    """Trace the per-backend forms (`on_cpu`) of `platform` instead of the default backend's:
    to `jax.export` for accelerators from a CPU host, under a fresh `jax.jit` (a traced
    program is cached without this setting)."""
    return traced_under(mode()._replace(forms_for=platform))


def fixed_rows() -> int | None:
    """Rows of every matmul tile in the programs traced now: `FIXED_ROWS` on accelerators and in
    the CPU's prefill (its weight matmuls: `FIXED_ROWS` at least, see `PREFILL_ROWS`), None (2
    to `ROWS`, see `tiles`) in the CPU's decode step and speculative pass. A prefill row is only
    ever compared with prefill rows (the decode step feeds every token it chooses, DESIGN.md
    §2), and its many rows run ~2x faster in 64-row dots than in 32-row ones on XLA:CPU; the
    decode step at batch 1 would pay 32x the rows."""
    return None if on_cpu() and not mode().prefill else FIXED_ROWS


def on_cpu() -> bool:
    """Whether programs traced now take the CPU's forms (of the default backend unless
    `forms_for` says otherwise). Chosen while tracing, in Python: `lax.platform_dependent`
    traced every form of ~150 ops per forward and doubled the tracing time."""
    return (mode().forms_for or jax.default_backend()) == "cpu"


def _tree(x: jax.Array, axis: int, combine, neutral) -> jax.Array:
    """`x` folded over `axis` by `combine`, padded with `neutral` to a power of two and halved
    elementwise (element i with i + n/2, level after level: the order depends on the axis length
    alone). Three levels at a time are written as one expression over eighths of `x`: the same
    additions, with a third of the intermediate arrays of one level at a time."""
    axis = axis % x.ndim
    n = x.shape[axis]
    size = 1 << max(n - 1, 0).bit_length()
    if size != n:
        pad = [(0, 0, 0)] * x.ndim
        pad[axis] = (0, size - n, 0)
        x = jax.lax.pad(x, jnp.asarray(neutral, x.dtype), pad)
    while size > 1:
        parts = min(8, size)
        part = size // parts
        pieces = [
            jax.lax.slice_in_dim(x, i * part, (i + 1) * part, axis=axis) for i in range(parts)
        ]
        while len(pieces) > 1:  # the halving levels, in order: piece i with piece i + half
            half = len(pieces) // 2
            pieces = [combine(pieces[i], pieces[i + half]) for i in range(half)]
        x, size = pieces[0], part
    return jax.lax.index_in_dim(x, 0, axis, keepdims=False)


def rounded(x: jax.Array) -> jax.Array:
    """`x` (a product) rounded before anything adds to it. XLA:CPU contracts a product and the
    addition that consumes it into one fused multiply-add when the two share a fusion, which
    depends on the rest of the program (a batch's other samplers decided it for the tempered
    logits); a select between them (NaN stays NaN) keeps them apart in every program."""
    if not enabled():
        return x
    return jax.lax.select(jax.lax.ne(x, x), jax.lax.full_like(x, jnp.nan), x)


def tree_sum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Sum over `axis` in a fixed order: halves added elementwise (zeros padding the length to a
    power of two)."""
    if not enabled():
        return jnp.sum(x, axis)
    return _tree(x, axis, jax.lax.add, 0)


def tree_max(x: jax.Array, axis: int = -1) -> jax.Array:
    """Max over `axis` by elementwise halving. A max is exact in any order, but an XLA reduce
    lets XLA:CPU hand it, with the `exp` that follows, to an XNNPACK fusion from a size on,
    whose `exp` rounds differently (a row's softmax changed at 16 rows of 4 x 96 scores)."""
    if not enabled():
        return jnp.max(x, axis)
    low = jnp.iinfo(x.dtype).min if jnp.issubdtype(x.dtype, jnp.integer) else -jnp.inf
    return _tree(x, axis, jax.lax.max, low)


def tree_min(x: jax.Array, axis: int = -1) -> jax.Array:
    """Min over `axis` by elementwise halving (integers or floats)."""
    if not enabled():
        return jnp.min(x, axis)
    big = jnp.iinfo(x.dtype).max if jnp.issubdtype(x.dtype, jnp.integer) else jnp.inf
    return _tree(x, axis, jax.lax.min, big)


def log_softmax(x: jax.Array) -> jax.Array:
    """`jax.nn.log_softmax` over the last axis, from `tree_max` and `tree_sum`."""
    shifted = x - tree_max(x)[..., None]
    return shifted - jnp.log(tree_sum(jnp.exp(shifted)))[..., None]


def softmax(x: jax.Array) -> jax.Array:
    """`jax.nn.softmax` over the last axis, from `tree_max` and `tree_sum`."""
    e = jnp.exp(x - tree_max(x)[..., None])
    return e * (1 / tree_sum(e))[..., None]  # see attention._softmax_weighted


def slot_blocks(x: jax.Array, axis: int) -> jax.Array:
    """`x` with its slot `axis` padded with zeros to whole blocks and split as (blocks, BLOCK)."""
    axis = axis % x.ndim
    n = x.shape[axis]
    blocks = math.ceil(n / BLOCK)
    if blocks * BLOCK != n:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, blocks * BLOCK - n)
        x = jnp.pad(x, pad)
    return x.reshape(x.shape[:axis] + (blocks, BLOCK) + x.shape[axis + 1 :])


def in_order(x: jax.Array, axis: int) -> jax.Array:
    """Sum over `axis` strictly in index order (leading and trailing zeros change no bit)."""
    axis = axis % x.ndim
    n = x.shape[axis]
    item = lambda i: jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False)  # noqa: E731
    if n > 64:  # a loop, to keep the program small: the same additions
        return jax.lax.fori_loop(1, n, lambda i, t: t + item(i), item(0))
    total = item(0)
    for i in range(1, n):
        total = total + item(i)
    return total


def slot_sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum over the slot `axis`: a `tree_sum` within each block of `BLOCK` slots, then the
    blocks in slot order. Leading or trailing blocks of zeros, as other rows' longer prompts or
    a longer cache add, leave every bit of the sum as it was."""
    if not enabled():
        return jnp.sum(x, axis)
    axis = axis % x.ndim
    return in_order(tree_sum(slot_blocks(x, axis), axis + 1), axis)


def tiles(m: int, fixed: int | None = None, most: int = ROWS, least: int = 2) -> tuple[int, int]:
    """(tile count, rows per tile) for a matmul over `m` rows.

    `fixed=None` (the CPU): at least `least` and at most `most` rows per tile. XLA:CPU
    rounds a row identically for every row count in 2..32 (one XNNPACK kernel), but not at 1
    (a matrix-vector kernel) nor past 32 (another blocking), measured at SmolLM2's and the tiny
    config's shapes (`benchmarks/batch_invariance.py`); in 2..`WIDE_ROWS` where the dot
    contracts `WIDE` features or more, in 2..`HEAD_ROWS` against a weight's second axis.
    `fixed=n` (accelerators, the CPU's prefill): tiles of exactly n rows, so every matmul has
    one shape whatever the batch, and a GEMM of one shape computes every row alike (by
    construction; `gpu_check` counts flips)."""
    if fixed is not None:
        return math.ceil(m / fixed), fixed
    count = math.ceil(m / most)
    return count, max(least, math.ceil(m / count))


def f32_dot(dot, a: jax.Array, b: jax.Array) -> jax.Array:
    """`dot(a, b, preferred_element_type)` with a float32 result from operands of any float
    dtype. Accelerators multiply bfloat16 operands with float32 accumulation and output;
    XLA:CPU (jax 0.10) fails at run time on such mixed dots ("Unsupported element type for
    DotThunk: BF16 x BF16 = F32"), so there both operands are widened first: the same exact
    products and float32 sums, and what XLA:CPU does to its bfloat16 dots anyway."""
    f32 = jnp.float32
    if on_cpu() or (a.dtype == f32 and b.dtype == f32):
        return dot(a.astype(f32), b.astype(f32), None)
    return dot(a, b, f32)


def matmul(x: jax.Array, w: jax.Array, contract: int = 0, wide: bool = False) -> jax.Array:
    """`x [..., K]` against `w` contracted on its axis `contract`: in float32 (`f32_dot`), then
    rounded once to the dtype of `x` (`round_to`) unless `wide`. A dot in bfloat16 is this same
    float32 dot to XLA (its `change-op-data-type` pass), whose rounding of the result XLA may
    then drop where the next op widens it again (`xla_allow_excess_precision`), in some programs
    only: a batch's rows would round otherwise than the row alone."""
    dims = (((x.ndim - 1,), (contract,)), ((), ()))
    dot = lambda x, w, out: jax.lax.dot_general(x, w, dims, preferred_element_type=out)  # noqa: E731
    return f32_dot(dot, x, w) if wide else round_to(f32_dot(dot, x, w), x.dtype)


def round_to(x: jax.Array, dtype) -> jax.Array:
    """float32 `x` rounded once to `dtype`, whatever XLA does with it next. XLA may drop a
    float32 -> bfloat16 -> float32 round trip where a later op widens the value again
    (`xla_allow_excess_precision`, on by default), depending on the program: bfloat16 results
    would then carry float32 bits into some programs and not others. `reduce_precision`
    first puts the value on the bfloat16 grid in float32, where no pass removes it."""
    dtype = jnp.dtype(dtype)
    if dtype == x.dtype:
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, info.nexp, info.nmant).astype(dtype)


def add(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a + b` in the dtype of `a`, computed in float32 and rounded once (`round_to`): what
    XLA does for a bfloat16 add, with the rounding kept in every program."""
    return round_to(a.astype(jnp.float32) + b.astype(jnp.float32), a.dtype)


def blocked_matmul(x: jax.Array, w: jax.Array, contract: int, wide: bool, blocks: int) -> jax.Array:  # fmt: skip
    """`matmul` as `blocks` dots, one per fixed block of `w` along the axis a model-parallel
    mesh splits (`spec.RULES`): its first axis, a free reshape of the stored layout.

    `contract=0` (`w [K, N]`, the layer kernels and an untied head): each block contracts K /
    blocks features into a float32 partial `[m, N]`, and the partials are added in block order,
    then rounded once to the dtype of `x` (unless `wide`). `contract=1` (a tied head `[V, D]`):
    each block gives V / blocks of the logits. Every block is a dot of one shape, whether one
    device runs all of them (a batched dot: the same kernel per block) or a device of a mesh
    whose model axis divides `blocks` runs its share, so both round every block alike."""
    ws = w.reshape(blocks, w.shape[0] // blocks, w.shape[1])
    if contract == 0:
        # `x` whole on every device too: GSPMD would otherwise split the features of the
        # residual stream like the blocks, and exchange slices in each of its sums.
        xs = _gathered(x).reshape(x.shape[0], blocks, -1)
        dims = (((2,), (1,)), ((1,), (0,)))
    else:
        xs = jnp.broadcast_to(x, (blocks,) + x.shape)
        dims = (((2,), (2,)), ((0,), (0,)))
    dot = lambda a, b, out: jax.lax.dot_general(a, b, dims, preferred_element_type=out)  # noqa: E731
    if contract == 0:
        # The partials [blocks, m, N], gathered from the devices holding their blocks (one
        # all-gather; left alone, GSPMD kept the sum split over the features and exchanged
        # slices of every later tree), then added in block order.
        total = in_order(_gathered(f32_dot(dot, xs, ws)), 0)
        return total if wide else round_to(total, x.dtype)
    out = f32_dot(dot, xs, ws) if wide else dot(xs, ws, None)  # [blocks, m, V / blocks]
    return out.transpose(1, 0, 2).reshape(x.shape[0], -1)


def _gathered(x: jax.Array) -> jax.Array:
    """`x` whole on every device of the `model` axis of the mesh being traced under."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("model", 1) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def data_shards(batch: int) -> int:
    """How many ways the rows of a batch of `batch` are split in the program being traced: the
    `data` axis of the mesh set by `jax.set_mesh` when it divides the batch (as the engine
    shards its cache, `spec.batch_axis`), else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return 1
    data = mesh.shape["data"]
    return data if data > 1 and batch % data == 0 else 1


def _tiled(x: jax.Array, w: jax.Array, contract: int, wide: bool, fixed: int | None, blocks: int) -> jax.Array:  # fmt: skip
    """`matmul` over tiles of `x`'s rows (2 to `ROWS` on the CPU, exactly `fixed` elsewhere),
    cut within each data shard: on a mesh whose `data` axis splits the rows, each device tiles
    its own rows (`shard_map` over `data`; the `model` axis stays XLA's), so its tiles hold the
    rows of the same rows' tiles on one device and round them alike."""
    shards = data_shards(x.shape[0]) if x.ndim > 1 else 1
    if shards > 1:
        own = jax.sharding.PartitionSpec("data")
        local = lambda x, w: _row_tiles(x, w, contract, wide, fixed, blocks)  # noqa: E731
        return jax.shard_map(local, in_specs=(own, jax.sharding.PartitionSpec()), out_specs=own,
                             axis_names={"data"}, check_vma=False)(x, w)  # fmt: skip
    return _row_tiles(x, w, contract, wide, fixed, blocks)


def _row_tiles(x: jax.Array, w: jax.Array, contract: int, wide: bool, fixed: int | None, blocks: int) -> jax.Array:  # fmt: skip
    if blocks > 1:
        tile = lambda t: blocked_matmul(t, w, contract, wide, blocks)  # noqa: E731
    else:
        tile = lambda t: matmul(t, w, contract, wide)  # noqa: E731
    most, least = ROWS, 2
    if fixed is not None and blocks == 1 and on_cpu():  # the CPU's prefill: see PREFILL_ROWS
        fixed, most, least = None, PREFILL_ROWS, FIXED_ROWS
    elif blocks == 1 and contract == 1:
        most = HEAD_ROWS
    elif blocks == 1 and x.shape[-1] >= WIDE:
        most = WIDE_ROWS
    out = row_tiles(tile, x.reshape(-1, x.shape[-1]), 0, fixed, most, least)
    return out.reshape(*x.shape[:-1], -1)


def row_tiles(fn, x: jax.Array, axis: int, fixed: int | None = None, most: int = ROWS, least: int = 2) -> jax.Array:  # fmt: skip
    """`fn` over tiles of the rows along `axis` of `x` (zeros padding them to whole tiles of
    `tiles(m, fixed, most, least)`), its results put back in row order. `fn` keeps the row axis
    where it is; each tile is a call of one shape, so `fn`'s dots round every row alike."""
    axis = axis % x.ndim
    m = x.shape[axis]
    count, size = tiles(m, fixed, most, least)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, count * size - m)
    x = jnp.pad(x, pad)
    if count <= UNROLLED_TILES:  # one call per tile, in one program: no loop to run
        out = jnp.concatenate([fn(t) for t in jnp.split(x, count, axis)], axis)
    else:
        stacked = jnp.moveaxis(x.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1 :]), axis, 0)  # fmt: skip
        out = jnp.moveaxis(jax.lax.map(fn, stacked), 0, axis)
        out = out.reshape(out.shape[:axis] + (count * size,) + out.shape[axis + 2 :])
    return jax.lax.slice_in_dim(out, 0, m, axis=axis)


def dense(x: jax.Array, w: jax.Array, contract: int = 0, wide: bool = False) -> jax.Array:
    """`matmul(x, w, contract, wide)` with each row rounded as it is in any other batch."""
    if not enabled():
        return matmul(x, w, contract, wide)
    # The mode of this trace, for the vmap rule: JAX may run the rule after the `with` blocks
    # that set it have exited (a `vmap` of a loop batches the loop's body later).
    settings = mode()

    @jax.custom_batching.custom_vmap
    def fn(x, w):
        return _tiled(x, w, contract, wide, fixed_rows(), settings.blocks)

    @fn.def_vmap
    def rule(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        with traced_under(settings):
            if w_batched:  # one matrix per mapped element: each alone, in turn
                x = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
                return jax.lax.map(lambda xw: dense(*xw, contract, wide), (x, w)), True
            return dense(x, w, contract, wide), True  # the mapped axis is just more rows

    return fn(x, w)
