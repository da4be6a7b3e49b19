"""Hugging Face checkpoints <-> jaxlm parameters, for the model types that are jaxlm's one decoder:
phi3 (Phi-3-mini, Phi-3.5-mini, Phi-4-mini), llama (Llama 2/3, SmolLM), mistral and qwen2.

Llama, Mistral and Qwen2 are the Phi-3 decoder with separate q/k/v and gate/up projections (Qwen2
adds q/k/v biases, Mistral a sliding window, Llama 3.1 its rope scaling); they are fused on import,
so there is one model, and split again on export.

HF stores Linear weights as [out, in]; jaxlm stores einsum kernels as [in, ...out]:
  qkv_proj [(Hq + 2 Hkv) * hd, d]  -> q [d, Hq, hd], k [d, Hkv, hd], v [d, Hkv, hd] (head-major rows)
    (or q_proj [Hq * hd, d], k_proj, v_proj; their biases [H * hd] -> q_bias [Hq, hd], ...)
  o_proj [d, Hq * hd]              -> o [Hq, hd, d]
  gate_up_proj [2 I, d] (gate first) -> wi [d, 2, I]   (or wi_gate, wi_up [d, I] when not fused)
    (or gate_proj [I, d], up_proj [I, d])
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

from jaxlm.errors import ConfigError, ConversionError
from jaxlm.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("phi3", "llama", "mistral", "qwen2")
FUSED_MODEL_TYPES = ("phi3",)  # stored with qkv_proj and gate_up_proj
ARCHITECTURES = {"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
MAX_SHARD_BYTES = 5 * 1024**3


# ----------------------------------------------------------------------------- config
def _rope_of(hf: dict) -> tuple[dict, str]:
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("su", "yarn") and hf.get("model_type") == "phi3":  # Phi-3's old names for LongRoPE
        rope_type = "longrope"
    return rope, rope_type


def config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"config.json model_type {model_type!r} is not supported; jaxlm reads {SUPPORTED_MODEL_TYPES}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json hidden_act {act!r} is not supported (SwiGLU with silu only)")
    for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
        if hf.get(key):
            raise ConversionError(f"config.json {key}=true is not supported by jaxlm's decoder "
                                  f"(it has q/k/v biases only, as Qwen2)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConversionError("config.json use_sliding_window=true is not supported (Qwen2's per-layer windows)")
    rope, rope_type = _rope_of(hf)
    allowed = {"phi3": ("default", "longrope"), "llama": ("default", "llama3")}.get(model_type, ("default",))
    if rope_type not in allowed:
        raise ConversionError(f"config.json rope_scaling type {rope_type!r} is not supported for {model_type} "
                              f"({' | '.join(allowed)})")
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
    window = (hf.get("sliding_window") or 0) if model_type in ("phi3", "mistral") else 0
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
        qkv_bias=model_type == "qwen2",
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
    elif rope_type == "llama3":
        kw.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                  rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)))
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConversionError(f"config.json describes an impossible model: {e}") from e


def default_model_type(config: ModelConfig) -> str:
    """The HF model type a jaxlm config is written as when none is asked for: qwen2 with q/k/v
    biases, llama with Llama-3 rope scaling, else phi3 (which expresses every other jaxlm model)."""
    if config.qkv_bias:
        return "qwen2"
    if config.rope_scaling == "llama3":
        return "llama"
    return "phi3"


def _check_expressible(c: ModelConfig, model_type: str) -> None:
    def refuse(why):
        raise ConversionError(f"this model cannot be written as HF {model_type}: {why}",
                              hint=f"write it as {default_model_type(c)}")

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"HF model_type {model_type!r} is not supported; jaxlm writes {SUPPORTED_MODEL_TYPES}")
    if c.qkv_bias != (model_type == "qwen2"):
        refuse("q/k/v biases exist in qwen2 only" if c.qkv_bias else "qwen2 always has q/k/v biases")
    if model_type != "phi3" and (c.partial_rotary_factor != 1.0 or c.rope_scaling == "longrope"):
        refuse("partial rotary and LongRoPE exist in phi3 only")
    if model_type != "llama" and c.rope_scaling == "llama3":
        refuse("Llama-3 rope scaling exists in llama only")
    if c.sliding_window and model_type not in ("phi3", "mistral"):
        refuse("a sliding window exists in phi3 and mistral only")


def config_to_hf(config: ModelConfig, dtype: str = "float32", model_type: str | None = None) -> dict:
    c = config
    model_type = model_type or default_model_type(c)
    _check_expressible(c, model_type)
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
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
        "max_position_embeddings": c.max_position_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": dtype,
    }
    if model_type == "phi3":
        hf.update(partial_rotary_factor=c.partial_rotary_factor, attention_bias=False, resid_pdrop=0.0,
                  embd_pdrop=0.0, original_max_position_embeddings=c.original_max_position_embeddings,
                  sliding_window=c.sliding_window or None)
    elif model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        hf.update(sliding_window=c.sliding_window or None)
    elif model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    if c.bos_token_id >= 0:
        hf["bos_token_id"] = c.bos_token_id
    if c.eos_token_id >= 0:
        hf["eos_token_id"] = c.eos_token_id
    if c.rope_scaling == "longrope":
        hf["rope_scaling"] = {"type": "longrope", "short_factor": list(c.rope_short_factor),
                              "long_factor": list(c.rope_long_factor)}
        if c.rope_attention_factor:
            hf["rope_scaling"]["attention_factor"] = c.rope_attention_factor
    elif c.rope_scaling == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_factor,
                              "low_freq_factor": c.rope_low_freq_factor, "high_freq_factor": c.rope_high_freq_factor,
                              "original_max_position_embeddings": c.original_max_position_embeddings}
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


def params_from_tensors(config: ModelConfig, get, model_type: str = "llama") -> dict:
    """jaxlm params (numpy, stacked over layers) from HF-named tensors: `get(name, shape)` returns
    the tensor of that name in HF's [out, in] layout (and raises when it is missing or misshapen).

    Every reshape keeps the input features as one axis (-1), so the same assembly also places
    per-block quantisation scales ([out, in / block]) wherever their weights go (jaxlm.convert.gguf).
    A missing tensor is named as `model_type` stores it (qkv_proj in phi3, q_proj in llama)."""
    c = config
    d, hd, hq, hkv, inter = c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads, c.intermediate_size
    fused = model_type in FUSED_MODEL_TYPES
    has = getattr(get, "has", None)  # without it, read the tensors `model_type` stores

    def read_fused(fused_name, unfused_name) -> bool:
        if has is not None and (has(fused_name) or has(unfused_name)):
            return has(fused_name)
        return fused  # neither: the error names the tensor this model type stores

    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        qkv_name, gate_up_name = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
        if read_fused(qkv_name, p + "self_attn.q_proj.weight"):
            q, k, v = np.split(get(qkv_name, ((hq + 2 * hkv) * hd, d)), [hq * hd, (hq + hkv) * hd], axis=0)
        else:
            q = get(p + "self_attn.q_proj.weight", (hq * hd, d))
            k = get(p + "self_attn.k_proj.weight", (hkv * hd, d))
            v = get(p + "self_attn.v_proj.weight", (hkv * hd, d))
        if read_fused(gate_up_name, p + "mlp.gate_proj.weight"):
            gate, up = np.split(get(gate_up_name, (2 * inter, d)), 2, axis=0)
        else:
            gate = get(p + "mlp.gate_proj.weight", (inter, d))
            up = get(p + "mlp.up_proj.weight", (inter, d))
        mlp = {"wo": get(p + "mlp.down_proj.weight", (d, inter)).T}
        if c.fused_mlp:
            mlp["wi"] = np.stack([gate.T, up.T], axis=1)
        else:
            mlp["wi_gate"], mlp["wi_up"] = gate.T, up.T
        o = get(p + "self_attn.o_proj.weight", (d, hq * hd))
        attn = {
            "q": q.reshape(hq, hd, -1).transpose(2, 0, 1),
            "k": k.reshape(hkv, hd, -1).transpose(2, 0, 1),
            "v": v.reshape(hkv, hd, -1).transpose(2, 0, 1),
            "o": o.T.reshape(hq, -1, o.shape[0]),
        }
        if c.qkv_bias:
            attn["q_bias"] = get(p + "self_attn.q_proj.bias", (hq * hd,)).reshape(hq, hd)
            attn["k_bias"] = get(p + "self_attn.k_proj.bias", (hkv * hd,)).reshape(hkv, hd)
            attn["v_bias"] = get(p + "self_attn.v_proj.bias", (hkv * hd,)).reshape(hkv, hd)
        layers.append({
            "attn": attn,
            "attn_norm": {"scale": get(p + "input_layernorm.weight", (d,))},
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight", (d,))},
            "mlp": mlp,
        })
    params = {
        "embedding": get("model.embed_tokens.weight", (c.vocab_size, d)),
        "final_norm": {"scale": get("model.norm.weight", (d,))},
        "layers": {key: _stack([layer[key] for layer in layers]) for key in layers[0]},
    }
    if not c.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (c.vocab_size, d)).T
    return params


def _stack(trees: list) -> dict | np.ndarray:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def load_hf(path, dtype=None) -> tuple[ModelConfig, dict]:
    """Read a local HF folder (config.json + *.safetensors, sharded or not) of model_type phi3,
    llama, mistral or qwen2.

    Returns (config, params) with params as numpy arrays in the jaxlm layout (dtype kept unless given).
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ConversionError(f"{cfg_file} not found")
    hf_config = json.loads(cfg_file.read_text())
    config = config_from_hf(hf_config)
    params = params_from_tensors(config, _Getter(_Tensors(folder)), hf_config["model_type"])

    def finish(x):
        x = np.ascontiguousarray(x)
        return x if dtype is None else x.astype(dtype)

    return config, _map(finish, params)


