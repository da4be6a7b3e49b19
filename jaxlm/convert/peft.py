"""PEFT LoRA adapters <-> jaxlm adapters, exactly, and Phi-4-multimodal's in-model layout.

PEFT stores, per HF module and decoder layer, lora_A.weight [r, in] and lora_B.weight [out, r]
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and scales by lora_alpha / r
(/ sqrt(r) with use_rslora; rank_pattern and alpha_pattern change both per module). jaxlm's layers
(jaxlm.model.lora) map onto HF modules as `parts_of` says:

  llama, mistral, qwen2   q_proj -> attn/q, k_proj -> attn/k, v_proj -> attn/v, o_proj -> attn/o,
                          gate_proj -> mlp/wi (gate half), up_proj -> mlp/wi (up half), down_proj -> mlp/wo
  phi3                    qkv_proj -> attn/q, k, v (one A, copied into each; B split by rows),
                          o_proj -> attn/o, gate_up_proj -> mlp/wi (both halves), down_proj -> mlp/wo

(the unfused MLP's wi_gate / wi_up take the gate and up parts). Writing back, a fused HF module whose
parts share one A (as imported) gets it once; parts with different A (trained in jaxlm) become one
LoRA of rank r_q + r_k + r_v with a block-diagonal B, exact, declared in rank_pattern / alpha_pattern.
Different scales of the parts of one module are folded into B.

Phi-4-multimodal keeps its adapters inside the model folder: `…qkv_proj.base_layer.weight`,
`…qkv_proj.lora_A.vision.weight`, `…lora_B.speech.weight`, with r, lora_alpha and dropout in
config.json's vision_lora / speech_lora (`load_in_model`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.convert.hf import (
    FUSED_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    _Tensors,
    config_from_hf,
    params_from_tensors,
)
from jaxlm.errors import ConversionError
from jaxlm.model import lora
from jaxlm.model.config import LoraConfig, ModelConfig

PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.(\w+))?\.weight$")

__all__ = ["from_peft", "load_adapter", "load_in_model", "save_peft", "to_peft"]


# ----------------------------------------------------------------------------- the module map
def _shapes(c: ModelConfig) -> dict:
    """jaxlm layer -> (input shape, output shape, number of groups (0: none))."""
    d, hd, hq, hkv, m = c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads, c.intermediate_size
    return {"attn/q": ((d,), (hq, hd), 0), "attn/k": ((d,), (hkv, hd), 0), "attn/v": ((d,), (hkv, hd), 0),
            "attn/o": ((hq, hd), (d,), 0), "mlp/wi": ((d,), (m,), 2), "mlp/wi_gate": ((d,), (m,), 0),
            "mlp/wi_up": ((d,), (m,), 0), "mlp/wo": ((m,), (d,), 0)}


def parts_of(c: ModelConfig, model_type: str) -> dict:
    """HF module ('self_attn.qkv_proj') -> [(jaxlm layer, group index or None, number of output rows)],
    in the order of the module's output rows."""
    d, hd, hq, hkv, m = c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads, c.intermediate_size
    gate = ("mlp/wi", 0, m) if c.fused_mlp else ("mlp/wi_gate", None, m)
    up = ("mlp/wi", 1, m) if c.fused_mlp else ("mlp/wi_up", None, m)
    table = {"self_attn.o_proj": [("attn/o", None, d)], "mlp.down_proj": [("mlp/wo", None, d)]}
    if model_type in FUSED_MODEL_TYPES:
        table["self_attn.qkv_proj"] = [("attn/q", None, hq * hd), ("attn/k", None, hkv * hd), ("attn/v", None, hkv * hd)]
        table["mlp.gate_up_proj"] = [gate, up]
    else:
        table.update({"self_attn.q_proj": [("attn/q", None, hq * hd)], "self_attn.k_proj": [("attn/k", None, hkv * hd)],
                      "self_attn.v_proj": [("attn/v", None, hkv * hd)], "mlp.gate_proj": [gate], "mlp.up_proj": [up]})
    return table


