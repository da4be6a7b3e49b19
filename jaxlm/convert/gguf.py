"""GGUF files (llama.cpp) -> jaxlm: `load_gguf(path) -> (ModelConfig, params)`, and
`convert_gguf(path, out)`, which writes an Orbax checkpoint with the model's tokenizer and chat template.

The file is read with the `gguf` package's reader and every tensor is dequantised with its own
dequantiser (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K); others are refused by name.
GGUF names map to Hugging Face names, and the weights go through the same assembly as a HF folder
(jaxlm.convert.hf.params_from_tensors), so Llama-family models become the one decoder.

llama.cpp stores the Q and K rows of `llama` models permuted for its interleaved rotary layout
(convert_hf_to_gguf.py, `LlamaModel.permute`): within each head, row 2j + p holds what HF keeps at
row p * hd/2 + j. We undo it. `qwen2` files keep HF's layout (llama.cpp's NEOX rope).

`quantized=True` keeps Q8_0, Q4_0 and Q4_1 weights in their block form (int8 codes, fp16 scale and
offset per block of 32, jaxlm.checkpoint.is_quantized): about 4x smaller, and they load to the very
float32 values gguf's dequantiser gives (checked for every tensor; a tensor that does not
round-trip bit for bit is stored dequantised).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from jaxlm import checkpoint
from jaxlm.convert.hf import params_from_tensors
from jaxlm.errors import ConfigError, ConversionError
from jaxlm.model.config import ModelConfig

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # kept as codes + scales with quantized=True
ARCHITECTURES = {"llama": True, "qwen2": False}  # architecture -> Q/K rows permuted by llama.cpp
# GGUF tensor -> HF tensor (per layer: blk.N.X -> model.layers.N.Y)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# which GGUF tensors each quantisable jaxlm leaf is made of (a leaf stays quantised only when all are)
LEAF_SOURCES = {
    ("embedding",): ("token_embd",), ("lm_head",): ("output",),
    ("layers", "attn", "q"): ("attn_q",), ("layers", "attn", "k"): ("attn_k",), ("layers", "attn", "v"): ("attn_v",),
    ("layers", "attn", "o"): ("attn_output",), ("layers", "mlp", "wi"): ("ffn_gate", "ffn_up"),
    ("layers", "mlp", "wo"): ("ffn_down",),
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading GGUF files needs the gguf package", hint="pip install gguf") from None
    return gguf


def open_gguf(path):
    """The gguf reader of a file, with every tensor's data checked to lie inside the file."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds for a damaged file
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); is it truncated?") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConversionError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                  f"the file has {size}")
    return reader


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path="GGUF") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: GGUF architecture {arch!r} is not supported; jaxlm reads {sorted(ARCHITECTURES)}")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConversionError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return v

    if (_field(reader, f"{arch}.expert_count") or 0) > 0:
        raise ConversionError(f"{path}: mixture-of-experts GGUF models ({arch}.expert_count) are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConversionError(f"{path}: GGUF rope scaling {scaling!r} ({arch}.rope.scaling.type) is not supported")
    d, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d // heads))
    if int(_field(reader, f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise ConversionError(f"{path}: key and value head sizes differ ({arch}.attention.value_length)")
    rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ConversionError(f"{path}: partial rotary ({arch}.rope.dimension_count {rot} < head size {head_dim}) "
                              f"is not supported for GGUF {arch}")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight") if "token_embd.weight" in names else None
    vocab = int(_field(reader, f"{arch}.vocab_size", 0) or (len(tokens) if tokens else 0)
                or (int(embd.shape[-1]) if embd is not None else 0))
    ctx = int(_field(reader, f"{arch}.context_length", 4096))

    def token_id(key):
        v = _field(reader, f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < vocab else -1

    kw = dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=0 if head_dim == d // heads else head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=ctx, original_max_position_embeddings=ctx,
        bos_token_id=token_id("bos_token_id") if _field(reader, "tokenizer.ggml.add_bos_token", False) else -1,
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=max(token_id("padding_token_id"), 0),
    )
    if "rope_freqs.weight" in names:  # Llama 3.1's rope scaling, stored as per-frequency divisors
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        factors = tuple(float(x) for x in _gguf().quants.dequantize(t.data, t.tensor_type).reshape(-1))
        # LongRoPE with one set of factors (used at every length) and no attention scaling is exactly this
        kw.update(rope_scaling="longrope", rope_short_factor=factors, rope_long_factor=factors)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConversionError(f"{path}: the GGUF metadata describes an impossible model: {e}") from e


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (works on weights [out, in] and on block scales)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFTensors:
    """GGUF tensors under their HF names, dequantised (and un-permuted) on request."""

    def __init__(self, reader, config: ModelConfig, arch: str, path):
        self.config, self.path, self.permuted = config, path, ARCHITECTURES[arch]
        self.by_name = {}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue
            kind = t.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise ConversionError(f"{path}: tensor {t.name} is quantised as {kind}, which jaxlm does not read "
                                      f"(it reads {', '.join(SUPPORTED_TYPES)})")
            self.by_name[self.hf_name(t.name)] = t

    @staticmethod
    def hf_name(name: str) -> str:
        base, _, suffix = name.rpartition(".")
        if base in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[base]}.{suffix}"
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
            return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
        return "gguf:" + name  # not a tensor jaxlm knows: never asked for

    def gguf_kind(self, hf_name: str) -> str:
        return self.by_name[hf_name].tensor_type.name

    def has(self, name) -> bool:
        return name in self.by_name

    def _fix(self, name: str, w: np.ndarray) -> np.ndarray:
        if self.permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            n = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
            w = _unpermute(w, n)
        return w

    def tensor(self, name: str, shape) -> np.ndarray:
        t = self.by_name.get(name)
        if t is None:
            raise ConversionError(f"{self.path}: tensor {self.gguf_name(name)} is missing")
        try:
            w = _gguf().quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{self.path}: tensor {t.name} cannot be dequantised ({type(e).__name__}: {e})") from None
        w = np.asarray(w, np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if tuple(w.shape) != tuple(shape):
            raise ConversionError(f"{self.path}: tensor {t.name} has shape {tuple(w.shape)}, expected {tuple(shape)} "
                                  f"from the metadata")
        return self._fix(name, w)

    def blocks(self, name: str):
        """(codes int8 [out, in], scale f16 [out, in/32], offset f16 [out, in/32]) of a Q8_0 / Q4_0
        / Q4_1 tensor, or None when its dequantised values are not codes * scale + offset exactly."""
        gguf = _gguf()
        t = self.by_name[name]
        w = self.tensor(name, tuple(int(x) for x in reversed(t.shape)))  # un-permuted
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        raw = np.asarray(t.data, np.uint8).reshape(w.shape[0], -1, type_size)
        scale = raw[..., 0:2].copy().view(np.float16)[..., 0]
        offset = raw[..., 2:4].copy().view(np.float16)[..., 0] if t.tensor_type.name == "Q4_1" \
            else np.zeros_like(scale)
        scale, offset = self._fix(name, scale), self._fix(name, offset)
        wb = w.reshape(w.shape[0], -1, block)
        s32, o32 = scale.astype(np.float32)[..., None], offset.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(s32 != 0, np.rint((wb - o32) / s32), 0)
        if np.abs(codes).max(initial=0) > 127:
            return None
        codes = codes.astype(np.int8)
        if not np.array_equal(codes.astype(np.float32) * s32 + o32, wb):
            return None
        return codes.reshape(w.shape), scale, offset

    def gguf_name(self, hf_name: str) -> str:
        for g, h in GLOBAL_NAMES.items():
            if hf_name.startswith(h + "."):
                return g + hf_name[len(h):]
        parts = hf_name.split(".")
        if hf_name.startswith("model.layers.") and len(parts) > 4:
            inner = ".".join(parts[3:-1])
            g = next((k for k, v in LAYER_NAMES.items() if v == inner), inner)
            return f"blk.{parts[2]}.{g}.{parts[-1]}"
        return hf_name


class _Getter:
    def __init__(self, fn, has):
        self.fn, self.has = fn, has

    def __call__(self, name, shape):
        return self.fn(name, shape)


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set_leaf(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def load_gguf(path, *, quantized: bool = False, reader=None) -> tuple[ModelConfig, dict]:
    """(config, params) of a GGUF Llama-family model; params are float32 numpy arrays, or with
    quantized=True Q8_0/Q4_0/Q4_1 weights kept as {codes, scale, offset} blocks."""
    reader = reader or open_gguf(path)
    config = config_from_gguf(reader, path)
    arch = _field(reader, "general.architecture")
    ts = _GGUFTensors(reader, config, arch, path)
    params = params_from_tensors(config, _Getter(ts.tensor, ts.has), "llama")
    if not quantized:
        return config, params

    # which leaves can stay in block form: every layer's source tensors of a block type
    def sources(leaf_path):
        for g in LEAF_SOURCES[leaf_path]:
            if g in GLOBAL_NAMES:
                yield f"{GLOBAL_NAMES[g]}.weight"
            else:
                yield from (f"model.layers.{i}.{LAYER_NAMES[g]}.weight" for i in range(config.num_layers))

    blocks = {}
    for leaf_path in LEAF_SOURCES:
        if leaf_path == ("lm_head",) and config.tie_embeddings:
            continue
        if leaf_path == ("layers", "attn", "o") and config.head_size % 32:
            continue  # a block would straddle two heads
        names = list(sources(leaf_path))
        if not all(ts.has(n) and ts.gguf_kind(n) in BLOCK_TYPES for n in names):
            continue
        parts = {}
        for n in names:
            got = ts.blocks(n)
            if got is None:
                break
            parts[n] = got
        else:
            blocks[leaf_path] = parts
    if not blocks:
        return config, params

    def placed(k):  # the assembly applied to codes (k=0), scales (1) or offsets (2) of block leaves
        def get(name, shape):
            for parts in blocks.values():
                if name in parts:
                    return parts[name][k]
            return np.zeros(shape, np.float32)  # not a block leaf: discarded below
        return params_from_tensors(config, _Getter(get, ts.has), "llama")

    codes, scales, offsets = placed(0), placed(1), placed(2)
    for leaf_path in blocks:
        _set_leaf(params, leaf_path, {"codes": np.ascontiguousarray(_leaf(codes, leaf_path)),
                                      "scale": np.ascontiguousarray(_leaf(scales, leaf_path)),
                                      "offset": np.ascontiguousarray(_leaf(offsets, leaf_path))})
    return config, params


def convert_gguf(path, out, *, quantized: bool = False, source: dict | None = None, log=None) -> tuple:
    """Write the GGUF model as an Orbax checkpoint at `out` (a new directory), with its tokenizer
    and chat template, and beside it config.json and tokenizer.json (+ tokenizer_config.json).
    Nothing is left at `out` unless all of it was written. Returns (config, tokenizer)."""
    from jaxlm.data.tokenizer import TokenizerError, gguf_tokenizer

    out = Path(out)
    log = log or (lambda msg: None)
    reader = open_gguf(path)
    log(f"reading {path}")
    config, params = load_gguf(path, quantized=quantized, reader=reader)
    try:
        tok = gguf_tokenizer(path, reader=reader)
    except TokenizerError as e:
        raise ConversionError(str(e), hint=e.hint) from None
    # the HF type it exports as: Llama 3.1's rope_freqs only fit phi3's LongRoPE
    model_type = "qwen2" if config.qkv_bias else "phi3" if config.rope_scaling == "longrope" else "llama"
    saved = {"model": config.to_dict(),
             "convert": {"from": "gguf", "file": Path(path).name, "model_type": model_type,
                         "quantized": bool(quantized), **(source or {})}}
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        log(f"{config.num_params / 1e6:.1f}M parameters; writing the Orbax checkpoint")
        checkpoint.save_params(tmp, params, saved, tok.spec())
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        tok.save_hf(tmp, config.max_position_embeddings)
        if out.exists():
            out.rmdir()  # an empty directory (the caller refuses anything else)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config, tok
