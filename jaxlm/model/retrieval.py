"""kNN-retrieval attention over a datastore of the input (Unlimiformer: Bertsch et al., 2023;
decoder-only models: Ahrabian et al., 2024).

A long input is encoded once, chunk by chunk (jaxlm.infer.retrieval); for every retrieval layer the
datastore keeps that layer's *attention input* x_s (the RMS-normed hidden state, [d] per token).
At decoding time each query head of a retrieval layer attends over its own top-k datastore entries
plus the ordinary local KV cache, with one softmax over both.

The datastore is the pytree `rctx` (arrays only, so it jits, shards and donates):
    h      [L_ret, B, S, d]  attention inputs of the retrieval layers (slot i = i-th retrieval layer)
    valid  [B, S] bool       searchable entries: False for padding and for the input tokens that are
                             also in the local cache (so nothing is attended twice)
    pos    [B, S] int32      RoPE position of each entry (the position rule: jaxlm.infer.retrieval)
    slot   [L] int32         row of h used by each layer; -1 = the layer attends only to the local cache

Query folding (Unlimiformer, section 2.3). Query head j reads kv head g = j // (Hq / Hkv), whose key
of entry s is W_k[:, g, :]^T x_s, so
    q_j . k_s = q_j . (W_k[:, g, :]^T x_s) = (W_k[:, g, :] q_j) . x_s = qf_j . x_s,
and one datastore of x (d numbers per token and layer) serves every head of the layer: the search is
one [Tq*Hq, d] x [d, S] product. (With strong GQA a datastore of un-rotated K and V would be smaller:
2 Hkv D < d for Phi-4-mini; the folded form is the paper's and costs no projection per entry.)

RoPE. Rotation makes q.k depend on the key's position, which one position-free datastore cannot hold,
so the *search* uses un-rotated folded queries against un-rotated x (the content part of the score;
exact for the un-rotated features of partial RoPE). The *attention* is then exact for what was
retrieved: the keys and values of the k entries are recomputed from x (k = W_k^T x + b_k,
v = W_v^T x + b_v), the keys rotated at the entries' positions `pos`, and scored with the rotated query
q, in the same softmax as the local cache. With k >= the number of entries this is full attention.
(A key bias adds q_j . b_k to every entry's score alike, so the search ignores it.)

Long local prefills. An empty datastore (`rctx = {}`) means local attention only; queries beyond
LOCAL_BLOCK are then computed in query blocks whose keys stop at the block's last visible slot
(`local_attention`): the same causal attention in half the arithmetic and a fraction of the memory of
one [Tq, S] score matrix. The datastore encoder and the dense prefills of jaxlm.infer.retrieval run
through it, so an 8K-token window needs a few hundred MB, not 7 GB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.config import ModelConfig
from jaxlm.model.ops import NEG_INF, attend
from jaxlm.model.rope import apply_rope, rope_tables

QUERY_BLOCK = 16  # queries searched at once: bounds the [Tq, Hq, k, d] gather during a window prefill
LOCAL_BLOCK = 128  # query block of long local prefills (128 was the fastest on a 2-core CPU at 8K tokens)


def local_attention(q_BxTqxHqxD, k_BxSxHkvxD, v_BxSxHkvxD, mask, block: int = LOCAL_BLOCK):
    """ops.attend for masks that are causal by slot (every mask the model builds), computed in blocks
    of `block` queries: block [q0, q1) reads only the keys [0, S - Tq + q1), the last slot any of its
    queries can see (queries sit at slots index + t with index <= S - Tq, in cache mode or not).
    Head-major layouts keep the score blocks [Hkv, G, block, keys] free of transposes."""
    b, tq, hq, d = q_BxTqxHqxD.shape
    s, hkv = k_BxSxHkvxD.shape[1], k_BxSxHkvxD.shape[2]
    if tq <= block:
        return attend(q_BxTqxHqxD, k_BxSxHkvxD, v_BxSxHkvxD, mask)
    q_BxHxGxTxD = jnp.transpose(q_BxTqxHqxD.reshape(b, tq, hkv, hq // hkv, d), (0, 2, 3, 1, 4))
    k_BxHxSxD = jnp.transpose(k_BxSxHkvxD, (0, 2, 1, 3))
    v_BxHxSxD = jnp.transpose(v_BxSxHkvxD, (0, 2, 1, 3))
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]  # [B|1, 1|Hkv, 1, Tq, S]
    outs = []
    for q0 in range(0, tq, block):
        q1 = min(q0 + block, tq)
        e = s - tq + q1
        sc = jnp.einsum("bhgqd,bhkd->bhgqk", q_BxHxGxTxD[:, :, :, q0:q1], k_BxHxSxD[:, :, :e],
                        preferred_element_type=jnp.float32) * (d ** -0.5)
        sc = jnp.where(mask[..., q0:q1, :e], sc, NEG_INF)
        p = jnp.exp(sc - jnp.max(sc, axis=-1, keepdims=True))
        o = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v_BxSxHkvxD.dtype), v_BxHxSxD[:, :, :e],
                       preferred_element_type=jnp.float32)
        outs.append(o / jnp.sum(p, axis=-1, keepdims=True))
    o = jnp.transpose(jnp.concatenate(outs, axis=3), (0, 3, 1, 2, 4)).reshape(b, tq, hq, d)
    return o.astype(q_BxTqxHqxD.dtype)


def fold_queries(q_raw, wk):
    """qf [B, T, Hq, d] = W_k[:, g(j), :] q_j for un-rotated queries q_raw [B, T, Hq, D], wk [d, Hkv, D]."""
    b, t, hq, dh = q_raw.shape
    hkv = wk.shape[1]
    q = q_raw.reshape(b, t, hkv, hq // hkv, dh)
    qf = jnp.einsum("bthgk,dhk->bthgd", q, wk, preferred_element_type=jnp.float32)
    return qf.reshape(b, t, hq, wk.shape[0])


def search(qf, h, valid, k: int, approx: bool = False, recall: float = 0.95):
    """Top-k datastore entries by inner product: scores, indices [B, T, Hq, k].

    qf [B, T, Hq, d] folded queries, h [B, S, d] one layer's datastore, valid [B, S]. Invalid entries
    score NEG_INF (they are returned only when fewer than k entries are valid; callers mask them).
    approx uses jax.lax.approx_max_k (TPU's partial reduction; exact elsewhere)."""
    s = jnp.einsum("bthd,bsd->bths", qf.astype(h.dtype), h, preferred_element_type=jnp.float32)
    s = jnp.where(valid[:, None, None, :], s, NEG_INF)
    if approx:
        return jax.lax.approx_max_k(s, k, recall_target=recall)
    return jax.lax.top_k(s, k)


def _gather(x, idx):
    """x [B, S, ...], idx [B, ...I] -> [B, ...I, ...]: per-row lookup of datastore entries."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _attend(c: ModelConfig, q_raw, q, k, v, mask, h, valid, pos, wk, wv, bk, bv):
    """Retrieval + local attention for one block of queries; shapes as in `retrieval_attention`."""
    r = c.attention.retrieval
    b, tq, hq, dh = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    top = min(r.top_k, h.shape[1])
    _, idx = search(fold_queries(q_raw, wk), h, valid, top, r.approx, r.recall)  # [B, Tq, Hq, top]
    ok = _gather(valid, idx)
    xs = _gather(h, idx)  # [B, Tq, Hq, top, d]
    wk_q, wv_q = jnp.repeat(wk, g, axis=1), jnp.repeat(wv, g, axis=1)  # per query head [d, Hq, D]
    kr = jnp.einsum("bthjd,dhk->bthjk", xs, wk_q.astype(xs.dtype))
    vr = jnp.einsum("bthjd,dhk->bthjk", xs, wv_q.astype(xs.dtype))
    if bk is not None:  # [Hkv, D] biases (Qwen2), per query head
        kr = kr + jnp.repeat(bk, g, axis=0)[:, None].astype(kr.dtype)
        vr = vr + jnp.repeat(bv, g, axis=0)[:, None].astype(vr.dtype)
    cos, sin = rope_tables(c, _gather(pos, idx).reshape(b, -1))
    kr = apply_rope(kr.reshape(b, -1, 1, dh), cos, sin).reshape(kr.shape)

    scale = dh ** -0.5
    s_ret = jnp.einsum("bthk,bthjk->bthj", q, kr, preferred_element_type=jnp.float32) * scale
    s_ret = jnp.where(ok, s_ret, NEG_INF)
    qg = q.reshape(b, tq, hkv, g, dh)
    s_loc = jnp.einsum("bthgd,bshd->bthgs", qg, k, preferred_element_type=jnp.float32) * scale
    s_loc = jnp.where(mask[:, :, None, None, :], s_loc, NEG_INF).reshape(b, tq, hq, -1)
    p = jax.nn.softmax(jnp.concatenate([s_ret, s_loc], axis=-1), axis=-1)  # one softmax over both
    p_ret, p_loc = p[..., :top], p[..., top:].reshape(b, tq, hkv, g, -1)
    o = jnp.einsum("bthj,bthjk->bthk", p_ret.astype(vr.dtype), vr, preferred_element_type=jnp.float32)
    o_loc = jnp.einsum("bthgs,bshd->bthgd", p_loc.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o + o_loc.reshape(b, tq, hq, dh)).astype(q.dtype)


def retrieval_attention(c: ModelConfig, q_raw, q, k, v, mask, layer, rctx, wk, wv, bk=None, bv=None):
    """Attention output [B, Tq, Hq, D] of one layer.

    q_raw [B, Tq, Hq, D] queries before RoPE (biases included), q after; k, v [B, S, Hkv, D] the local
    cache (keys rotated), or the window's own keys outside cache mode; mask [B|1, Tq, S] the local
    causal/segment mask; layer: the (traced) layer index inside nn.scan; rctx: the datastore (module
    docstring), or {} for local attention only; wk, wv [d, Hkv, D] this layer's projections, bk, bv
    [Hkv, D] their biases or None. Layers whose slot is -1 return plain local attention: every layer
    runs the same scanned body, so the choice is a lax.cond on the layer's slot (only the taken branch
    runs).
    """
    def local():
        return local_attention(q, k, v, mask)

    if "h" not in rctx:
        return local()
    slot = rctx["slot"][layer]

    def retrieve():
        h = jax.lax.dynamic_index_in_dim(rctx["h"], jnp.maximum(slot, 0), 0, keepdims=False)
        tq = q.shape[1]
        if tq <= QUERY_BLOCK:
            return _attend(c, q_raw, q, k, v, mask, h, rctx["valid"], rctx["pos"], wk, wv, bk, bv)
        nb = -(-tq // QUERY_BLOCK)
        pad = nb * QUERY_BLOCK - tq

        def blocks(x):  # [B, Tq, ...] -> [nb, B, QUERY_BLOCK, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return jnp.moveaxis(x.reshape(x.shape[0], nb, QUERY_BLOCK, *x.shape[2:]), 1, 0)

        m = jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:])
        out = jax.lax.map(lambda a: _attend(c, a[0], a[1], k, v, a[2], h, rctx["valid"], rctx["pos"], wk, wv, bk, bv),
                          (blocks(q_raw), blocks(q), blocks(m)))
        out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], nb * QUERY_BLOCK, *q.shape[2:])
        return out[:, :tq]

    return jax.lax.cond(slot >= 0, retrieve, local)


def layer_slots(config: ModelConfig) -> np.ndarray:
    """[L] int32: the datastore row of each retrieval layer, -1 for the others."""
    slot = np.full(config.num_layers, -1, np.int32)
    for i, layer in enumerate(config.attention.retrieval.retrieval_layers(config.num_layers)):
        slot[layer] = i
    return slot


def make_datastore(config: ModelConfig, h, valid, pos) -> dict:
    """The rctx pytree from h [L_ret, B, S, d], valid [B, S] and pos [B, S] (see the module docstring)."""
    n_ret = len(config.attention.retrieval.retrieval_layers(config.num_layers))
    if h.ndim != 4 or h.shape[0] != n_ret or h.shape[-1] != config.hidden_size:
        raise ValueError(f"datastore h must be [{n_ret}, B, S, {config.hidden_size}], got {h.shape}")
    return {"h": h, "valid": jnp.asarray(valid, bool), "pos": jnp.asarray(pos, jnp.int32),
            "slot": jnp.asarray(layer_slots(config))}


def shard_datastore(rctx: dict, mesh, axis="data") -> dict:
    """Place the datastore on `mesh`, split along its length S over the mesh axis (or axes) `axis`.

    Each device holds S / n entries and scores its own; GSPMD then gathers the scores (Tq*Hq*S floats,
    d times fewer than the datastore) for the top-k and fetches the k winners' rows by a masked local
    lookup + all-reduce, so h itself never moves (as the compiled decode step shows) and inputs far
    longer than one device's memory fit. S must divide by the axis size."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    specs = {"h": P(None, None, axis, None), "valid": P(None, axis), "pos": P(None, axis), "slot": P()}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in rctx.items()}


def datastore_bytes(rctx: dict) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(rctx))
