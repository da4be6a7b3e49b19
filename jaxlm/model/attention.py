"""The one Attention module: projections, RoPE, GQA, and a core chosen by `config.attention.impl`
(dense | s2 | retrieval). Masks follow `jaxlm.model.ops` (slots and segments)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlm.model import lora, retrieval, s2
from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import bias_param, kernel_param
from jaxlm.model.ops import attend, attention_mask, dtype_of, write_rows
from jaxlm.model.rope import apply_rope


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, ctx, layer_xs, carried=None):
        """x [B, T, d] -> ([B, T, d], new layer cache or None, carried).

        ctx (shared by all layers) holds cos, sin [B, T, R/2], q_idx [T], q_seg [B, T] or None, and in
        cache mode `index` (the first slot written: a scalar, or [B] when rows are at different lengths)
        and k_seg [B, S] (segment ids of the updated cache); q_idx is then [B, T]; with LoRA adapters,
        `adapter_ids` [B] routes each row (jaxlm.model.lora; absent: the first adapter);
        with retrieval, `retrieval` (see jaxlm.model.retrieval). layer_xs (this layer's slice of the
        scan) holds `layer` (the layer index) and, in cache mode, this layer's cache `k`, `v`.
        carried: caches that travel in the scan's carry (the S2-compressed cache, jaxlm.model.s2).
        """
        c = self.config
        dt = dtype_of(c.dtype)
        hd, d = c.head_size, c.hidden_size
        wq = kernel_param(self, "q", (d, c.num_heads, hd), ("embed", "heads", "head_dim"), c)
        wk = kernel_param(self, "k", (d, c.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), c)
        wv = kernel_param(self, "v", (d, c.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), c)
        wo = kernel_param(self, "o", (c.num_heads, hd, d), ("heads", "head_dim", "embed"), c)

        adapters = lora.Lora(c, "layers/attn", name="lora") if lora.targets(c, "layers/attn") else None

        def project(layer, eq, x, w, axes):  # x w, plus the routed LoRA updates of this layer (if any)
            y = jnp.einsum(eq, x, w.astype(dt))
            return adapters(layer, x, y, axes, 0, ctx) if adapters else y

        x = x_BxTxD.astype(dt)
        q_raw = project("q", "btd,dhk->bthk", x, wq, ("embed", "heads", "head_dim"))
        k = project("k", "btd,dhk->bthk", x, wk, ("embed", "kv_heads", "head_dim"))
        v = project("v", "btd,dhk->bthk", x, wv, ("embed", "kv_heads", "head_dim"))
        bk = bv = None
        if c.qkv_bias:  # Qwen2
            q_raw = q_raw + bias_param(self, "q_bias", (c.num_heads, hd), ("heads", "head_dim"), c).astype(dt)
            bk = bias_param(self, "k_bias", (c.num_kv_heads, hd), ("kv_heads", "head_dim"), c).astype(dt)
            bv = bias_param(self, "v_bias", (c.num_kv_heads, hd), ("kv_heads", "head_dim"), c).astype(dt)
            k, v = k + bk, v + bv
        q = nn.with_logical_constraint(q_raw, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rope(q, ctx["cos"], ctx["sin"])
        k = apply_rope(k, ctx["cos"], ctx["sin"])

        new_cache = None
        carried = carried if carried is not None else {}
        compressed = "ks" in carried
        if compressed:  # S2-compressed cache: the mask over the (dense layers') full-length slots
            mask = attention_mask(ctx["q_idx"], jnp.arange(ctx["k_seg"].shape[1]), ctx["q_seg"], ctx["k_seg"])
        elif "k" in layer_xs:
            kc = write_rows(layer_xs["k"], k, ctx["index"])  # index: one slot, or per row [B]
            vc = write_rows(layer_xs["v"], v, ctx["index"])
            new_cache = {"k": kc, "v": vc}
            k, v = kc.astype(dt), vc.astype(dt)
            mask = attention_mask(ctx["q_idx"], jnp.arange(kc.shape[1]), ctx["q_seg"], ctx["k_seg"],
                                  window=c.sliding_window)
        else:
            mask = attention_mask(ctx["q_idx"], ctx["q_idx"], ctx["q_seg"], ctx["q_seg"], window=c.sliding_window)

        impl = c.attention.impl
        if impl == "retrieval" and "retrieval" in ctx:
            o = retrieval.retrieval_attention(c, q_raw, q, k, v, mask, layer_xs["layer"], ctx["retrieval"],
                                              wk.astype(dt), wv.astype(dt), bk, bv)
        elif impl == "s2":
            if compressed:
                o, carried = s2.compressed_core(c, q, k, v, mask, ctx, layer_xs["layer"], carried,
                                                ctx["k_seg"].shape[1])
            elif "k" in layer_xs:
                o = s2.full_cache_core(c, q, k, v, mask, ctx, layer_xs["layer"])
            else:
                o = s2.train_core(c, q, k, v, mask, ctx["q_seg"], layer_xs["layer"])
        else:  # dense, and retrieval models without a datastore (training, short inputs)
            o = attend(q, k, v, mask)
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "head_dim"))
        o = checkpoint_name(o, "attn_out")
        y = project("o", "bthk,hkd->btd", o, wo, ("heads", "head_dim", "embed"))
        return nn.with_logical_constraint(y, ("batch", "length", "embed")), new_cache, carried
