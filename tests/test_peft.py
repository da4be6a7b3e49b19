"""PEFT interop: tiny random transformers Phi-3 and Llama models with random peft LoRA adapters (B
non-zero) give the same logits in jaxlm; the adapters jaxlm writes load back into peft with the same
logits; a merged export loads in transformers with the same logits; Phi-4-multimodal's in-model
layout loads; bad adapters are clear errors naming the module."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hf_util import hf_logits  # noqa: E402

from jaxlm.convert import peft as jpeft  # noqa: E402
from jaxlm.convert.hf import save_hf  # noqa: E402
from jaxlm.errors import ConversionError  # noqa: E402
from jaxlm.model import forward, lora  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
            bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
TARGETS = {"Phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           "Llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TOKENS = np.random.default_rng(1).integers(0, 128, (2, 12))


def hf_base(tmp_path, family, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    extra = dict(partial_rotary_factor=0.75, original_max_position_embeddings=64, sliding_window=None) \
        if family == "Phi3" else {}
    model = getattr(transformers, f"{family}ForCausalLM")(
        getattr(transformers, f"{family}Config")(**BASE, **extra)).eval()
    folder = tmp_path / f"{family.lower()}_base"
    model.save_pretrained(folder)
    return model, folder


def with_random_lora(model, family, r=4, alpha=8, seed=1, **kw):
    """A peft model whose lora_B are random (a fresh adapter has B = 0 and would prove nothing)."""
    import torch

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=kw.pop("targets", TARGETS[family]),
                          lora_dropout=0.0, **kw)
    pm = peft.get_peft_model(model, cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def jax_logits(cfg, params, ids=None):
    return np.asarray(forward(cfg, params, jnp.asarray(TOKENS), adapter_ids=ids))


@pytest.mark.parametrize("family", ["Phi3", "Llama"])
def test_peft_adapter_round_trip(tmp_path, family):
    import transformers

    base, base_dir = hf_base(tmp_path, family)
    base_ref = hf_logits(base, TOKENS)
    pm = with_random_lora(base, family)
    ref = hf_logits(pm, TOKENS)
    assert np.abs(ref - base_ref).max() > 0.1  # the adapter really changes the model
    adapter_dir = tmp_path / "adapter"
    pm.save_pretrained(adapter_dir)

    # PEFT -> jaxlm: the same logits; the base alone is the HF base exactly as loaded
    cfg, params = jpeft.load_adapter(base_dir, adapter_dir, name="ad")
    assert cfg.lora.adapters == ("ad",) and cfg.lora.rank == 4 and not cfg.lora.rank_pattern
    np.testing.assert_allclose(jax_logits(cfg, params), ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(jax_logits(lora.off(cfg), params), base_ref, atol=TOL, rtol=0)

    # jaxlm -> PEFT: the imported adapter comes back with peft's own tensors (fused A stays shared)
    out = tmp_path / "back"
    model_type = family.lower()
    jpeft.save_peft(cfg, params, "ad", model_type, out)
    theirs = peft.PeftModel.from_pretrained(
        getattr(transformers, f"{family}ForCausalLM").from_pretrained(base_dir).eval(), out).eval()
    np.testing.assert_allclose(hf_logits(theirs, TOKENS), ref, atol=TOL, rtol=0)
    from safetensors.numpy import load_file
    a, b = load_file(adapter_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0, err_msg=k)

    # a jaxlm-trained adapter (every layer's A its own, different ranks by pattern) loads into peft
    mine = cfg.replace(lora=cfg.lora.replace(rank_pattern=((r"^layers/attn/o$", 6),), alpha_pattern=((r"^layers/mlp/wo$", 3.0),)))
    p2 = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(jax.random.normal(jax.random.key(hash(str(path)) % 1000), x.shape)) * 0.2
        if lora.is_adapter(path) else x, lora.join(params, lora.split(
            jax.device_get(_init(mine)))[1]))
    mine_ref = jax_logits(mine, p2)
    out2 = tmp_path / "mine"
    jpeft.save_peft(mine, p2, "ad", model_type, out2)
    acfg = json.loads((out2 / "adapter_config.json").read_text())
    if family == "Phi3":  # q, k, v with different A: block-diagonal qkv_proj of rank 3r
        assert acfg["rank_pattern"]["qkv_proj"] == 12
    theirs2 = peft.PeftModel.from_pretrained(
        getattr(transformers, f"{family}ForCausalLM").from_pretrained(base_dir).eval(), out2).eval()
    np.testing.assert_allclose(hf_logits(theirs2, TOKENS), mine_ref, atol=TOL, rtol=0)
    # ... and back into jaxlm, unchanged in effect
    cfg3, params3 = jpeft.load_adapter(base_dir, out2, name="ad")
    np.testing.assert_allclose(jax_logits(cfg3, params3), mine_ref, atol=TOL, rtol=0)

    # merged export: W + s B A written as a plain HF model
    merged_cfg, merged = lora.strip(cfg, lora.merge(cfg, params, "ad"))
    save_hf(merged_cfg, jax.device_get(merged), tmp_path / "merged", model_type=model_type)
    m = getattr(transformers, f"{family}ForCausalLM").from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(m, TOKENS), ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(hf_logits(m, TOKENS), hf_logits(pm.merge_and_unload(), TOKENS), atol=TOL, rtol=0)


def _init(cfg):
    from jaxlm.model import init_params

    return init_params(cfg, jax.random.key(0))


def test_rslora_and_partial_targets(tmp_path):
    """use_rslora and an adapter on only some modules (gate_proj without up_proj, q and v only)."""
    base, base_dir = hf_base(tmp_path, "Llama", seed=3)
    pm = with_random_lora(base, "Llama", r=4, alpha=6, use_rslora=True, targets=["q_proj", "v_proj", "gate_proj"])
    ref = hf_logits(pm, TOKENS)
    pm.save_pretrained(tmp_path / "ad")
    cfg, params = jpeft.load_adapter(base_dir, tmp_path / "ad")
    assert cfg.lora.use_rslora
    np.testing.assert_allclose(jax_logits(cfg, params), ref, atol=TOL, rtol=0)


def test_phi4mm_in_model_layout(tmp_path):
    """Phi-4-multimodal keeps its vision and speech LoRAs in the model folder: …base_layer.weight,
    …lora_A.vision.weight; each adapter routed in jaxlm equals peft with that adapter active."""
    import torch
    from safetensors.torch import save_file

    base, _ = hf_base(tmp_path, "Phi3", seed=5)
    targets = TARGETS["Phi3"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="vision")
    pm.add_adapter("speech", peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=0.01, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    refs = {}
    for name in ("vision", "speech"):
        pm.set_adapter(name)
        refs[name] = hf_logits(pm, TOKENS)
    folder = tmp_path / "phi4mm"
    folder.mkdir()
    inner = pm.base_model.model  # the Phi3ForCausalLM with LoRA layers inside: Phi-4-multimodal's layout
    sd = {k: v.contiguous() for k, v in inner.state_dict().items() if "lm_head" not in k or "base_layer" not in k}
    assert any(k.endswith("qkv_proj.base_layer.weight") for k in sd) and any("lora_A.vision" in k for k in sd)
    save_file(sd, folder / "model.safetensors")
    hf_cfg = json.loads(json.dumps(base.config.to_dict()))
    hf_cfg.update(model_type="phi4mm", vision_lora={"r": 4, "lora_alpha": 8, "dp": 0.0, "layer": "..."},
                  speech_lora={"r": 6, "lora_alpha": 12, "dp": 0.01, "layer": "..."})
    (folder / "config.json").write_text(json.dumps(hf_cfg))

    cfg, params = jpeft.load_in_model(folder)
    assert cfg.lora.adapters == ("vision", "speech") and cfg.lora.ranks == (4, 6) and cfg.lora.dropouts == (0.0, 0.01)
    mixed = jax_logits(cfg, params, jnp.asarray([0, 1]))
    np.testing.assert_allclose(mixed[0], refs["vision"][0], atol=TOL, rtol=0)
    np.testing.assert_allclose(mixed[1], refs["speech"][1], atol=TOL, rtol=0)


def test_bad_adapters_name_the_module(tmp_path):
    _, llama_dir = hf_base(tmp_path, "Llama")
    phi, phi_dir = hf_base(tmp_path, "Phi3")
    with_random_lora(phi, "Phi3").save_pretrained(tmp_path / "phi_ad")
    with pytest.raises(ConversionError, match=r"it adapts mlp\.gate_up_proj, which a llama model does not have.*phi3"):
        jpeft.load_adapter(llama_dir, tmp_path / "phi_ad")

    # a rank that disagrees with adapter_config.json
    acfg = json.loads((tmp_path / "phi_ad" / "adapter_config.json").read_text())
    (tmp_path / "phi_ad" / "adapter_config.json").write_text(json.dumps(dict(acfg, r=8)))
    with pytest.raises(ConversionError, match=r"rank mismatch in model\.layers\.0\.mlp\.down_proj: lora_A has rank 4"):
        jpeft.load_adapter(phi_dir, tmp_path / "phi_ad")

    # an adapter for a wider model of the same architecture
    import transformers
    big = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(BASE, hidden_size=96))).eval()
    with_random_lora(big, "Llama").save_pretrained(tmp_path / "big_ad")
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.down_proj\.lora_B has shape \(96, 4\)"):
        jpeft.load_adapter(llama_dir, tmp_path / "big_ad")


def test_convert_command_adapter_round_trip(tmp_path, capsys):
    """`jaxlm convert --from-hf BASE --adapter DIR`, `--to-peft` (peft's key names, loads in peft) and
    `--to-hf --merge-adapter` (loads in transformers): the same logits throughout."""
    import transformers
    from safetensors.numpy import load_file

    from jaxlm.checkpoint import model_from_checkpoint
    from jaxlm.cli import main

    base, base_dir = hf_base(tmp_path, "Phi3", seed=7)
    pm = with_random_lora(base, "Phi3", seed=8)
    ref = hf_logits(pm, TOKENS)
    pm.save_pretrained(tmp_path / "ad")
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--from-hf", str(base_dir), "--adapter", str(tmp_path / "ad"), "--adapter-name", "fr",
                 "--out", str(ckpt)]) == 0
    cfg, params, _ = model_from_checkpoint(ckpt)
    assert cfg.lora.adapters == ("fr",)
    np.testing.assert_allclose(jax_logits(cfg, params), ref, atol=TOL, rtol=0)

    assert main(["convert", "--to-peft", "--checkpoint", str(ckpt), "--adapter", "fr", "--out", str(tmp_path / "peft")]) == 0
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    assert keys == set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(transformers.Phi3ForCausalLM.from_pretrained(base_dir).eval(),
                                            tmp_path / "peft").eval()
    np.testing.assert_allclose(hf_logits(theirs, TOKENS), ref, atol=TOL, rtol=0)

    assert main(["convert", "--to-hf", "--checkpoint", str(ckpt), "--merge-adapter", "fr",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, TOKENS), ref, atol=TOL, rtol=0)

    capsys.readouterr()
    assert main(["convert", "--to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "has LoRA adapters ('fr',): pass --merge-adapter NAME" in capsys.readouterr().err.replace("\n", "")
    assert main(["convert", "--to-peft", "--checkpoint", str(ckpt), "--adapter", "de", "--out", str(tmp_path / "y")]) == 2
    assert "adapter 'de' is not one of the model's adapters" in capsys.readouterr().err.replace("\n", "")
