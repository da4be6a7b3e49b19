"""The model's configuration: one frozen dataclass, hashable so that Flax modules can hold it.

The ml_collections schema (`jaxlm.config`) builds its `model` section from these fields, so every
field's default and help text live here, once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

from jaxlm import schema
from jaxlm.errors import ConfigError
from jaxlm.schema import field

ATTENTION_IMPLS = ("dense", "s2", "retrieval")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
ROPE_SCALINGS = ("none", "longrope", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
S2_KERNELS = ("auto", "xla", "pallas", "triton", "reference")

LORA_TARGET = r"layers/(attn/(q|k|v|o)|mlp/(wi|wi_gate|wi_up|wo))$"

__all__ = ["AttentionConfig", "ConfigError", "LoraConfig", "ModelConfig", "RetrievalConfig", "S2Config",
           "linear_paths"]


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Unlimiformer-style kNN-retrieval attention for inputs longer than the context (inference)."""

    SECTION: ClassVar[str] = "model.attention.retrieval"
    layers: tuple = field((), "layers that retrieve (indices); () = the upper half")
    top_k: int = field(16, "datastore entries each query head retrieves", ge=1)
    window: int = field(128, "local KV window (last input tokens + generated tokens) every layer attends", ge=1)
    overlap: int = field(64, "tokens of left context each prefill chunk re-reads from the previous one", ge=0)
    context: int = field(0, "tokens per prefill chunk (the trained context); 0 = max_position_embeddings", ge=0)
    approx: bool = field(False, "search with jax.lax.approx_max_k (fast on TPU) instead of exact top_k")
    recall: float = field(0.95, "recall target of approx_max_k", gt=0, le=1)
    max_datastore_mib: float = field(4096.0, "refuse inputs whose datastore would exceed this many MiB", gt=0)

    def __post_init__(self):
        schema.check(self)

    def retrieval_layers(self, num_layers: int) -> tuple:
        return tuple(self.layers) if self.layers else tuple(range(num_layers // 2, num_layers))


@dataclasses.dataclass(frozen=True)
class S2Config:
    """S2-Attention (Lin et al., 2024): per-head strided shards of the context plus a local window."""

    SECTION: ClassVar[str] = "model.attention.s2"
    block_size: int = field(64, "tokens per block (a power of two >= 16)", ge=16)
    local_blocks: int = field(4, "local window in blocks (the diagonal block counts)", ge=1)
    vert_stride: int = field(8, "a head attends one key block in every vert_stride outside its window", ge=1)
    homo_head: bool = field(False, "all heads share one shard (h = 0)")
    num_dense_heads: int = field(0, "the last KV heads stay dense", ge=0)
    head_sliding_offset: int = field(0, "added to the stride test; 1 = vLLM / Phi-3-small", ge=0)
    dense_layers: tuple = field((), "layers that stay dense (indices)")
    dense_every_n: int = field(0, "also make layer i dense when (i + 1) % n == 0 (Phi-3-small's 2); 0 = off", ge=0)
    kernel: str = field("auto", "the S2 kernel (jaxlm.kernels.s2_attention)", choices=S2_KERNELS)
    compressed_cache: bool = field(True, "decode with the S2-compressed KV cache (off: full cache + mask)")

    def __post_init__(self):
        schema.check(self)
        bs = self.block_size
        if bs & (bs - 1):
            raise ConfigError(f"model.attention.s2.block_size must be a power of two >= 16, got {bs}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    SECTION: ClassVar[str] = "model.attention"
    impl: str = field("dense", "attention core", choices=ATTENTION_IMPLS)
    retrieval: RetrievalConfig = field(RetrievalConfig(), "kNN-retrieval attention (impl=retrieval)")
    s2: S2Config = field(S2Config(), "S2-Attention (impl=s2)")

    def __post_init__(self):
        schema.check(self)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the linear layers that `target` matches, several named adapters routed per
    example (Phi-4-multimodal's mixture of LoRAs; jaxlm.model.lora). Per-adapter settings are tuples
    parallel to `adapters` (Phi-4-multimodal: adapters=('vision', 'speech'), ranks=(256, 320),
    alphas=(512, 640), dropouts=(0.0, 0.01))."""

    SECTION: ClassVar[str] = "model.lora"
    rank: int = field(0, "adapter rank r of every adapter (unless `ranks` says otherwise); 0 = no adapters", ge=0)
    alpha: float = field(16.0, "updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora)", gt=0)
    dropout: float = field(0.0, "dropout on each adapter's input while training", ge=0, lt=1)
    use_rslora: bool = field(False, "rank-stabilised scale alpha / sqrt(r) instead of alpha / r")
    target: str = field(LORA_TARGET, "regex (re.search) over linear-layer parameter paths that get adapters "
                        "(layers/attn/q|k|v|o, layers/mlp/wi|wi_gate|wi_up|wo)")
    adapters: tuple = field(("default",), "adapter names; adapter_ids i routes an example to adapters[i], -1 to none")
    ranks: tuple = field((), "per-adapter ranks, parallel to adapters; () = rank for all")
    alphas: tuple = field((), "per-adapter alphas, parallel to adapters; () = alpha for all")
    dropouts: tuple = field((), "per-adapter dropouts, parallel to adapters; () = dropout for all")
    rank_pattern: tuple = field((), "((regex, rank), ...): another rank for the layers a regex matches, every "
                                "adapter (PEFT's rank_pattern; the first match wins)")
    alpha_pattern: tuple = field((), "((regex, alpha), ...): another alpha for the layers a regex matches")

    def __post_init__(self):
        schema.check(self)

        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        names = self.adapters
        need(len(names) >= 1, "model.lora.adapters needs at least one name")
        for n in names:
            need(isinstance(n, str) and n.isidentifier(), f"model.lora.adapters: {n!r} is not a valid adapter name "
                 "(letters, digits, underscores)")
        need(len(set(names)) == len(names), f"model.lora.adapters {names} has a name twice")
        for key, ok, what in (("ranks", lambda v: isinstance(v, int) and v >= 1, "integers >= 1"),
                              ("alphas", lambda v: isinstance(v, int | float) and v > 0, "numbers > 0"),
                              ("dropouts", lambda v: isinstance(v, int | float) and 0 <= v < 1, "numbers in [0, 1)")):
            vals = getattr(self, key)
            need(len(vals) in (0, len(names)), f"model.lora.{key} has {len(vals)} values for {len(names)} adapters "
                 f"{names}")
            need(all(ok(v) and not isinstance(v, bool) for v in vals), f"model.lora.{key} must hold {what}, got {vals}")
        for key in ("target",):
            _compile(getattr(self, key), f"model.lora.{key}")
        for key in ("rank_pattern", "alpha_pattern"):
            for item in getattr(self, key):
                need(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                     and isinstance(item[1], int | float) and not isinstance(item[1], bool) and item[1] > 0,
                     f"model.lora.{key} entries are (regex, number > 0) pairs, got {item!r}")
                _compile(item[0], f"model.lora.{key}")
            need(key != "rank_pattern" or all(isinstance(r, int) for _, r in self.rank_pattern),
                 "model.lora.rank_pattern ranks must be integers")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def replace(self, **kw) -> LoraConfig:
        return dataclasses.replace(self, **kw)

    def settings(self, i: int, path: str):
        """(rank, scale, dropout) of adapter i on the linear layer at `path` ('layers/attn/q'), or None
        when the layer has no adapter."""
        if not self.enabled or not re.search(self.target, path):
            return None
        rank = self.ranks[i] if self.ranks else self.rank
        alpha = self.alphas[i] if self.alphas else self.alpha
        rank = next((r for rx, r in self.rank_pattern if re.search(rx, path)), rank)
        alpha = next((a for rx, a in self.alpha_pattern if re.search(rx, path)), alpha)
        scale = alpha / (math.sqrt(rank) if self.use_rslora else rank)
        return rank, float(scale), float(self.dropouts[i] if self.dropouts else self.dropout)


def _compile(rx: str, name: str):
    try:
        return re.compile(rx)
    except re.error as e:
        raise ConfigError(f"{name} {rx!r} is not a regular expression: {e}") from None


def linear_paths(config) -> tuple[str, ...]:
    """Parameter paths of the linear layers that can carry LoRA adapters."""
    mlp = ("layers/mlp/wi",) if config.fused_mlp else ("layers/mlp/wi_gate", "layers/mlp/wi_up")
    return ("layers/attn/q", "layers/attn/k", "layers/attn/v", "layers/attn/o") + mlp + ("layers/mlp/wo",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder's architecture (Phi-3 / Phi-4-mini; Llama, Mistral and Qwen2 are special cases)."""

    SECTION: ClassVar[str] = "model"
    vocab_size: int = field(512, "vocabulary size (rows of the embedding table)", ge=1)
    hidden_size: int = field(128, "model width d", ge=1)
    intermediate_size: int = field(384, "SwiGLU hidden width", ge=1)
    num_layers: int = field(4, "number of decoder blocks", ge=1)
    num_heads: int = field(4, "query heads", ge=1)
    num_kv_heads: int = field(2, "key/value heads (GQA); query head h reads kv head h // (num_heads // num_kv_heads)",
                              ge=1)
    head_dim: int = field(0, "per-head width; 0 means hidden_size // num_heads", ge=0)
    rms_norm_eps: float = field(1e-5, "RMSNorm epsilon (the norm is computed in float32)", gt=0)
    tie_embeddings: bool = field(True, "share the input embedding with the output head")
    fused_mlp: bool = field(True, "one [d, 2, I] gate/up kernel instead of two [d, I] kernels")
    qkv_bias: bool = field(False, "biases on the q, k and v projections (Qwen2)")
    rope_theta: float = field(10000.0, "RoPE base", gt=0)
    partial_rotary_factor: float = field(1.0, "fraction of head_dim that is rotated (Phi-4-mini: 0.75)", gt=0, le=1)
    rope_scaling: str = field("none", "RoPE frequency scaling", choices=ROPE_SCALINGS)
    rope_short_factor: tuple = field((), "LongRoPE per-frequency divisors used up to original_max_position_embeddings")
    rope_long_factor: tuple = field((), "LongRoPE per-frequency divisors used beyond original_max_position_embeddings")
    rope_factor: float = field(8.0, "llama3: how much longer the context is than the original", ge=1)
    rope_low_freq_factor: float = field(1.0, "llama3: wavelengths above orig/low_freq_factor are divided by factor",
                                        gt=0)
    rope_high_freq_factor: float = field(4.0, "llama3: wavelengths below orig/high_freq_factor are kept", gt=0)
    original_max_position_embeddings: int = field(4096, "LongRoPE / llama3: pretraining context length", ge=1)
    max_position_embeddings: int = field(4096, "longest supported context", ge=1)
    rope_attention_factor: float = field(0.0, "LongRoPE cos/sin scale; 0 derives sqrt(1 + ln(s)/ln(orig)), s = max/orig",
                                         ge=0)
    sliding_window: int = field(0, "attend only the last sliding_window slots (HF semantics: q - k < window); 0 = off",
                                ge=0)
    init_std: float = field(0.02, "stddev of the normal initialiser of every kernel and the embedding", gt=0)
    dtype: str = field("float32", "compute dtype (bfloat16 is the usual choice on accelerators)", choices=DTYPES)
    param_dtype: str = field("float32", "parameter storage dtype", choices=DTYPES)
    remat_policy: str = field("none", "rematerialisation per block", choices=REMAT_POLICIES)
    attention: AttentionConfig = field(AttentionConfig(), "the attention core and its options")
    lora: LoraConfig = field(LoraConfig(), "LoRA adapters (jaxlm.model.lora); off while lora.rank is 0")
    bos_token_id: int = field(-1, "token prepended to documents; -1 for none", ge=-1)
    eos_token_id: int = field(-1, "end-of-text token; -1 for none", ge=-1)
    pad_token_id: int = field(0, "padding token id (never attended: padding has segment id 0)", ge=0)

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
        return schema.to_dict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        return schema.from_dict(cls, d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        schema.check(self)

        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.num_heads % self.num_kv_heads == 0,
             f"model.num_heads {self.num_heads} is not divisible by model.num_kv_heads {self.num_kv_heads}")
        need(self.head_dim > 0 or self.hidden_size % self.num_heads == 0,
             f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}; set model.head_dim")
        need(self.rotary_dim % 2 == 0, f"model.partial_rotary_factor gives an odd rotary dim {self.rotary_dim}")
        if self.rope_scaling == "longrope":
            half = self.rotary_dim // 2
            for name in ("rope_short_factor", "rope_long_factor"):
                n = len(getattr(self, name))
                need(n == half, f"model.{name} has {n} values; longrope needs rotary_dim/2 = {half}")
        if self.rope_scaling == "llama3":
            need(self.rope_high_freq_factor > self.rope_low_freq_factor,
                 "model.rope_high_freq_factor must exceed model.rope_low_freq_factor")
        s2 = self.attention.s2
        if self.attention.impl == "s2":
            need(s2.num_dense_heads <= self.num_kv_heads,
                 f"model.attention.s2.num_dense_heads {s2.num_dense_heads} must be in [0, num_kv_heads]")
            need(all(0 <= i < self.num_layers for i in s2.dense_layers),
                 f"model.attention.s2.dense_layers {s2.dense_layers} must be layer indices below {self.num_layers}")
            need(not self.sliding_window, "model.sliding_window and S2 attention cannot be combined")
        r = self.attention.retrieval
        if self.attention.impl == "retrieval":
            need(all(0 <= i < self.num_layers for i in r.layers),
                 f"model.attention.retrieval.layers {r.layers} must be layer indices below {self.num_layers}")
            ctx = r.context or self.max_position_embeddings
            need(r.overlap < ctx, f"model.attention.retrieval.overlap {r.overlap} must be in [0, context={ctx})")
        lo = self.lora
        if lo.enabled:
            paths = linear_paths(self)
            hit = [p for p in paths if re.search(lo.target, p)]
            need(hit, f"model.lora.target {lo.target!r} matches no linear layer of this model; its linear layers "
                 f"are {', '.join(paths)}")
            for key in ("rank_pattern", "alpha_pattern"):
                for rx, _ in getattr(lo, key):
                    need(any(re.search(rx, p) for p in hit), f"model.lora.{key} regex {rx!r} matches none of the "
                         f"adapted layers {', '.join(hit)}")
            if self.attention.impl == "retrieval":
                need(not any(p.endswith(("/k", "/v")) for p in hit),
                     "model.lora.target adapts layers/attn/k or v, which retrieval attention recomputes without "
                     "adapters: merge the adapter first (jaxlm.model.lora.merge) or leave k and v out")
        need(self.pad_token_id < self.vocab_size, f"model.pad_token_id {self.pad_token_id} is outside the vocabulary")
        for name in ("bos_token_id", "eos_token_id"):
            need(getattr(self, name) < self.vocab_size,
                 f"model.{name} {getattr(self, name)} is outside the vocabulary ({self.vocab_size})")
