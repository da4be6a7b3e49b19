"""Hugging Face Phi-3-family checkpoints (Phi-3-mini, Phi-3.5-mini, Phi-4-mini; model_type "phi3")
<-> jaxlm parameters.

HF stores Linear weights as [out, in]; jaxlm stores einsum kernels as [in, ...out]:
  qkv_proj [(Hq + 2 Hkv) * hd, d]  -> q [d, Hq, hd], k [d, Hkv, hd], v [d, Hkv, hd] (head-major rows)
  o_proj [d, Hq * hd]              -> o [Hq, hd, d]
  gate_up_proj [2 I, d] (gate first) -> wi [d, 2, I]   (or wi_gate, wi_up [d, I] when not fused)
  down_proj [d, I]                 -> wo [I, d]
  lm_head [V, d]                   -> lm_head [d, V] (absent when tied)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.model.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("phi3",)
MAX_SHARD_BYTES = 5 * 1024**3


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensor or field."""


# ----------------------------------------------------------------------------- config
def config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"config.json model_type {model_type!r} is not supported; jaxlm reads {SUPPORTED_MODEL_TYPES}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json hidden_act {act!r} is not supported (SwiGLU with silu only)")
    for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
        if hf.get(key):
            raise ConversionError(f"config.json {key}=true is not supported: jaxlm's Phi-3 has no biases")
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("su", "yarn"):  # Phi-3's old names for the same LongRoPE
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        raise ConversionError(f"config.json rope_scaling type {rope_type!r} is not supported (default | longrope)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or 0
    if head_dim == hf["hidden_size"] // heads:
        head_dim = 0
    vocab = hf["vocab_size"]

    def token_id(key, default):
        v = hf.get(key)
        v = v[0] if isinstance(v, list) and v else v
        return v if isinstance(v, int) and 0 <= v < vocab else default

    max_pos = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window") or 0
    kw = dict(
        vocab_size=vocab,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=rope.get(
            "original_max_position_embeddings", hf.get("original_max_position_embeddings") or max_pos),
        sliding_window=window if window and window < max_pos else 0,
        bos_token_id=token_id("bos_token_id", -1),
        eos_token_id=token_id("eos_token_id", -1),
        pad_token_id=token_id("pad_token_id", 0),
    )
    if rope_type == "longrope":
        kw.update(rope_scaling="longrope", rope_short_factor=tuple(rope["short_factor"]),
                  rope_long_factor=tuple(rope["long_factor"]))
        if rope.get("attention_factor"):
            kw["rope_attention_factor"] = float(rope["attention_factor"])
        elif rope.get("factor"):  # an explicit factor overrides max/orig in transformers
            f = float(rope["factor"])
            kw["rope_attention_factor"] = 1.0 if f <= 1 else float(
                np.sqrt(1 + np.log(f) / np.log(kw["original_max_position_embeddings"])))
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConversionError(f"config.json describes an impossible model: {e}") from e


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict:
    c = config
    hf = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope_theta,
        "partial_rotary_factor": c.partial_rotary_factor,
        "max_position_embeddings": c.max_position_embeddings,
        "original_max_position_embeddings": c.original_max_position_embeddings,
        "sliding_window": c.sliding_window or None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "initializer_range": c.init_std,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": dtype,
    }
    if c.bos_token_id >= 0:
        hf["bos_token_id"] = c.bos_token_id
    if c.eos_token_id >= 0:
        hf["eos_token_id"] = c.eos_token_id
    if c.rope_scaling == "longrope":
        hf["rope_scaling"] = {"type": "longrope", "short_factor": list(c.rope_short_factor),
                              "long_factor": list(c.rope_long_factor)}
        if c.rope_attention_factor:
            hf["rope_scaling"]["attention_factor"] = c.rope_attention_factor
    return hf


