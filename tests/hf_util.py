"""Tiny random transformers Phi-3 models, saved to disk, for parity tests."""

import numpy as np


def longrope_factors(rotary_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    half = rotary_dim // 2
    return [float(x) for x in 1 + rng.random(half)], [float(x) for x in 1 + 4 * rng.random(half)]


def phi3_config(**overrides):
    import transformers

    kw = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=False,
              max_position_embeddings=256, original_max_position_embeddings=256, pad_token_id=0,
              bos_token_id=None, eos_token_id=None, initializer_range=0.2, sliding_window=None)
    kw.update(overrides)
    return transformers.Phi3Config(**kw)


def phi3_model(tmp_path, seed=0, **overrides):
    """(transformers model in eval mode, folder it was saved to)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(phi3_config(**overrides)).eval()
    folder = tmp_path / f"hf_{seed}"
    model.save_pretrained(folder)
    return model, folder


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
    import torch

    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kw).logits.float().numpy()
