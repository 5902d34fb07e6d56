"""The accelerators' forms, checked on the CPU (issue 31): the decode chunk and the prefill of a
small bfloat16 config lower for CUDA and TPU (`jax.export` under `invariant.forms_for`), and there the decode attention
contracts the bf16 cache in dots that accumulate in float32, with no float32 copy of the cache.
Lowered for the CPU, the same chunk does widen the cache (its float32 form: score dots in
tiles, multiply-and-sums over the values): the check can fail."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from conftest import inlined_count

import cfjax
from cfjax.core import attention, decode, invariant, kernel, model, scm
from cfjax.core.cache import init_cache

CONFIG = cfjax.preset("tiny")
BATCH, BUCKET, WIDTH = 2, 32, 8
LENGTH = kernel.cache_length(BUCKET, WIDTH, chunk=WIDTH)
SD = jax.ShapeDtypeStruct


def _chunk(options, params, cache, key_data, start, last, forced, noise_index, draft_params=None, draft_cache=None):  # fmt: skip
    """One decode chunk of `WIDTH` steps, as the driver runs it, from raw key data (with a
    draft's params and cache: speculative rounds)."""
    sampler = jax.tree_util.tree_map(jnp.asarray, scm.stack([cfjax.Sampler(1.0)] * BATCH, CONFIG.vocab_size))  # fmt: skip
    rows = kernel.Rows(jax.random.wrap_key_data(key_data), start, sampler, forced, noise_index)
    draft = None if draft_cache is None else kernel.DraftState(draft_cache, last)
    state = kernel.State(last, cache, jnp.int32(BUCKET), jnp.zeros((BATCH,), bool), draft)
    return decode.decode(CONFIG, options, params, rows, state, jnp.int32(WIDTH), draft_params)


def _export_chunk(platforms, lookahead: int = 0):
    """The chunk exported for `platforms`; with a `lookahead`, of speculative rounds (the model
    its own draft, its cache `lookahead` slots longer: a round writes that far ahead)."""
    options = kernel.Options(early_exit=True, draft=kernel.DraftSpec(CONFIG, lookahead) if lookahead else None)  # fmt: skip
    params = model.param_shapes(CONFIG, jnp.bfloat16)
    cache = jax.eval_shape(lambda: init_cache(CONFIG, BATCH, LENGTH + lookahead, jnp.bfloat16))
    i32 = lambda *shape: SD(shape, jnp.int32)  # noqa: E731
    args = (params, cache, SD((BATCH, 2), jnp.uint32), i32(BATCH), i32(BATCH), i32(BATCH, WIDTH), i32(BATCH, WIDTH))  # fmt: skip
    if lookahead:
        args += (params, cache)
    # The per-backend forms are chosen while tracing (`invariant.forms_for`); a fresh function
    # object, so that no program traced for another platform is reused.
    with invariant.forms_for(platforms[0]):
        return jax.export.export(jax.jit(lambda *a: _chunk(options, *a)), platforms=platforms)(*args)  # fmt: skip


KEYS = f"{BATCH}x{CONFIG.n_kv_heads}x{CONFIG.head_dim}x{LENGTH}"  # a layer's key cache
# The value cache enters its dots in blocks of slots (`invariant.slot_blocks`), zero-padded.
BLOCKS = -(-LENGTH // invariant.BLOCK)
VALUE_BLOCKS = f"{BATCH}x{CONFIG.n_kv_heads}x{BLOCKS}x{invariant.BLOCK}x{CONFIG.head_dim}"


def _widens_the_cache(text: str) -> bool:
    """Whether a layer's bf16 key or value cache (with any unit axes inserted) is converted to
    float32 somewhere in the module."""
    b, kv, d, s = BATCH, CONFIG.n_kv_heads, CONFIG.head_dim, LENGTH
    shapes = (rf"{b}x{kv}x(?:1x)*{d}x{s}", rf"{b}x{kv}x(?:1x)*{s}x{d}")
    return any(re.search(rf"stablehlo\.convert .*tensor<{shape}xbf16>\) -> tensor<[0-9x]*xf32>", text) for shape in shapes)  # fmt: skip


@pytest.mark.parametrize("platforms", [("cuda", "tpu")], ids=["cuda+tpu"])
def test_the_decode_chunk_lowers_for_accelerators_without_a_float32_cache(platforms):
    exported = _export_chunk(platforms)
    assert exported.platforms == platforms
    text = exported.mlir_module()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert any(f"tensor<{KEYS}xbf16>" in d and "f32>" in d.split("->")[-1] for d in dots)
    assert any(f"tensor<{VALUE_BLOCKS}xbf16>" in d and "f32>" in d.split("->")[-1] for d in dots)
    assert not _widens_the_cache(text)
    # bfloat16 roundings are explicit: no excess-precision pass of XLA can skip them.
    assert "stablehlo.reduce_precision" in text
    # Every weight matmul runs on tiles of one fixed shape (`invariant.FIXED_ROWS` rows),
    # whatever the batch (here 2 rows): batch-invariant by construction.
    weights = [
        re.search(r"\(tensor<(\d+)x\d+x(?:bf16|f32)>, tensor<\d+x\d+x(?:bf16|f32)>\)", d)
        for d in dots
    ]
    rows = {int(m.group(1)) for m in weights if m}
    assert rows == {invariant.FIXED_ROWS}, rows


def test_a_speculative_round_holds_the_draft_once_whatever_its_lookahead():
    """A round lowers (for CUDA and TPU) with the dots of two forwards, whatever the tokens it
    proposes: the draft's loop step (every step feeds two tokens, one program) and the
    target's scoring pass; here the model is its own draft, so each is a plain chunk's forward.
    XLA's compile grows with the program: a separate two-token first step held the draft's
    layers a second time (78 dots here; SmolLM2's round compiled in 12.0 s, now 8.4 s), and
    Python-unrolled steps held them once per token (182 at lookahead 6; an H200 compiled the
    Llama 3 8B round in 76 s against 6 s for a plain chunk)."""
    plain = inlined_count(_export_chunk(("cuda", "tpu")).mlir_module(), "stablehlo.dot_general")
    counts = {}
    for lookahead in (1, 2, 6):
        exported = _export_chunk(("cuda", "tpu"), lookahead)
        assert exported.platforms == ("cuda", "tpu")
        counts[lookahead] = inlined_count(exported.mlir_module(), "stablehlo.dot_general")
    assert counts == {1: 2 * plain, 2: 2 * plain, 6: 2 * plain}, (plain, counts)


def test_on_the_cpu_the_cache_is_widened_for_the_float32_form():
    assert _widens_the_cache(_export_chunk(("cpu",)).mlir_module())


def test_the_prefill_lowers_for_accelerators():
    params = model.param_shapes(CONFIG, jnp.bfloat16)
    prompt, lengths = SD((BATCH, BUCKET), jnp.int32), SD((BATCH,), jnp.int32)
    fill = lambda p, t, n: kernel.prefill(CONFIG, p, t, n, LENGTH)  # noqa: E731
    with invariant.forms_for("cuda"):
        exported = jax.export.export(jax.jit(fill), platforms=("cuda", "tpu"))(
            params, prompt, lengths
        )
    assert (
        exported.platforms == ("cuda", "tpu") and "stablehlo.dot_general" in exported.mlir_module()
    )


def test_the_two_forms_agree():
    """The dot form (run here on the CPU in float32) gives the CPU tiles' attention."""
    rng = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(rng[0], (2, 2, 2, 3, 16))
    keys = jax.random.normal(rng[1], (2, 2, 16, 40))
    values = jax.random.normal(rng[2], (2, 2, 40, 16))
    mask = (jnp.arange(40) < 30)[None, None, None, None, :]
    tiles = attention.attention_tiles(q, keys, values, mask, 0.25)
    dots = attention.attention_dots(q, keys, values, mask, 0.25)
    assert jnp.allclose(tiles, dots, atol=1e-5)


def test_blocked_matmuls_lower_for_accelerators_as_one_dot_shape_per_block():
    """`model_blocks=8`: every weight matmul of the prefill is a dot batched over 8 blocks, of
    64-row tiles, bfloat16 operands accumulated in float32, for CUDA and TPU."""
    config = CONFIG.replace(model_blocks=8)
    params = model.param_shapes(config, jnp.bfloat16)
    prompt, lengths = SD((BATCH, BUCKET), jnp.int32), SD((BATCH,), jnp.int32)
    fill = lambda p, t, n: kernel.prefill(config, p, t, n, LENGTH)  # noqa: E731
    with invariant.forms_for("cuda"):
        exported = jax.export.export(jax.jit(fill), platforms=("cuda", "tpu"))(params, prompt, lengths)  # fmt: skip
    rows, c = invariant.FIXED_ROWS, config
    blocked = re.findall(
        rf"batching_dims = \[1\] x \[0\], contracting_dims = \[2\] x \[1\] : "
        rf"\(tensor<{rows}x8x(\d+)xbf16>, tensor<8x\d+x(\d+)xbf16>\) -> tensor<8x{rows}x\d+xf32>",
        exported.mlir_module(),
    )
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    widths = {(c.dim // 8, qkv), (c.dim // 8, c.dim), (c.dim // 8, 2 * c.ffn_dim), (c.ffn_dim // 8, c.dim), (c.dim // 8, c.vocab_size)}  # fmt: skip
    assert {(int(k), int(n)) for k, n in blocked} == widths


def test_the_layers_are_one_function_the_program_calls():
    """Every layer's block is traced and lowered once per program (`model._block`): the module
    holds one block function, called once per layer, so tracing and lowering time do not grow
    with the layers (an 8B chunk lowered in 1.6 s, now 0.3 s); XLA inlines the calls."""
    text = _export_chunk(("cuda", "tpu")).mlir_module()
    blocks = re.findall(r"func\.func private @(_traced_block\w*)\(", text)
    assert len(blocks) == 1, blocks
    assert len(re.findall(rf"\bcall @{blocks[0]}\(", text)) == CONFIG.n_layers
