"""GGUF import: tiny models written by the `gguf` package's writer load as jaxlm's decoder with the
weights gguf's reader gives, the logits transformers gives, and clear errors for bad files."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from gguf_util import hf_llama, llama_permute, write_gguf  # noqa: E402

from jaxlm.checkpoint import dequantize_tree, is_quantized, model_from_checkpoint  # noqa: E402
from jaxlm.convert.gguf import convert_gguf, load_gguf  # noqa: E402
from jaxlm.errors import ConversionError  # noqa: E402
from jaxlm.model import forward  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 2050, (2, 24))


@pytest.fixture(scope="module")
def llama():
    return hf_llama()


def logits(cfg, params):
    return np.asarray(forward(cfg, params, jnp.asarray(TOKENS)))


def hf_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def test_f32_gguf_equals_the_source_model(tmp_path, llama):
    """The Q/K permutation is undone: an unquantised GGUF gives the HF model's logits."""
    cfg, params = load_gguf(write_gguf(tmp_path / "m.gguf", llama))
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (2, 4, 2, 2050)
    assert not cfg.tie_embeddings and cfg.rope_theta == 1e4 and cfg.eos_token_id == 2049
    np.testing.assert_allclose(logits(cfg, params), hf_logits(llama), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantised_weights_are_gguf_readers_dequantised_ones(tmp_path, llama, qtype):
    path = write_gguf(tmp_path / f"m_{qtype}.gguf", llama, qtype=qtype, embed_qtype="Q8_0")
    cfg, params = load_gguf(path)
    reader = gguf.GGUFReader(str(path))
    t = {x.name: x for x in reader.tensors}

    def deq(name):
        return gguf.quants.dequantize(t[name].data, t[name].tensor_type)

    assert t["blk.1.ffn_up.weight"].tensor_type.name == qtype and t["token_embd.weight"].tensor_type.name == "Q8_0"
    # each weight, put back in the GGUF's layout (and permutation), is gguf's dequantised tensor
    np.testing.assert_array_equal(params["embedding"], deq("token_embd.weight"))
    for i in range(cfg.num_layers):
        q = params["layers"]["attn"]["q"][i].transpose(1, 2, 0).reshape(-1, 64)
        np.testing.assert_array_equal(llama_permute(q, 4), deq(f"blk.{i}.attn_q.weight"))
        k = params["layers"]["attn"]["k"][i].transpose(1, 2, 0).reshape(-1, 64)
        np.testing.assert_array_equal(llama_permute(k, 2), deq(f"blk.{i}.attn_k.weight"))
        np.testing.assert_array_equal(params["layers"]["mlp"]["wi"][i][:, 1].T, deq(f"blk.{i}.ffn_up.weight"))
        np.testing.assert_array_equal(params["layers"]["mlp"]["wo"][i].T, deq(f"blk.{i}.ffn_down.weight"))
    # and transformers, reading the same file, computes the same logits
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    np.testing.assert_allclose(logits(cfg, params), hf_logits(hf), atol=1e-4, rtol=0)
    # quantized=True keeps the blocks, 4x smaller, and they dequantise to the same floats bit for bit
    _, blocks = load_gguf(path, quantized=True)
    assert is_quantized(blocks["layers"]["mlp"]["wi"]) and is_quantized(blocks["embedding"])
    assert blocks["layers"]["mlp"]["wi"]["codes"].dtype == np.int8
    np.testing.assert_array_equal(dequantize_tree(blocks)["layers"]["mlp"]["wi"], params["layers"]["mlp"]["wi"])
    np.testing.assert_array_equal(dequantize_tree(blocks)["layers"]["attn"]["o"], params["layers"]["attn"]["o"])


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "BF16"])
def test_k_quants_and_bf16_against_transformers(tmp_path, qtype):
    """K-quant blocks (random: gguf cannot write them) dequantise as transformers' own dequantiser
    reads them; rows of 256 need a wider model."""
    import torch
    import transformers

    model = hf_llama(hidden_size=256, intermediate_size=512)
    path = write_gguf(tmp_path / f"k_{qtype}.gguf", model, qtype=qtype, embed_qtype="Q8_0" if qtype != "BF16" else None)
    cfg, params = load_gguf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert np.abs(params["layers"]["mlp"]["wo"]).max() > 0
    ref = hf_logits(hf)
    np.testing.assert_allclose(logits(cfg, params), ref, atol=1e-6 * np.abs(ref).max() + 1e-4, rtol=0)