def _in_features(c: ModelConfig, layer: str) -> int:
    return math.prod(_shapes(c)[layer][0])


def _check_model_type(model_type: str):
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"HF model_type {model_type!r} is not supported; jaxlm reads {SUPPORTED_MODEL_TYPES}")


# ----------------------------------------------------------------------------- HF modules -> jaxlm
def _scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def from_modules(c: ModelConfig, model_type: str, modules: dict, where: str) -> dict:
    """HF-side adapter {module: (A [L, r, in], B [L, out, r], scale)} -> jaxlm sites
    {layer ('attn/q'): (A in + group + [r] over L, B [r] + group + out over L, rank, scale)}."""
    parts = parts_of(c, model_type)
    shapes = _shapes(c)
    collected: dict[str, dict] = {}
    for module, (a, b, scale) in modules.items():
        if module not in parts:
            _architecture_error(module, model_type, parts, where)
        rows = 0
        for layer, g, n in parts[module]:
            collected.setdefault(layer, {})[g] = (a, b[:, rows:rows + n], scale)
            rows += n
    sites = {}
    for layer, by_group in collected.items():
        in_shape, out_shape, n_groups = shapes[layer]
        groups = list(range(n_groups)) if n_groups else [None]
        rank = max(a.shape[1] for a, _, _ in by_group.values())
        scale = next(iter(by_group.values()))[2]
        nl = next(iter(by_group.values()))[0].shape[0]
        a_out = np.zeros((nl,) + in_shape + ((n_groups,) if n_groups else ()) + (rank,), np.float32)
        b_out = np.zeros((nl, rank) + ((n_groups,) if n_groups else ()) + out_shape, np.float32)
        for g in groups:
            if g not in by_group:
                continue  # e.g. gate_proj adapted but not up_proj: that half stays zero
            a, b, s = by_group[g]
            r = a.shape[1]
            a_j = np.swapaxes(a, 1, 2).reshape((nl,) + in_shape + (r,))
            b_j = np.swapaxes(b, 1, 2).reshape((nl, r) + out_shape) * np.float32(s / scale)
            if g is None:
                a_out[..., :r], b_out[:, :r] = a_j, b_j
            else:
                a_out[..., g, :r], b_out[:, :r, g] = a_j, b_j
        sites[layer] = (a_out, b_out, rank, scale)
    return sites


def _architecture_error(module: str, model_type: str, parts: dict, where: str):
    other = "phi3" if module in ("self_attn.qkv_proj", "mlp.gate_up_proj") else "llama, mistral or qwen2"
    raise ConversionError(f"{where}: it adapts {module}, which a {model_type} model does not have (its modules: "
                          f"{', '.join(sorted(parts))}); the adapter was made for another architecture ({other}?)")


def lora_config(sites_by_adapter: dict, rslora: bool, dropouts: dict) -> LoraConfig:
    """The LoraConfig that gives every site its rank and scale: per-adapter rank and alpha of the
    most common site, rank_pattern / alpha_pattern for the others (single adapter only)."""
    names = tuple(sites_by_adapter)
    ranks, alphas, rank_pat, alpha_pat = [], [], [], []
    for name, sites in sites_by_adapter.items():
        rs = Counter((r, s) for _, _, r, s in sites.values()).most_common(1)[0][0]
        ranks.append(rs[0])
        alphas.append(rs[1] * (math.sqrt(rs[0]) if rslora else rs[0]))
        odd = {layer: (r, s) for layer, (_, _, r, s) in sites.items() if (r, s) != rs}
        if odd and len(names) > 1:
            raise ConversionError(f"adapter {name!r} has layers of different ranks or scales; jaxlm's per-layer "
                                  "patterns apply to every adapter, so load it alone")
        for layer, (r, s) in sorted(odd.items()):
            rank_pat.append((f"^layers/{layer}$", r))
            alpha_pat.append((f"^layers/{layer}$", s * (math.sqrt(r) if rslora else r)))
    layers = sorted({layer for sites in sites_by_adapter.values() for layer in sites})
    target = "^layers/(" + "|".join(re.escape(x) for x in layers) + ")$"
    one = len(set(ranks)) == 1 and len(set(alphas)) == 1
    drops = tuple(float(dropouts[n]) for n in names)
    return LoraConfig(rank=ranks[0], alpha=float(alphas[0]), use_rslora=rslora, target=target, adapters=names,
                      ranks=() if one else tuple(ranks), alphas=() if one else tuple(float(a) for a in alphas),
                      dropout=drops[0], dropouts=() if len(set(drops)) == 1 else drops,
                      rank_pattern=tuple(rank_pat), alpha_pattern=tuple(alpha_pat))


