"""The Triton S2 kernels (forward, dQ, dK/dV) under TRITON_INTERPRET=1 with torch tensors, against the
jnp reference. TRITON_INTERPRET must be set before triton is imported, so the kernels run in a
subprocess; skipped when triton or torch is missing."""

import functools
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlm.kernels.s2_attention import S2Pattern, s2_attention

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="needs triton and torch",
)

T = 56  # 4 blocks of 16, the last one partial
# Pattern shared per KV head with segments; per query head under GQA, bidirectional, with a dense head
# and the vLLM offset (layout head h // (Hq // HL) and KV head h // (Hq // Hkv) differ).
CASES = {
    "gqa_shared_seg": (S2Pattern(4, T, 16, local_blocks=1, vert_stride=4, num_kv_heads=2), 4, 2, True),
    "gqa_per_head_bidir_dense_vllm": (
        S2Pattern(4, T, 16, 1, 3, causal=False, num_dense_heads=1, head_sliding_offset=1), 4, 2, True),
}

RUNNER = textwrap.dedent("""
    import os, pickle, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from jaxlm.kernels.s2_attention.triton import torch_attention
    cases = pickle.load(open(sys.argv[1], "rb"))
    out = {}
    for name, (pattern, q, k, v, do, seg) in cases.items():
        t = lambda x: None if x is None else torch.from_numpy(x)
        res = torch_attention(t(q), t(k), t(v), pattern, t(do), segment_ids=t(seg))
        out[name] = [r.float().numpy() for r in res]
    pickle.dump(out, open(sys.argv[2], "wb"))
""")


def _inputs(pattern, hq, hkv, seg, seed):
    rng = np.random.default_rng(seed)
    b, d = 1, 16  # the interpreter runs every program in Python: keep the grid small
    q, do = (rng.standard_normal((b, T, hq, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, T, hkv, d)).astype(np.float32) for _ in range(2))
    segment_ids = np.array([[1] * 20 + [2] * 26 + [0] * 10], np.int32) if seg else None
    return pattern, q, k, v, do, segment_ids


def test_triton_kernels_against_reference(tmp_path):
    cases = {name: _inputs(*spec, seed=i) for i, (name, spec) in enumerate(CASES.items())}
    src, dst = tmp_path / "in.pkl", tmp_path / "out.pkl"
    src.write_bytes(pickle.dumps(cases))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(src), str(dst)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pickle.loads(dst.read_bytes())
    for name, (pattern, q, k, v, do, seg) in cases.items():
        seg_j = None if seg is None else jnp.asarray(seg)
        ref = functools.partial(s2_attention, pattern=pattern, segment_ids=seg_j, impl="reference")
        o, vjp = jax.vjp(ref, *map(jnp.asarray, (q, k, v)))
        want = [o, *vjp(jnp.asarray(do))]
        for what, w, g in zip(("out", "dq", "dk", "dv"), want, got[name]):
            np.testing.assert_allclose(g, np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=f"{name} {what}")