def test_qwen2_gguf_keeps_hf_rows_and_biases(tmp_path):
    model = hf_llama(family="Qwen2", use_sliding_window=False, tie_word_embeddings=True)
    cfg, params = load_gguf(write_gguf(tmp_path / "q.gguf", model, arch="qwen2"))
    assert cfg.qkv_bias and cfg.tie_embeddings and "lm_head" not in params
    np.testing.assert_allclose(logits(cfg, params), hf_logits(model), atol=1e-4, rtol=0)


def test_llama31_rope_freqs(tmp_path):
    """Llama 3.1 GGUFs store their rope scaling as per-frequency divisors (rope_freqs.weight)."""
    model = hf_llama(max_position_embeddings=256, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})
    inv = 1.0 / (1e4 ** (np.arange(0, 16, 2) / 16))
    wavelen = 2 * np.pi / inv
    smooth = (8 / wavelen - 1.0) / (4.0 - 1.0)
    freqs = np.where(wavelen < 8 / 4, 1.0, np.where(wavelen > 8 / 1, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    cfg, params = load_gguf(write_gguf(tmp_path / "l31.gguf", model, rope_freqs=freqs))
    assert cfg.rope_scaling == "longrope"
    np.testing.assert_allclose(logits(cfg, params), hf_logits(model), atol=1e-4, rtol=0)


def test_convert_writes_a_checkpoint_that_carries_its_tokenizer(tmp_path, llama):
    path = write_gguf(tmp_path / "m.gguf", llama, qtype="Q8_0")
    out = tmp_path / "ckpt"
    convert_gguf(path, out, quantized=True)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["convert"]["model_type"] == "llama"
    cfg, params, spec = model_from_checkpoint(out)
    ref_cfg, ref = load_gguf(path)
    assert cfg == ref_cfg
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]), ref["layers"]["attn"]["q"])
    from jaxlm.data.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(spec)  # no --tokenizer needed: the template and stop tokens came along
    ids, mask = apply_chat_template(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yo<|im_end|>"
    assert tok.eos_id == tok.token_id("<|im_end|>") == 2049 and 2049 in tok.stop_ids


def test_bad_files_give_clear_errors_and_no_checkpoint(tmp_path, llama):
    cases = {
        "truncated": (write_gguf(tmp_path / "t.gguf", llama, qtype="Q8_0", truncate=1000), r"truncated"),
        "quant type": (write_gguf(tmp_path / "q.gguf", llama, qtype="Q5_0"),
                       r"tensor token_embd.weight is quantised as Q5_0, which jaxlm does not read"),
        "architecture": (None, r"GGUF architecture 'gemma' is not supported"),
    }
    g = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(g), "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases["architecture"] = (g, cases["architecture"][1])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    cases["not gguf"] = (garbage, r"not a readable GGUF file")
    for name, (path, message) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        with pytest.raises(ConversionError, match=message):
            convert_gguf(path, out)
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if ".partial" in p.name], name
    with pytest.raises(ConversionError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")


def test_cli_convert_from_gguf_then_chat(tmp_path, llama, capsys):
    from jaxlm.cli import main

    path = write_gguf(tmp_path / "m.gguf", llama, qtype="Q4_0")
    out = tmp_path / "ckpt"
    assert main(["convert", "--from-gguf", str(path), "--out", str(out)]) == 0
    assert main(["convert", "--from-gguf", str(path), "--out", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["chat", "--checkpoint", str(out), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert main(["convert", "--from-gguf", str(path), "--out", str(out), "--dtype", "bfloat16", "--overwrite"]) == 2
    assert main(["convert", "--to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