def adapter_tree(name: str, sites: dict) -> dict:
    """jaxlm params of one adapter: {'layers': {'attn': {'lora': {name: {'q_a': ..., 'q_b': ...}}}, ...}}."""
    tree: dict = {"layers": {}}
    for layer, (a, b, _, _) in sites.items():
        owner, kernel = layer.split("/")
        node = tree["layers"].setdefault(owner, {"lora": {name: {}}})["lora"][name]
        node[f"{kernel}_a"], node[f"{kernel}_b"] = a, b
    return tree


def _read_modules(tensors: dict, c: ModelConfig, adapter: str | None, where: str, strict: bool = True) -> dict:
    """{module: {layer index: {'A': loader, 'B': loader}}} of one adapter's tensors. A LoRA tensor
    outside the decoder layers' linear layers is an error (`strict`: anywhere; else under model.layers)."""
    out: dict = {}
    for key, get in tensors.items():
        m = _KEY.match(key)
        if not m:
            if "lora_" in key and (strict or re.match(r"^(base_model\.model\.)?model\.layers\.", key)):
                raise ConversionError(f"{where}: tensor {key} adapts a module outside the decoder layers' linear "
                                      "layers (jaxlm's adapters cover q, k, v, o and the MLP only)")
            continue
        layer, parent, mod, ab, name = m.groups()
        if name != adapter:
            continue
        if int(layer) >= c.num_layers:
            raise ConversionError(f"{where}: tensor {key} is for layer {layer}, but the base model has "
                                  f"{c.num_layers} layers")
        out.setdefault(f"{parent}.{mod}", {}).setdefault(int(layer), {})[ab] = get
    return out


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rule: the first pattern key with re.match(rf'(.*\\.)?({key})$', module) wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_key):
            return value
    return default


