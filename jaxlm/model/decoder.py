"""The decoder: embed -> N x Block (nn.scan, optional nn.remat) -> RMSNorm -> head (tied or not)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model.attention import Attention
from jaxlm.model.config import ModelConfig
from jaxlm.model.layers import MLP, RMSNorm, kernel_param
from jaxlm.model.ops import dtype_of, write_rows
from jaxlm.model.rope import rope_tables

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


class Block(nn.Module):
    config: ModelConfig
    collect: bool = False  # also emit the attention input (normed hidden states) of the layer

    @nn.compact
    def __call__(self, carry, ctx, layer_xs):
        x, carried = carry
        h = RMSNorm(self.config, name="attn_norm")(x)
        a, new_cache, carried = Attention(self.config, name="attn")(h, ctx, layer_xs, carried)
        x = x + a
        x = x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x), ctx)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, carried), (new_cache, h if self.collect else None)


def positions_from_segments(segment_ids):
    """Position of each token within its run of equal segment ids (restarts at every boundary)."""
    t = jnp.arange(segment_ids.shape[1])[None, :]
    start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(start, t, 0), axis=1)
    return t - first


class Decoder(nn.Module):
    """Phi-3 / Phi-4-mini decoder.

    __call__(tokens [B, T], positions=None, segment_ids=None, cache=None, return_hidden=False,
             retrieval=None, adapter_ids=None, inputs_embeds=None)
      -> logits [B, T, V] float32 (or final hidden states), plus the updated cache when one is given.
    adapter_ids [B]: the LoRA adapter of each row (config.lora.adapters[i]; -1 none; None: the first
    adapter for every row), in training, prefill and cached decoding alike (jaxlm.model.lora); a
    'dropout' rng turns on the adapters' dropout. inputs_embeds [B, T, d]: the input embeddings to use
    instead of looking up `tokens` (multimodal features spliced in, jaxlm.model.multimodal).
    segment_ids: tokens attend only within their segment; 0 marks padding. Default positions restart
    at every segment boundary (so a packed row equals its documents run alone).
    retrieval: the datastore of kNN-retrieval attention (jaxlm.infer.retrieval), cache mode only.
    With collect=True the call also returns every layer's attention input [L, B, T, d].
    """

    config: ModelConfig
    collect: bool = False

    def setup(self):
        c = self.config
        init = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (c.vocab_size, c.hidden_size), dtype_of(c.param_dtype))
        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, prevent_cse=False, policy=REMAT[c.remat_policy])
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.collect, name="layers")
        self.final_norm = RMSNorm(c, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = kernel_param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), c)

    def embed(self, tokens):
        # gather the table's embed shards first (as FSDP does for every weight): a lookup from a table
        # sharded on both axes makes the SPMD partitioner fall back to full rematerialisation
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(dtype_of(self.config.dtype))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def logits(self, hidden):
        """Final hidden states [..., d] -> float32 logits [..., V]."""
        dt = dtype_of(self.config.dtype)
        w = self.embedding.T if self.config.tie_embeddings else self.lm_head
        out = jnp.einsum("...d,dv->...v", hidden.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(out, ("batch", "length", "vocab")) if out.ndim == 3 else out

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False, retrieval=None,
                 adapter_ids=None, inputs_embeds=None):
        b, t = tokens.shape
        if positions is None:
            if segment_ids is not None:
                positions = positions_from_segments(segment_ids)
            else:
                start = 0 if cache is None else jnp.reshape(cache["index"], (-1, 1))  # [1|B, 1]
                positions = jnp.broadcast_to(start + jnp.arange(t)[None], (b, t))
        cos, sin = rope_tables(self.config, positions)
        ctx = {"cos": cos, "sin": sin, "q_seg": segment_ids, "positions": positions}
        layer_xs = {"layer": jnp.arange(self.config.num_layers, dtype=jnp.int32)}
        carried = {}
        if cache is None:
            ctx["q_idx"] = jnp.arange(t)
        else:
            idx = cache["index"]  # a scalar, or [B]: each row's next slot (rows at different lengths)
            q_seg = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
            k_seg = write_rows(cache["segment_ids"], q_seg.astype(jnp.int32), idx)
            q_idx = (idx if jnp.ndim(idx) == 0 else idx[:, None]) + jnp.arange(t)
            ctx.update(q_idx=q_idx, q_seg=q_seg, k_seg=k_seg, index=idx)
            if "ks" in cache:  # S2-compressed: caches of two shapes, carried through the layers
                carried = {n: cache[n] for n in ("k", "v", "ks", "vs", "blk")}
            else:
                layer_xs.update(k=cache["k"], v=cache["v"])
        if retrieval is not None:
            ctx["retrieval"] = retrieval
        if adapter_ids is not None:
            ctx["adapter_ids"] = jnp.broadcast_to(jnp.asarray(adapter_ids, jnp.int32), (b,))

        x = self.embed(tokens) if inputs_embeds is None else nn.with_logical_constraint(
            inputs_embeds.astype(dtype_of(self.config.dtype)), ("batch", "length", "embed"))
        (x, carried), (new_layer_caches, collected) = self.layers((x, carried), ctx, layer_xs)
        h = self.final_norm(x)
        out = h if return_hidden else self.logits(h)
        if cache is not None:
            layer_caches = carried if carried else new_layer_caches
            out = (out, dict(layer_caches, segment_ids=ctx["k_seg"], index=cache["index"] + t))
        if self.collect:
            return out, collected
        return out
