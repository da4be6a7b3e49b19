"""S2-Attention patterns against block masks worked out by hand, and the derived tables/properties."""

import numpy as np
import pytest
from jaxlm.kernels.s2_attention import (
    BlockMask,
    S2Pattern,
    block_layout,
    coverage,
    csc_tables,
    csr_tables,
    density,
    is_kv_cache_efficient,
    kv_blocks_to_keep,
)


def M(*rows):
    return np.array([[int(c) for c in r.replace(" ", "")] for r in rows], dtype=bool)


def test_homo_head():
    # 1 pattern: local 2 blocks + every 3rd block (j % 3 == 0 -> j in {0, 3}).
    lay = block_layout(4, 6 * 16, 16, local_blocks=2, vert_stride=3, homo_head=True)
    assert lay.shape == (1, 6, 6)
    np.testing.assert_array_equal(lay[0], M("100000", "110000", "111000", "101100", "100110", "100111"))


def test_hetero_heads_shift_by_stride_over_heads():
    # s = max(1, 4 // 2) = 2: head 0 keeps j % 4 == 0, head 1 keeps (j + 2) % 4 == 0; local = diagonal only.
    lay = block_layout(2, 96, 16, local_blocks=1, vert_stride=4)
    np.testing.assert_array_equal(lay[0], M("100000", "110000", "101000", "100100", "100010", "100011"))
    np.testing.assert_array_equal(lay[1], M("100000", "010000", "001000", "001100", "001010", "001001"))


def test_gqa_pattern_per_kv_head_with_shift_from_query_heads():
    # 4 query heads, 2 KV heads: h runs over KV heads but s = max(1, 4 // 4) = 1 (DKernel), not 4 // 2.
    lay = block_layout(4, 80, 16, local_blocks=1, vert_stride=4, num_kv_heads=2)
    kv0 = M("10000", "11000", "10100", "10010", "10001")  # j % 4 == 0
    kv1 = M("10000", "01000", "00100", "00010", "00011")  # (j + 1) % 4 == 0
    assert lay.shape == (4, 5, 5)
    for h, want in enumerate([kv0, kv0, kv1, kv1]):
        np.testing.assert_array_equal(lay[h], want)
    assert S2Pattern(4, 80, 16, 1, 4, num_kv_heads=2).layout().shape == (2, 5, 5)  # compact: per KV head


def test_dense_heads_are_the_last():
    lay = block_layout(2, 64, 16, local_blocks=1, vert_stride=4, num_dense_heads=1)
    np.testing.assert_array_equal(lay[0], M("1000", "1100", "1010", "1001"))
    np.testing.assert_array_equal(lay[1], np.tril(np.ones((4, 4), bool)))
    lay = block_layout(4, 64, 16, local_blocks=1, vert_stride=4, num_kv_heads=2, num_dense_heads=1)
    assert lay[2:].all(axis=0)[np.tril_indices(4)].all() and not lay[0].all()  # KV head 1 -> q heads 2, 3


def test_vllm_offset():
    # head_sliding_offset=1 (vLLM / Phi-3-small): (j + h*2 + 1) % 4 == 0 -> head 0: j = 3, head 1: j = 1.
    lay = block_layout(2, 80, 16, local_blocks=1, vert_stride=4, head_sliding_offset=1)
    np.testing.assert_array_equal(lay[0], M("10000", "01000", "00100", "00010", "00011"))
    np.testing.assert_array_equal(lay[1], M("10000", "01000", "01100", "01010", "01001"))


def test_bidirectional():
    # |i - j| < 2 or j % 3 == 0, no causal cut.
    lay = block_layout(1, 80, 16, local_blocks=2, vert_stride=3, causal=False)
    np.testing.assert_array_equal(lay[0], M("11010", "11110", "11110", "10111", "10011"))


def test_seq_len_not_multiple_of_block_and_validation():
    assert block_layout(2, 100, 16, 2, 4).shape == (2, 7, 7)
    for bad in [dict(block_size=24), dict(block_size=8), dict(local_blocks=0), dict(num_kv_heads=3)]:
        with pytest.raises(ValueError):
            S2Pattern(**{**dict(num_heads=4, seq_len=64, block_size=16, local_blocks=1, vert_stride=2), **bad})
    with pytest.raises(ValueError):
        S2Pattern(4, 64, 16, 1, 2, homo_head=True, num_dense_heads=1)
    assert hash(S2Pattern(4, 64)) == hash(S2Pattern(4, 64)) and S2Pattern(4, 64).for_length(64) == S2Pattern(4, 64)


