"""Tiny GGUF files written with the `gguf` package's own writer, from tiny random transformers models,
the way llama.cpp's convert_hf_to_gguf.py lays them out (Q/K rows permuted for `llama`)."""

import json

import numpy as np

from jaxlm import ASSETS

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab():
    """(tokens, merges, token types) of jaxlm's tiny byte-level BPE, plus two ChatML tokens."""
    d = json.loads((ASSETS / "tiny_bpe.json").read_text())
    tokens = [None] * len(d["model"]["vocab"])
    for t, i in d["model"]["vocab"].items():
        tokens[i] = t
    specials = {t["id"] for t in d["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [3 if i in specials or i >= len(tokens) - 2 else 1 for i in range(len(tokens))]
    return tokens, merges, types


def llama_permute(w, n_head):
    """llama.cpp's `LlamaModel.permute` (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama(vocab_size=2050, seed=0, family="Llama", **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e4,
              initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    kw.update(overrides)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


# byte offsets of the fp16 super-block scales (d, dmin) in each K-quant block (ggml-common.h)
K_QUANT_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_blocks(kind, shape, seed=0):
    """Random K-quant blocks for a [rows, cols] tensor, with small finite fp16 super-block scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for off in K_QUANT_SCALES[kind]:
        raw[..., off:off + 2] = np.full(raw.shape[:2], 0.0002, np.float16)[..., None].view(np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(path, model, *, arch="llama", qtype="F32", embed_qtype=None, tokenizer=True, template=CHATML,
               truncate=0, extra=None, rope_freqs=None):
    """Write `model` (a transformers Llama / Qwen2) as GGUF: 2-D weights in `qtype` (F32, F16, Q8_0,
    Q4_0, Q4_1 ... quantised by gguf itself), norms and biases in F32."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}  # transformers 5 / 4
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        tokens, merges, types = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(len(tokens) - 2)
        w.add_eos_token_id(len(tokens) - 1)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        if template:
            w.add_chat_template(template)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)

    def add(name, t, kind):
        t = np.ascontiguousarray(t, np.float32)
        if t.ndim == 1 or kind == "F32":
            w.add_tensor(name, t)
        elif kind == "F16":
            w.add_tensor(name, t.astype(np.float16))
        elif kind in K_QUANT_SCALES:  # gguf cannot quantise these: random blocks (the weights are replaced)
            w.add_tensor(name, random_k_blocks(kind, t.shape, seed=len(name)), raw_dtype=getattr(
                gguf.GGMLQuantizationType, kind))
        else:
            q = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)

    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    add("token_embd.weight", sd["model.embed_tokens.weight"], embed_qtype or qtype)
    add("output_norm.weight", sd["model.norm.weight"], "F32")
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"], qtype)
    if rope_freqs is not None:
        add("rope_freqs.weight", np.asarray(rope_freqs, np.float32), "F32")
    for i in range(cfg.num_hidden_layers):
        for hf_name, g in GGUF_NAMES.items():
            for suffix in ("weight", "bias"):
                key = f"model.layers.{i}.{hf_name}.{suffix}"
                if key not in sd:
                    continue
                t = sd[key]
                if arch == "llama" and hf_name == "self_attn.q_proj":
                    t = llama_permute(t, cfg.num_attention_heads)
                elif arch == "llama" and hf_name == "self_attn.k_proj":
                    t = llama_permute(t, cfg.num_key_value_heads)
                add(f"blk.{i}.{g}.{suffix}", t, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate])
    return path
