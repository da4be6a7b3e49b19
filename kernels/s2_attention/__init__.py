"""S2-Attention: per-head strided context shards plus a local window (Lin et al., 2024; DKernel).

    from jaxlm.kernels.s2_attention import S2Pattern, s2_attention
    pattern = S2Pattern(num_heads=8, seq_len=4096, block_size=64, local_blocks=4, vert_stride=8)
    out = s2_attention(q, k, v, pattern)              # q [B, T, Hq, D], k/v [B, T, Hkv, D]

Implementations (all tested against `reference`): "xla" (block gather, any backend), "pallas" (TPU
scalar-prefetch kernels; Pallas-Triton on GPU), "triton" (Triton kernels via jax_triton, GPU),
"reference" (dense masked softmax, O(T^2)). impl="auto" picks Pallas on TPU, Triton (else Pallas) on
GPU and XLA on CPU.
"""

from __future__ import annotations

import importlib.util

import jax

from . import pallas, reference, xla
from .pattern import (
    BlockMask,
    S2Pattern,
    block_layout,
    coverage,
    csc_tables,
    csr_tables,
    density,
    expand_heads,
    is_kv_cache_efficient,
    kv_blocks_to_keep,
)

IMPLS = ("auto", "reference", "xla", "pallas", "triton")


def default_impl(backend: str | None = None) -> str:
    """The fastest implementation that `backend` (default: jax's default backend) has."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "pallas"
    if backend == "gpu":
        has_jt = importlib.util.find_spec("jax_triton") is not None and importlib.util.find_spec("triton") is not None
        return "triton" if has_jt else "pallas"
    return "xla"


def s2_attention(q, k, v, pattern, *, segment_ids=None, impl: str = "auto", scale: float | None = None, **kwargs):
    """S2 attention: softmax(q k^T * scale + mask) v over the pattern's blocks.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hkv divides Hq; query head h reads KV head h // (Hq/Hkv)).
        float32 or bfloat16; softmax and accumulation in float32. T need not be a multiple of the block.
      pattern: `S2Pattern` (static, hashable) or `BlockMask`; its layout has 1, Hkv or Hq heads.
      segment_ids: optional int [B, T]: tokens attend only within their segment (0 = padding).
      impl: "auto" | "reference" | "xla" | "pallas" | "triton".
      scale: softmax scale, default 1/sqrt(D).
      kwargs: passed to the implementation (e.g. xla's tile_blocks, pallas' interpret).
    Returns [B, T, Hq, D] in q's dtype; differentiable in q, k, v.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"need q [B, T, Hq, D] and k, v [B, T, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}")
    impl = default_impl() if impl == "auto" else impl
    if impl == "reference":
        return reference.attention(q, k, v, pattern, segment_ids=segment_ids, scale=scale)
    if impl == "xla":
        return xla.attention(q, k, v, pattern, segment_ids=segment_ids, scale=scale, **kwargs)
    if impl == "pallas":
        return pallas.attention(q, k, v, pattern, segment_ids=segment_ids, scale=scale, **kwargs)
    from . import triton as triton_impl

    return triton_impl.attention(q, k, v, pattern, segment_ids=segment_ids, scale=scale)


__all__ = [
    "BlockMask", "S2Pattern", "block_layout", "coverage", "csc_tables", "csr_tables", "default_impl", "density",
    "expand_heads", "is_kv_cache_efficient", "kv_blocks_to_keep", "s2_attention",
]