def _stack_modules(c: ModelConfig, model_type: str, raw: dict, settings, where: str) -> dict:
    """{module: (A [L, r, in], B [L, out, r], scale)} with every shape checked; `settings(module_key)`
    gives (rank, alpha, rslora) from the adapter's config."""
    parts = parts_of(c, model_type)
    out = {}
    for module, layers in sorted(raw.items()):
        if module not in parts:
            _architecture_error(module, model_type, parts, where)
        missing = sorted(set(range(c.num_layers)) - set(layers))
        if missing:
            raise ConversionError(f"{where}: {module} has adapters in layers {sorted(layers)} but not in {missing}; "
                                  "jaxlm's layers share one shape, so every layer needs one")
        in_f = _in_features(c, parts[module][0][0])
        out_f = sum(n for _, _, n in parts[module])
        rank = None
        a_all, b_all = [], []
        for i in range(c.num_layers):
            ab = layers[i]
            name = f"model.layers.{i}.{module}"
            if "A" not in ab or "B" not in ab:
                raise ConversionError(f"{where}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
            a, b = np.asarray(ab["A"](), np.float32), np.asarray(ab["B"](), np.float32)
            if a.ndim != 2 or a.shape[1] != in_f:
                raise ConversionError(f"{where}: {name}.lora_A has shape {a.shape}; the base model's {module} takes "
                                      f"{in_f} input features (an adapter for another model?)")
            if b.ndim != 2 or b.shape[0] != out_f:
                raise ConversionError(f"{where}: {name}.lora_B has shape {b.shape}; the base model's {module} gives "
                                      f"{out_f} output features (an adapter for another model?)")
            r_cfg, alpha, rslora = settings(name)
            if a.shape[0] != b.shape[1] or a.shape[0] != r_cfg:
                raise ConversionError(f"{where}: rank mismatch in {name}: lora_A has rank {a.shape[0]}, lora_B rank "
                                      f"{b.shape[1]}, the adapter config r={r_cfg}")
            if rank is not None and a.shape[0] != rank:
                raise ConversionError(f"{where}: {module} has rank {rank} in layer 0 but {a.shape[0]} in layer {i}; "
                                      "jaxlm's layers share one shape")
            rank = a.shape[0]
            a_all.append(a)
            b_all.append(b)
        out[module] = (np.stack(a_all), np.stack(b_all), _scale(rank, alpha, rslora))
    return out


# ----------------------------------------------------------------------------- PEFT folders
def _open_tensors(folder: Path) -> dict:
    """{key: loader} of a safetensors file, lazily (a .bin pickle is refused: never unpickled)."""
    f = folder / "adapter_model.safetensors"
    if not f.exists():
        if (folder / "adapter_model.bin").exists():
            raise ConversionError(f"{folder} holds adapter_model.bin, a pickle, which jaxlm never loads",
                                  hint="re-save it with safetensors (peft's save_pretrained does by default)")
        raise ConversionError(f"no adapter_model.safetensors in {folder}")
    with safe_open(f, "np") as h:
        keys = list(h.keys())

    def loader(k):
        def load():
            with safe_open(f, "np") as h:
                return h.get_tensor(k)
        return load

    return {k: loader(k) for k in keys}


def _read_adapter_config(folder: Path) -> dict:
    f = folder / "adapter_config.json"
    if not f.exists():
        raise ConversionError(f"no adapter_config.json in {folder}")
    cfg = json.loads(f.read_text())
    where = str(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(cfg.get(key)) != ok:
            raise ConversionError(f"{where}: {key}={cfg.get(key)} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ConversionError(f"{where}: bias={cfg['bias']!r} is not supported (LoRA without bias terms only)")
    if cfg.get("modules_to_save"):
        raise ConversionError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported (adapters only)")
    return cfg


def from_peft(config: ModelConfig, model_type: str, folder, name: str = "default") -> tuple[ModelConfig, dict]:
    """(config with the adapter, adapter params) of a PEFT LoRA folder for a base of `model_type`."""
    _check_model_type(model_type)
    folder = Path(folder)
    acfg = _read_adapter_config(folder)
    where = f"adapter {folder}"
    raw = _read_modules(_open_tensors(folder), config, None, where)
    if not raw:
        raise ConversionError(f"{where} holds no LoRA tensors of the decoder layers")
    r, alpha, rslora = int(acfg.get("r", 8)), float(acfg.get("lora_alpha", 8)), bool(acfg.get("use_rslora"))

    def settings(module_key):
        return (int(_pattern_value(acfg.get("rank_pattern"), module_key, r)),
                float(_pattern_value(acfg.get("alpha_pattern"), module_key, alpha)), rslora)

    modules = _stack_modules(config, model_type, raw, settings, where)
    sites = from_modules(config, model_type, modules, where)
    lcfg = lora_config({name: sites}, rslora, {name: float(acfg.get("lora_dropout", 0.0))})
    try:
        new = config.replace(lora=lcfg)
    except Exception as e:
        raise ConversionError(f"{where}: {e}") from e
    return new, adapter_tree(name, sites)


def load_adapter(base_folder, adapter_folder, name: str = "default", dtype=None) -> tuple[ModelConfig, dict]:
    """A HF base folder plus a PEFT adapter folder -> (config, params with the adapter)."""
    from jaxlm.convert.hf import load_hf, model_type_of

    config, params = load_hf(base_folder, dtype=dtype)
    cfg, ad = from_peft(config, model_type_of(base_folder), adapter_folder, name)
    if dtype is not None:
        ad = _map(lambda x: x.astype(dtype), ad)
    return cfg, lora.join(params, ad)


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


# ----------------------------------------------------------------------------- jaxlm -> PEFT
def _sites_of(config: ModelConfig, params, name: str) -> dict:
    """{layer: (A, B, rank, scale)} of adapter `name` in jaxlm params."""
    i = lora.index(config, name)
    sites = {}
    for owner in ("attn", "mlp"):
        node = params.get("layers", {}).get(owner, {}).get("lora", {}).get(name, {})
        for key in node:
            if key.endswith("_a"):
                layer = f"{owner}/{key[:-2]}"
                s = config.lora.settings(i, f"layers/{layer}")
                if s is None:
                    raise ConversionError(f"adapter {name!r} has weights on layers/{layer}, which model.lora.target "
                                          "does not adapt")
                sites[layer] = (np.asarray(node[key], np.float32), np.asarray(node[key[:-2] + "_b"], np.float32),
                                s[0], s[1])
    if not sites:
        raise ConversionError(f"the params hold no weights of adapter {name!r}")
    return sites


def to_modules(config: ModelConfig, model_type: str, sites: dict) -> dict:
    """jaxlm sites -> HF-side {module: (A [L, r, in], B [L, out, r], scale)}, exact (see the module doc)."""
    _check_model_type(model_type)
    out = {}
    for module, parts in parts_of(config, model_type).items():
        got = []
        for layer, g, _n in parts:
            if layer not in sites:
                got.append(None)
                continue
            a, b, r, s = sites[layer]
            nl = a.shape[0]
            if g is not None:
                a, b = a[..., g, :], b[:, :, g]
            a_hf = np.swapaxes(a.reshape(nl, -1, r), 1, 2)  # [L, r, in]
            b_hf = np.swapaxes(b.reshape(nl, r, -1), 1, 2)  # [L, out, r]
            got.append((a_hf, b_hf, s))
        if all(x is None for x in got):
            continue
        present = [x for x in got if x is not None]
        scale = present[0][2]
        nl = present[0][0].shape[0]
        in_f = present[0][0].shape[2]
        shared = all(np.array_equal(x[0], present[0][0]) and x[2] == scale for x in present)
        rank = present[0][0].shape[1] if shared else sum(x[0].shape[1] for x in present)
        a_out = present[0][0] if shared else np.concatenate([x[0] for x in present], axis=1)
        b_out = np.zeros((nl, sum(n for _, _, n in parts), rank), np.float32)
        row = col = 0
        for (_, _, n), x in zip(parts, got):
            if x is not None:
                r = x[0].shape[1]
                c0 = 0 if shared else col
                b_out[:, row:row + n, c0:c0 + r] = x[1] * np.float32(x[2] / scale)
                col += r
            row += n
        assert a_out.shape == (nl, rank, in_f)
        out[module] = (a_out, b_out, scale)
    return out


def to_peft(config: ModelConfig, params, name: str, model_type: str) -> tuple[dict, dict]:
    """(adapter_config.json dict, {PEFT key: tensor}) of jaxlm adapter `name` for a base of `model_type`."""
    modules = to_modules(config, model_type, _sites_of(config, params, name))
    lc = config.lora
    rslora = lc.use_rslora
    rs = {m: (a.shape[1], s) for m, (a, _, s) in modules.items()}
    r0, s0 = Counter(rs.values()).most_common(1)[0][0]

    def alpha(r, s):
        return float(s * (math.sqrt(r) if rslora else r))

    short = {m: m.split(".")[1] for m in modules}
    rank_pattern = {short[m]: r for m, (r, s) in rs.items() if (r, s) != (r0, s0)}
    alpha_pattern = {short[m]: alpha(r, s) for m, (r, s) in rs.items() if (r, s) != (r0, s0)}
    k = lora.index(config, name)
    dropout = lc.dropouts[k] if lc.dropouts else lc.dropout
    acfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r0, "lora_alpha": alpha(r0, s0),
            "lora_dropout": dropout, "use_rslora": rslora, "target_modules": sorted(set(short.values())),
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None, "base_model_name_or_path": None,
            "revision": None}
    tensors = {}
    for module, (a, b, _) in modules.items():
        for i_layer in range(a.shape[0]):
            p = f"{PREFIX}model.layers.{i_layer}.{module}"
            tensors[f"{p}.lora_A.weight"] = np.ascontiguousarray(a[i_layer])
            tensors[f"{p}.lora_B.weight"] = np.ascontiguousarray(b[i_layer])
    return acfg, tensors


def save_peft(config: ModelConfig, params, name: str, model_type: str, folder, base_model: str | None = None):
    """Write adapter_config.json and adapter_model.safetensors that peft loads onto the HF base."""
    acfg, tensors = to_peft(config, params, name, model_type)
    acfg["base_model_name_or_path"] = base_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    save_file(tensors, os.fspath(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- in-model adapters
class _InModelGetter:
    """Base weights of a folder whose LoRA modules keep theirs at `….base_layer.weight`."""

    def __init__(self, ts: _Tensors):
        self.ts = ts

    def _name(self, name):
        alt = name[:-len(".weight")] + ".base_layer.weight" if name.endswith(".weight") else name
        return alt if name not in self.ts and alt in self.ts else name

    def __call__(self, name, shape):
        return self.ts.get(self._name(name), shape)

    def has(self, name) -> bool:
        return self._name(name) in self.ts


def load_in_model(path, adapters: dict | None = None) -> tuple[ModelConfig, dict]:
    """A HF folder that holds its LoRA adapters in the model (Phi-4-multimodal: `…base_layer.weight`,
    `…lora_A.vision.weight`) -> (config with every adapter, params). `adapters` gives
    {name: {'r', 'lora_alpha', 'dp'}}; by default config.json's `<name>_lora` sections (Phi-4-multimodal's
    vision_lora and speech_lora). The language model is read as phi3 (model_type phi4mm) or its own type."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ConversionError(f"{cfg_file} not found")
    hf = json.loads(cfg_file.read_text())
    model_type = "phi3" if hf.get("model_type") in ("phi4mm", "phi4_multimodal") else hf.get("model_type")
    config = config_from_hf(dict(hf, model_type=model_type))
    ts = _Tensors(folder)
    params = params_from_tensors(config, _InModelGetter(ts), model_type)
    if adapters is None:
        adapters = {k[:-len("_lora")]: v for k, v in hf.items() if k.endswith("_lora") and isinstance(v, dict)}
    if not adapters:
        raise ConversionError(f"{cfg_file} names no adapters (vision_lora, speech_lora, ...)")
    keys = {k: (lambda k=k: ts.get(k, _shape_of(ts, k))) for k in ts.weight_map}
    sites_by, drops, rslora = {}, {}, False
    for name, s in adapters.items():
        where = f"adapter {name!r} in {folder}"
        raw = _read_modules(keys, config, name, where, strict=False)
        if not raw:
            raise ConversionError(f"{where}: no tensors named …lora_A.{name}.weight")
        r, alpha = int(s.get("r", 8)), float(s.get("lora_alpha", 8))
        modules = _stack_modules(config, model_type, raw, lambda _k, r=r, alpha=alpha: (r, alpha, False), where)
        sites_by[name] = from_modules(config, model_type, modules, where)
        drops[name] = float(s.get("dp", s.get("lora_dropout", 0.0)))
    lcfg = lora_config(sites_by, rslora, drops)
    for name, sites in sites_by.items():
        params = lora.join(params, adapter_tree(name, sites))
    params = _map(np.ascontiguousarray, params)
    return config.replace(lora=lcfg), params


def _shape_of(ts: _Tensors, key: str):
    with safe_open(ts.folder / ts.weight_map[key], "np") as h:
        return tuple(h.get_slice(key).get_shape())


def has_in_model_adapters(path) -> bool:
    """Whether a HF folder keeps LoRA adapters inside the model (`….base_layer.weight`)."""
    try:
        return any(k.endswith(".base_layer.weight") for k in _Tensors(Path(path)).weight_map)
    except ConversionError:
        return False