class _Getter:
    """`get(name, shape)` over a folder's tensors, with the membership test `has(name)`."""

    def __init__(self, ts: _Tensors):
        self.ts = ts

    def __call__(self, name, shape):
        return self.ts.get(name, shape)

    def has(self, name) -> bool:
        return name in self.ts


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def model_type_of(path) -> str:
    """The model_type of a HF folder's config.json."""
    return json.loads((Path(path) / "config.json").read_text()).get("model_type", "")


def to_hf_tensors(config: ModelConfig, params, dtype=None, model_type: str | None = None) -> dict[str, np.ndarray]:
    """jaxlm params -> {HF tensor name: numpy array}, named as `model_type` stores them (fused
    qkv_proj / gate_up_proj for phi3, separate projections for llama, mistral and qwen2)."""
    c = config
    model_type = model_type or default_model_type(c)
    _check_expressible(c, model_type)
    fused = model_type in FUSED_MODEL_TYPES
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
        if fused:
            out[p + "self_attn.qkv_proj.weight"] = arr(np.concatenate([q, k, v], axis=0))
        else:
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = arr(q), arr(k)
            out[p + "self_attn.v_proj.weight"] = arr(v)
        if c.qkv_bias:
            for name in ("q", "k", "v"):
                out[p + f"self_attn.{name}_proj.bias"] = arr(a[f"{name}_bias"].reshape(-1))
        out[p + "self_attn.o_proj.weight"] = arr(a["o"].reshape(hq * hd, d).T)
        m = lp["mlp"]
        if "wi" in m:
            wi = np.asarray(m["wi"][i])
            gate, up = wi[:, 0].T, wi[:, 1].T
        else:
            gate, up = np.asarray(m["wi_gate"][i]).T, np.asarray(m["wi_up"][i]).T
        if fused:
            out[p + "mlp.gate_up_proj.weight"] = arr(np.concatenate([gate, up], axis=0))
        else:
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = arr(gate), arr(up)
        out[p + "mlp.down_proj.weight"] = arr(np.asarray(m["wo"][i]).T)
        out[p + "input_layernorm.weight"] = arr(lp["attn_norm"]["scale"][i])
        out[p + "post_attention_layernorm.weight"] = arr(lp["mlp_norm"]["scale"][i])
    return out