def test_csr_and_csc_tables():
    lay = M("100", "110", "101")[None]
    counts, cols = csr_tables(lay)
    np.testing.assert_array_equal(counts, [[1, 2, 2]])
    np.testing.assert_array_equal(cols, [[[0, 0], [0, 1], [0, 2]]])  # padding repeats the row's last block
    rcounts, rows = csc_tables(lay)
    np.testing.assert_array_equal(rcounts, [[3, 1, 1]])
    np.testing.assert_array_equal(rows, [[[0, 1, 2], [1, 1, 1], [2, 2, 2]]])
    p = S2Pattern(8, 1000, 16, 3, 5)
    counts, cols = csr_tables(p)
    back = np.zeros(p.layout().shape, bool)
    for h, i, c in np.argwhere(np.arange(cols.shape[-1]) < counts[..., None]):
        back[h, i, cols[h, i, c]] = True
    np.testing.assert_array_equal(back, p.layout())
    assert csr_tables(p)[1] is cols  # cached per pattern


def test_coverage():
    ok, missed = coverage(S2Pattern(4, 160, 16, local_blocks=1, vert_stride=4))  # shifts 0..3 cover all
    assert ok and missed.shape == (0, 2)
    ok, missed = coverage(block_layout(2, 96, 16, local_blocks=1, vert_stride=4))  # shifts 0, 2 only
    assert not ok and [2, 1] in missed.tolist() and [3, 1] in missed.tolist() and [1, 0] not in missed.tolist()
    assert not coverage(S2Pattern(4, 160, 16, 1, 4, homo_head=True))[0]


def test_kv_cache_efficiency():
    for p in [S2Pattern(4, 320, 16, 2, 4), S2Pattern(8, 320, 16, 1, 3, num_kv_heads=2, num_dense_heads=1),
              S2Pattern(4, 320, 16, 3, 8, head_sliding_offset=1)]:
        assert is_kv_cache_efficient(p)
    # block 0 is read at row 3 after being skipped at row 2: it must be kept although unused.
    assert not is_kv_cache_efficient(M("1000", "1100", "0110", "1011")[None])
    # a dilated pattern (every other block, phase by row) is not efficient either.
    dilated = np.tril(np.add.outer(np.arange(8), np.arange(8)) % 2 == 0)
    assert not is_kv_cache_efficient(dilated)


def test_kv_blocks_to_keep():
    p = S2Pattern(4, 8 * 16, 16, local_blocks=2, vert_stride=4)
    lay = p.layout()
    for h in range(4):
        np.testing.assert_array_equal(kv_blocks_to_keep(p, h, 5), np.flatnonzero(lay[h, 5]))
        np.testing.assert_array_equal(kv_blocks_to_keep(lay, h, 5), np.flatnonzero(lay[h, 5]))
    np.testing.assert_array_equal(kv_blocks_to_keep(p, 0, 10), [0, 4, 8, 9, 10])  # beyond seq_len
    # per-query-head pattern, 2 KV heads: KV head 1 keeps what query heads 2 and 3 read.
    want = np.flatnonzero(lay[2, 5] | lay[3, 5])
    np.testing.assert_array_equal(kv_blocks_to_keep(p, 1, 5, num_kv_heads=2), want)
    np.testing.assert_array_equal(kv_blocks_to_keep(lay, 1, 5, num_kv_heads=2), want)
    # a pattern shared per KV head: KV head 1 keeps its own row.
    gqa = S2Pattern(4, 128, 16, 2, 4, num_kv_heads=2)
    np.testing.assert_array_equal(kv_blocks_to_keep(gqa, 1, 5), np.flatnonzero(gqa.layout()[1, 5]))
    # not efficient: block 0 is kept at row 2 because row 3 needs it again.
    np.testing.assert_array_equal(kv_blocks_to_keep(M("1000", "1100", "0110", "1011")[None], 0, 2), [0, 1, 2])


def test_density():
    assert density(block_layout(4, 96, 16, 2, 3, homo_head=True)) == pytest.approx(16 / 21)  # rows: 1 + 2 + 3 + 3 + 3 + 4
    assert density(S2Pattern(2, 64, 16, 1, 1)) == 1.0
    d16k = density(S2Pattern(8, 16384, 64, 4, 8))
    assert 0.14 < d16k < 0.17


def test_block_mask():
    m = M("100", "110", "111")
    assert BlockMask(m, 16) == BlockMask(m.copy(), 16) and hash(BlockMask(m, 16)) == hash(BlockMask(m.copy(), 16))
    assert BlockMask(m, 16).layout().shape == (1, 3, 3) and BlockMask(m, 16).for_length(40).layout().shape == (1, 3, 3)
    assert BlockMask(m, 16).for_length(20).layout().shape == (1, 2, 2)
    with pytest.raises(ValueError):
        BlockMask(M("100", "100", "111"), 16)  # a diagonal block missing
    with pytest.raises(ValueError):
        BlockMask(M("110", "110", "111"), 16)  # above the diagonal while causal
    assert BlockMask(M("110", "110", "111"), 16, causal=False).layout().shape == (1, 3, 3)
