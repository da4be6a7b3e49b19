"""The model's configuration: one frozen dataclass, hashable so that Flax modules can hold it.

The ml_collections schema (`jaxlm.config`) builds its `model` section from these fields, so every
field's default and help text live here, once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ATTENTION_IMPLS = ("dense", "s2", "retrieval")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
ROPE_SCALINGS = ("none", "longrope")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """An impossible configuration; the message names the field."""


def field(default: Any, help: str):  # noqa: A002 - "help" reads best at the call sites
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults: configs must be hashable")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Unlimiformer-style kNN-retrieval attention for inputs longer than the context (inference)."""

    layers: tuple = field((), "layers that retrieve (indices); () = the upper half")
    top_k: int = field(16, "datastore entries each query head retrieves")
    window: int = field(128, "local KV window (last input tokens + generated tokens) every layer attends")
    overlap: int = field(64, "tokens of left context each prefill chunk re-reads from the previous one")
    context: int = field(0, "tokens per prefill chunk (the trained context); 0 = max_position_embeddings")
    approx: bool = field(False, "search with jax.lax.approx_max_k (fast on TPU) instead of exact top_k")
    recall: float = field(0.95, "recall target of approx_max_k")

    def retrieval_layers(self, num_layers: int) -> tuple:
        return tuple(self.layers) if self.layers else tuple(range(num_layers // 2, num_layers))


@dataclasses.dataclass(frozen=True)
class S2Config:
    """S2-Attention (Lin et al., 2024): per-head strided shards of the context plus a local window."""

    block_size: int = field(64, "tokens per block (a power of two >= 16)")
    local_blocks: int = field(4, "local window in blocks (the diagonal block counts)")
    vert_stride: int = field(8, "a head attends one key block in every vert_stride outside its window")
    homo_head: bool = field(False, "all heads share one shard (h = 0)")
    num_dense_heads: int = field(0, "the last KV heads stay dense")
    head_sliding_offset: int = field(0, "added to the stride test; 1 = vLLM / Phi-3-small")
    dense_layers: tuple = field((), "layers that stay dense (indices)")
    dense_every_n: int = field(0, "also make layer i dense when (i + 1) % n == 0 (Phi-3-small's 2); 0 = off")
    kernel: str = field("auto", "auto | xla | pallas | triton | reference (jaxlm.kernels.s2_attention)")
    compressed_cache: bool = field(True, "decode with the S2-compressed KV cache (off: full cache + mask)")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    impl: str = field("dense", "attention core: dense | s2 | retrieval")
    retrieval: RetrievalConfig = field(RetrievalConfig(), "kNN-retrieval attention (impl=retrieval)")
    s2: S2Config = field(S2Config(), "S2-Attention (impl=s2)")


SUBCONFIGS = {"attention": AttentionConfig}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = field(512, "vocabulary size (rows of the embedding table)")
    hidden_size: int = field(128, "model width d")
    intermediate_size: int = field(384, "SwiGLU hidden width")
    num_layers: int = field(4, "number of decoder blocks")
    num_heads: int = field(4, "query heads")
    num_kv_heads: int = field(2, "key/value heads (GQA); query head h reads kv head h // (num_heads // num_kv_heads)")
    head_dim: int = field(0, "per-head width; 0 means hidden_size // num_heads")
    rms_norm_eps: float = field(1e-5, "RMSNorm epsilon (the norm is computed in float32)")
    tie_embeddings: bool = field(True, "share the input embedding with the output head")
    fused_mlp: bool = field(True, "one [d, 2, I] gate/up kernel instead of two [d, I] kernels")
    rope_theta: float = field(10000.0, "RoPE base")
    partial_rotary_factor: float = field(1.0, "fraction of head_dim that is rotated (Phi-4-mini: 0.75)")
    rope_scaling: str = field("none", "none | longrope")
    rope_short_factor: tuple = field((), "LongRoPE per-frequency divisors used up to original_max_position_embeddings")
    rope_long_factor: tuple = field((), "LongRoPE per-frequency divisors used beyond original_max_position_embeddings")
    original_max_position_embeddings: int = field(4096, "LongRoPE: pretraining context length")
    max_position_embeddings: int = field(4096, "longest supported context")
    rope_attention_factor: float = field(0.0, "LongRoPE cos/sin scale; 0 derives sqrt(1 + ln(s)/ln(orig)), s = max/orig")
    sliding_window: int = field(0, "attend only the last sliding_window slots (HF semantics: q - k < window); 0 = off")
    init_std: float = field(0.02, "stddev of the normal initialiser of every kernel and the embedding")
    dtype: str = field("float32", "compute dtype (bfloat16 is the usual choice on accelerators)")
    param_dtype: str = field("float32", "parameter storage dtype")
    remat_policy: str = field("none", "rematerialisation per block: none | full | dots | dots_no_batch | save_attn_out")
    attention: AttentionConfig = field(AttentionConfig(), "the attention core and its options")
    bos_token_id: int = field(-1, "token prepended to documents; -1 for none")
    eos_token_id: int = field(-1, "end-of-text token; -1 for none")
    pad_token_id: int = field(0, "padding token id (never attended: padding has segment id 0)")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def longrope_attention_factor(self) -> float:
        if self.rope_attention_factor:
            return self.rope_attention_factor
        s = self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    def _block_params(self) -> int:
        d, hd = self.hidden_size, self.head_size
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * self.intermediate_size
        return attn + mlp + 2 * d

    @property
    def num_params(self) -> int:
        """All parameters (a tied embedding counted once)."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else emb
        return emb + head + self.num_layers * self._block_params() + self.hidden_size

    @property
    def num_non_embedding_params(self) -> int:
        """N of the scaling-law papers: everything but the embedding and the output head."""
        return self.num_layers * self._block_params() + self.hidden_size

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token, PaLM convention (Chowdhery et al., 2022, appendix B).

        Forward = 2 * (matmul parameters, output head included, embedding lookup excluded)
                + 4 * layers * heads * head_dim * seq_len (QK^T and AV, no causal discount).
        Training counts forward + backward = 3 x forward. Used for MFU.
        """
        matmul = self.num_layers * (self._block_params() - 2 * self.hidden_size)
        matmul += self.vocab_size * self.hidden_size
        fwd = 2 * matmul + 4 * self.num_layers * self.num_heads * self.head_size * seq_len
        return float(3 * fwd if training else fwd)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model field(s): {', '.join(unknown)}")
        for k in ("rope_short_factor", "rope_long_factor"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        for k, sub in SUBCONFIGS.items():
            if k in d and not isinstance(d[k], sub):
                d[k] = _sub_from_dict(sub, d[k], f"model.{k}")
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            need(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"model.num_heads {self.num_heads} is not divisible by model.num_kv_heads {self.num_kv_heads}")
        need(self.head_dim > 0 or self.hidden_size % self.num_heads == 0,
             f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}; set model.head_dim")
        need(0.0 < self.partial_rotary_factor <= 1.0,
             f"model.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0, f"model.partial_rotary_factor gives an odd rotary dim {self.rotary_dim}")
        need(self.rope_scaling in ROPE_SCALINGS, f"unknown model.rope_scaling {self.rope_scaling!r}; choose from {ROPE_SCALINGS}")
        if self.rope_scaling == "longrope":
            half = self.rotary_dim // 2
            for name in ("rope_short_factor", "rope_long_factor"):
                n = len(getattr(self, name))
                need(n == half, f"model.{name} has {n} values; longrope needs rotary_dim/2 = {half}")
            need(self.original_max_position_embeddings > 0, "model.original_max_position_embeddings must be positive")
        need(self.attention.impl in ATTENTION_IMPLS,
             f"unknown attention impl {self.attention.impl!r} (model.attention.impl); choose from {ATTENTION_IMPLS}")
        s2 = self.attention.s2
        if self.attention.impl == "s2":
            bs = s2.block_size
            need(bs >= 16 and bs & (bs - 1) == 0, f"model.attention.s2.block_size must be a power of two >= 16, got {bs}")
            need(s2.local_blocks >= 1 and s2.vert_stride >= 1, "model.attention.s2.local_blocks and vert_stride must be >= 1")
            need(0 <= s2.num_dense_heads <= self.num_kv_heads,
                 f"model.attention.s2.num_dense_heads {s2.num_dense_heads} must be in [0, num_kv_heads]")
            need(all(0 <= i < self.num_layers for i in s2.dense_layers),
                 f"model.attention.s2.dense_layers {s2.dense_layers} must be layer indices below {self.num_layers}")
            need(s2.kernel in ("auto", "xla", "pallas", "triton", "reference"),
                 f"unknown model.attention.s2.kernel {s2.kernel!r}")
            need(not self.sliding_window, "model.sliding_window and S2 attention cannot be combined")
        r = self.attention.retrieval
        if self.attention.impl == "retrieval":
            need(all(0 <= i < self.num_layers for i in r.layers),
                 f"model.attention.retrieval.layers {r.layers} must be layer indices below {self.num_layers}")
            need(r.top_k >= 1 and r.window >= 1, "model.attention.retrieval.top_k and window must be >= 1")
            ctx = r.context or self.max_position_embeddings
            need(0 <= r.overlap < ctx,
                 f"model.attention.retrieval.overlap {r.overlap} must be in [0, context={ctx})")
        need(self.remat_policy in REMAT_POLICIES,
             f"unknown model.remat_policy {self.remat_policy!r}; choose from {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            need(getattr(self, name) in DTYPES, f"unknown model.{name} {getattr(self, name)!r}; choose from {DTYPES}")
        need(self.sliding_window >= 0, f"model.sliding_window must be >= 0, got {self.sliding_window}")
        need(0 <= self.pad_token_id < self.vocab_size, f"model.pad_token_id {self.pad_token_id} is outside the vocabulary")


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _sub_from_dict(cls, d, where: str):
    d = dict(d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {where} field(s): {', '.join(unknown)}")
    for k, v in d.items():
        default = fields[k].default
        if dataclasses.is_dataclass(default) and not dataclasses.is_dataclass(v):
            d[k] = _sub_from_dict(type(default), v, f"{where}.{k}")
        elif isinstance(v, list):
            d[k] = tuple(v)
    return cls(**d)


def help_texts(cls=ModelConfig, prefix: str = "") -> dict[str, str]:
    """Flat {dotted field name: one-line help} for the config and its sub-configs."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            out.update(help_texts(type(f.default), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f.metadata["help"]
    return out