def special_token_ids(config: ModelConfig, tokenizer) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json: eos lists every token that ends a
    reply (so HF generate stops where jaxlm's does); the model config's own ids come first."""
    eos = [config.eos_token_id] if config.eos_token_id >= 0 else []
    eos += [t for t in tokenizer.stop_ids if t not in eos]
    out = {"pad_token_id": tokenizer.pad_id if tokenizer.pad_id >= 0 else config.pad_token_id}
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    bos = config.bos_token_id if config.bos_token_id >= 0 else getattr(tokenizer, "bos_id", -1)
    if bos is not None and bos >= 0:
        out["bos_token_id"] = bos
    return out


def save_hf(config: ModelConfig, params, path, dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
            tokenizer=None, model_type: str | None = None):
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) that
    transformers loads as `model_type` (phi3 | llama | mistral | qwen2; default: `default_model_type`);
    with `tokenizer` (a jaxlm Tokenizer) also its files (tokenizer.json, tokenizer_config.json with
    the chat template) and generation_config.json, with the special-token ids in config.json, so the
    folder works on its own."""
    model_type = model_type or default_model_type(config)
    tensors = to_hf_tensors(config, params, dtype, model_type)  # refuses an impossible model_type first
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    saved_dtype = dtype or str(next(iter(tensors.values())).dtype)
    hf_config = config_to_hf(config, saved_dtype, model_type)
    if tokenizer is not None:
        tokenizer.save_hf(folder, config.max_position_embeddings)
        ids = special_token_ids(config, tokenizer)
        hf_config.update(ids)
        (folder / "generation_config.json").write_text(json.dumps({**ids, "_from_model_config": False}, indent=2))
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
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
