"""The compiled GPU S2 kernels (jax-triton and Pallas-Triton), forward and gradients, against the dense
reference on the same GPU. Skipped unless JAX's default backend is a GPU (CI has none; the CPU tests run
the same kernels under the Triton and Pallas interpreters)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlm.kernels.s2_attention import S2Pattern, s2_attention
from test_s2_kernels import CASES, _inputs

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

# Kernel dots run in TF32 (fp32 inputs) or bf16 with fp32 accumulation; the reference is fp32 "highest".
TOL = {jnp.float32: 5e-3, jnp.bfloat16: 3e-2}
IMPLS = ["pallas"] + (["triton"] if importlib.util.find_spec("jax_triton") else [])


def _grads(case, dtype, impl):
    pattern, qkv, do, segment_ids = _inputs(case, dtype)

    @jax.jit
    def f(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: s2_attention(q, k, v, pattern, segment_ids=segment_ids, impl=impl), q, k, v)
        return (o, *vjp(do))

    return [np.asarray(x.astype(jnp.float32)) for x in f(*qkv)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c for c in CASES if c != "block_mask"])
def test_gpu_kernel_against_reference(case, impl, dtype):
    want, got = _grads(case, dtype, "reference"), _grads(case, dtype, impl)
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        err = float(np.max(np.abs(g - w)))
        print(f"{case} {impl} {np.dtype(dtype).name} {name}: max abs err {err:.2e}")
        np.testing.assert_allclose(g, w, atol=TOL[dtype], rtol=TOL[dtype], err_msg=f"{case} {impl} {name}")


def test_gpu_default_is_a_gpu_kernel_at_length():
    """At 4K tokens with D = 64 (the benchmark's shape) auto picks a GPU kernel and matches the reference."""
    t, h, d = 4096, 8, 64
    pattern = S2Pattern(h, t, 64, local_blocks=4, vert_stride=8)
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, t, h, d), jnp.bfloat16) for kk in ks)
    got = jax.jit(lambda q, k, v: s2_attention(q, k, v, pattern))(q, k, v)
    want = jax.jit(lambda q, k, v: s2_attention(q, k, v, pattern, impl="reference"))(q, k, v)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
