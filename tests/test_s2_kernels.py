"""The XLA and Pallas (interpret) S2 kernels, forward and gradients, against the dense reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlm.kernels.s2_attention import BlockMask, S2Pattern, default_impl, density, s2_attention, xla
from jaxlm.kernels.s2_attention.plan import make_plan

T = 88  # 6 blocks of 16, the last one partial


def _random_mask(heads, n, seed=0):
    m = np.tril(np.random.default_rng(seed).random((heads, n, n)) < 0.4)
    m[:, np.arange(n), np.arange(n)] = True
    return m


CASES = {
    # name: (pattern, Hq, Hkv, with segments)
    "mha": (S2Pattern(4, T, 16, local_blocks=2, vert_stride=3), 4, 4, False),
    "gqa_shared_seg": (S2Pattern(4, T, 16, local_blocks=1, vert_stride=4, num_kv_heads=2), 4, 2, True),
    "gqa_per_head_dense_vllm": (S2Pattern(4, T, 16, 2, 4, num_dense_heads=1, head_sliding_offset=1), 4, 2, False),
    "homo_gqa": (S2Pattern(4, T, 16, 1, 3, homo_head=True), 4, 2, False),
    "bidirectional_seg": (S2Pattern(2, T, 16, local_blocks=1, vert_stride=3, causal=False), 2, 1, True),
    "block_mask": (BlockMask(_random_mask(2, 6), 16), 2, 2, False),
}
IMPLS = {
    "xla": dict(impl="xla"),
    "xla_m1": dict(impl="xla", tile_blocks=1),  # one query block per tile
    "xla_m4": dict(impl="xla", tile_blocks=4),  # 4 blocks per tile (auto picks 2 here): padded tiles
    "pallas_tpu": dict(impl="pallas", interpret=True, backend="tpu"),
    "pallas_gpu": dict(impl="pallas", interpret=True, backend="gpu"),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(case, dtype):
    pattern, hq, hkv, seg = CASES[case]
    ks = jax.random.split(jax.random.key(1), 4)
    b, d = 2, 16
    q = jax.random.normal(ks[0], (b, T, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, T, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, T, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, T, hq, d), dtype)
    segment_ids = None
    if seg:  # two documents and right padding (segment 0) in row 0; one document in row 1
        segment_ids = jnp.asarray(np.array([[1] * 30 + [2] * 40 + [0] * 18, [3] * T]), jnp.int32)
    return pattern, (q, k, v), do, segment_ids


def _run(case, dtype, **kw):
    pattern, qkv, do, segment_ids = _inputs(case, dtype)

    @jax.jit
    def f(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: s2_attention(q, k, v, pattern, segment_ids=segment_ids, **kw), q, k, v)
        return (o, *vjp(do))

    return [np.asarray(x.astype(jnp.float32)) for x in f(*qkv)]


@functools.cache
def _reference(case, dtype):
    return _run(case, dtype, impl="reference")


def _check(case, dtype, impl):
    want, got = _reference(case, dtype), _run(case, dtype, **IMPLS[impl])
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        np.testing.assert_allclose(g, w, atol=TOL[dtype], rtol=TOL[dtype], err_msg=f"{case} {impl} {name}")


# Every case on the XLA path (auto: 2 query blocks per tile at this size, so union + row masks). The
# kernels share tables and block math, so each other form runs on the cases that exercise what it
# changes: GQA grouping, segments, bidirectional (Pallas TPU form), other tile sizes (XLA m1 / m4),
# one query head per program under GQA (Pallas GPU form).
FP32 = [(c, "xla") for c in CASES] + [
    (c, "pallas_tpu") for c in ("mha", "gqa_shared_seg", "gqa_per_head_dense_vllm", "bidirectional_seg")
] + [(c, i) for i in ("xla_m1", "pallas_gpu") for c in ("gqa_shared_seg", "gqa_per_head_dense_vllm")] + [
    ("bidirectional_seg", "xla_m4")
]


@pytest.mark.parametrize("case,impl", FP32)
def test_fp32_against_reference(case, impl):
    _check(case, jnp.float32, impl)


@pytest.mark.parametrize("case,impl", [("mha", "xla"), ("gqa_shared_seg", "pallas_tpu")])
def test_bf16_against_reference(case, impl):
    _check(case, jnp.bfloat16, impl)


def test_reference_is_dense_causal_for_stride_one():
    pattern, (q, k, v), _, _ = _inputs("mha", jnp.float32)
    dense = S2Pattern(4, T, 16, local_blocks=1, vert_stride=1)
    got = jax.jit(lambda q, k, v: s2_attention(q, k, v, dense, impl="reference"))(q, k, v)
    want = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pattern_is_a_static_jit_argument_and_auto_is_xla_on_cpu():
    pattern, (q, k, v), _, _ = _inputs("mha", jnp.float32)
    f = jax.jit(s2_attention, static_argnames=("pattern", "impl"))
    np.testing.assert_allclose(f(q, k, v, pattern=pattern), _reference("mha", jnp.float32)[0], atol=1e-5)
    assert default_impl("cpu") == "xla" and default_impl("tpu") == "pallas"
    assert default_impl("gpu") in ("triton", "pallas")
    with pytest.raises(ValueError):
        s2_attention(q, k, v, pattern, impl="flash")
    with pytest.raises(ValueError):  # the pattern is for 4 query heads
        s2_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], pattern)


def test_xla_auto_tiles_here_take_two_blocks():
    pattern, hq, hkv, _ = CASES["mha"]
    assert xla.choose_tile_blocks(make_plan(pattern, T, hq, hkv), 8) == 2


def test_xla_work_scales_with_active_blocks():
    """The computed blocks (gathered x rows per tile) stay within 40% of the active ones, far below T^2."""
    for t in (2048, 8192):
        pattern = S2Pattern(8, t, 64, local_blocks=4, vert_stride=8)
        pl = make_plan(pattern, t, 8, 8)
        active = int(pl.layout.sum())
        m = xla.choose_tile_blocks(pl, 8)
        counts = xla.tile_tables(pl, m)[0]
        computed = sum(len(tiles) * w for tiles, w in xla.buckets(counts.max(0), 8)) * m * pl.num_logical
        assert active <= computed <= 1.4 * active
        assert computed < 0.4 * pl.num_blocks**2 * pl.num_logical
    assert density(pattern) < 0.2