# ----------------------------------------------------------------------------- tensors
class _Tensors:
    """Lazy access to the tensors of one or more safetensors files, with clear errors."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"no *.safetensors files in {folder}")
            weight_map = {}
            for f in files:
                with safe_open(f, "np") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.folder, self.weight_map, self.used = folder, weight_map, set()

    def __contains__(self, name):
        return name in self.weight_map

    def get(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        with safe_open(self.folder / self.weight_map[name], "np") as h:
            t = h.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json")
        self.used.add(name)
        return t


def load_hf(path, dtype=None) -> tuple[ModelConfig, dict]:
    """Read a local HF Phi-3-family folder (config.json + *.safetensors, sharded or not).

    Returns (config, params) with params as numpy arrays in the jaxlm layout (dtype kept unless given).
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ConversionError(f"{cfg_file} not found")
    config = config_from_hf(json.loads(cfg_file.read_text()))
    c = config
    d, hd, hq, hkv, inter = c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads, c.intermediate_size
    ts = _Tensors(folder)

    def cast(x):
        return x if dtype is None else np.asarray(x).astype(dtype)

    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        if p + "self_attn.qkv_proj.weight" in ts:
            qkv = ts.get(p + "self_attn.qkv_proj.weight", ((hq + 2 * hkv) * hd, d))
            q, k, v = np.split(qkv, [hq * hd, (hq + hkv) * hd], axis=0)
        else:
            q = ts.get(p + "self_attn.q_proj.weight", (hq * hd, d))
            k = ts.get(p + "self_attn.k_proj.weight", (hkv * hd, d))
            v = ts.get(p + "self_attn.v_proj.weight", (hkv * hd, d))
        if p + "mlp.gate_up_proj.weight" in ts:
            gate, up = np.split(ts.get(p + "mlp.gate_up_proj.weight", (2 * inter, d)), 2, axis=0)
        else:
            gate = ts.get(p + "mlp.gate_proj.weight", (inter, d))
            up = ts.get(p + "mlp.up_proj.weight", (inter, d))
        mlp = {"wo": ts.get(p + "mlp.down_proj.weight", (d, inter)).T}
        if c.fused_mlp:
            mlp["wi"] = np.stack([gate.T, up.T], axis=1)
        else:
            mlp["wi_gate"], mlp["wi_up"] = gate.T, up.T
        layers.append({
            "attn": {
                "q": q.reshape(hq, hd, d).transpose(2, 0, 1),
                "k": k.reshape(hkv, hd, d).transpose(2, 0, 1),
                "v": v.reshape(hkv, hd, d).transpose(2, 0, 1),
                "o": ts.get(p + "self_attn.o_proj.weight", (d, hq * hd)).T.reshape(hq, hd, d),
            },
            "attn_norm": {"scale": ts.get(p + "input_layernorm.weight", (d,))},
            "mlp_norm": {"scale": ts.get(p + "post_attention_layernorm.weight", (d,))},
            "mlp": mlp,
        })
    import jax  # local: keeps this module importable for plain-numpy tooling

    params = {
        "embedding": ts.get("model.embed_tokens.weight", (c.vocab_size, d)),
        "final_norm": {"scale": ts.get("model.norm.weight", (d,))},
        "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
    }
    if not c.tie_embeddings:
        params["lm_head"] = ts.get("lm_head.weight", (c.vocab_size, d)).T
    params = jax.tree.map(lambda x: cast(np.ascontiguousarray(x)), params)
    return config, params


def to_hf_tensors(config: ModelConfig, params, dtype=None) -> dict[str, np.ndarray]:
    """jaxlm params -> {HF tensor name: numpy array}."""
    c = config
    d, hd, hq, hkv = c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads
    np_dtype = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)

    def arr(x):
        x = np.asarray(x)
        return np.ascontiguousarray(x if np_dtype is None else x.astype(np_dtype))

    lp = params["layers"]
    out = {"model.embed_tokens.weight": arr(params["embedding"]), "model.norm.weight": arr(params["final_norm"]["scale"])}
    if not c.tie_embeddings:
        out["lm_head.weight"] = arr(np.asarray(params["lm_head"]).T)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = {k: np.asarray(v[i]) for k, v in lp["attn"].items()}
        q = a["q"].transpose(1, 2, 0).reshape(hq * hd, d)
        k = a["k"].transpose(1, 2, 0).reshape(hkv * hd, d)
        v = a["v"].transpose(1, 2, 0).reshape(hkv * hd, d)
        out[p + "self_attn.qkv_proj.weight"] = arr(np.concatenate([q, k, v], axis=0))
        out[p + "self_attn.o_proj.weight"] = arr(a["o"].reshape(hq * hd, d).T)
        m = lp["mlp"]
        if "wi" in m:
            wi = np.asarray(m["wi"][i])
            gate, up = wi[:, 0].T, wi[:, 1].T
        else:
            gate, up = np.asarray(m["wi_gate"][i]).T, np.asarray(m["wi_up"][i]).T
        out[p + "mlp.gate_up_proj.weight"] = arr(np.concatenate([gate, up], axis=0))
        out[p + "mlp.down_proj.weight"] = arr(np.asarray(m["wo"][i]).T)
        out[p + "input_layernorm.weight"] = arr(lp["attn_norm"]["scale"][i])
        out[p + "post_attention_layernorm.weight"] = arr(lp["mlp_norm"]["scale"][i])
    return out


def save_hf(config: ModelConfig, params, path, dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) that
    transformers' Phi3ForCausalLM loads."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(config, params, dtype)
    saved_dtype = dtype or str(next(iter(tensors.values())).dtype)
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, saved_dtype), indent=2))
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        if cur and size + t.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.fspath(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.fspath(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
