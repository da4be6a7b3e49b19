"""Replies of a local model to chat prompts (the generative evals and local judges).

Each prompt is one user turn (after an optional system turn) rendered with the model's own chat
template, with the generation prompt; prompts are sorted by length and generated greedily in
batches with the KV-cache sampler, so similar lengths share a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxlm.data.tokenizer import Tokenizer, apply_chat_template
from jaxlm.infer.generate import generate
from jaxlm.model import ModelConfig


def chat_ids(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    ids = apply_chat_template(tok, list(messages), add_generation_prompt=True)
    return list(ids[0] if isinstance(ids, tuple) else ids)


def stop_tokens(config: ModelConfig, tok: Tokenizer) -> list[int]:
    stops = list(tok.stop_ids)
    if config.eos_token_id >= 0 and config.eos_token_id not in stops:
        stops.append(config.eos_token_id)
    return stops


def generate_replies(config: ModelConfig, params, tok: Tokenizer, conversations: Sequence[Sequence[dict]], *,
                     max_new_tokens: int = 256, batch_size: int = 16, temperature: float = 0.0, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The model's reply to each conversation (a list of messages ending with a user turn)."""
    prompts = [chat_ids(tok, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = stop_tokens(config, tok)
    out = [""] * len(prompts)
    if progress:
        progress(0, len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gen = generate(config, params, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                       temperature=temperature, stop_tokens=stops, seed=seed + start)
        for i, toks in zip(idx, gen.tokens):
            toks = toks[:-1] if toks and toks[-1] in stops else toks
            out[i] = tok.decode(toks, skip_special=True)
        if progress:
            progress(min(start + batch_size, len(order)), len(prompts))
    return out


def user_turns(prompts: Sequence[str], system: str | None = None) -> list[list[dict]]:
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": p}] for p in prompts]


class LocalChat:
    """A judge (or teacher) backed by a local model: `complete(messages) -> str`, and `many(list of
    messages) -> [str]` which batches. Greedy unless a temperature is given."""

    def __init__(self, config: ModelConfig, params, tok: Tokenizer, *, max_new_tokens: int = 256,
                 batch_size: int = 16, temperature: float = 0.0):
        self.config, self.params, self.tok = config, params, tok
        self.max_new_tokens, self.batch_size, self.temperature = max_new_tokens, batch_size, temperature

    def many(self, conversations: Sequence[Sequence[dict]], progress=None) -> list[str]:
        return generate_replies(self.config, self.params, self.tok, conversations,
                                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                temperature=self.temperature, progress=progress)

    def __call__(self, messages: Sequence[dict], **sampling) -> str:
        return self.many([messages])[0]


def sampler(config: ModelConfig, params, max_new_tokens: int, stop_tokens):
    """`sample(prompts, seed) -> token lists`: temperature-1 sampling from `params`, what the KL estimate of
    jaxlm.align.analysis needs (the policy's own distribution)."""
    def sample(prompts, seed):
        return generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                        stop_tokens=list(stop_tokens), seed=seed).tokens
    return sample
