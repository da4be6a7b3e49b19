"""One tokenizer interface (`encode` / `decode` with special tokens) over three backends:

* a Hugging Face `tokenizer.json` (`HFTokenizer`);
* a tiktoken rank file (`TiktokenTokenizer`), with presets for gpt2, o200k_base and Phi-4-mini;
* a byte-level BPE trained on a local corpus with HF tokenizers (`train_bpe`), for tiny models.

Plus the Phi chat template: `<|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Special tokens of each tiktoken preset. Phi-4-mini extends o200k_base with its chat and tool tokens
# (vocab padded to 200064 in the model).
PRESETS = {
    "gpt2": (GPT2_PAT, {"<|endoftext|>": 50256}),
    "o200k_base": (O200K_PAT, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
    "phi4": (O200K_PAT, {
        "<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020,
        "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024,
        "<|tool_call|>": 200025, "<|/tool_call|>": 200026, "<|tool_response|>": 200027, "<|tag|>": 200028,
    }),
}
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_SPECIALS = ("<|pad|>", "<|endoftext|>") + CHAT_TOKENS + ("<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Base class: subclasses implement `_encode`, `_decode`, `vocab_size`, `special_tokens`, `spec`."""

    special_tokens: dict[str, int]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of text; with special=True, special-token strings in text become their ids."""
        return self._encode(text, special)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        return self._decode(ids)

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise TokenizerError(f"tokenizer has no special token {token!r} (it has {sorted(self.special_tokens)})")
        return self.special_tokens[token]

    @property
    def eos_id(self) -> int:
        return self.special_tokens.get("<|endoftext|>", -1)

    @property
    def pad_id(self) -> int:
        return self.special_tokens.get("<|pad|>", self.eos_id if self.eos_id >= 0 else 0)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a generated reply: <|end|> for chat models, <|endoftext|>."""
        return [self.special_tokens[t] for t in ("<|end|>", "<|endoftext|>") if t in self.special_tokens]


class HFTokenizer(Tokenizer):
    def __init__(self, tok):
        self.tok = tok
        self.special_tokens = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path) -> HFTokenizer:
        from tokenizers import Tokenizer as _T

        return cls(_T.from_file(str(path)))

    @classmethod
    def from_str(cls, content: str) -> HFTokenizer:
        from tokenizers import Tokenizer as _T

        return cls(_T.from_str(content))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text, special):
        if not special:
            # added tokens are always matched by HF tokenizers; split them apart so they stay text
            out = []
            for i, part in enumerate(_split_specials(text, self.special_tokens)):
                out += self.tok.encode(part, add_special_tokens=False).ids if i % 2 == 0 else \
                    self.tok.encode(part[:1], add_special_tokens=False).ids + \
                    self.tok.encode(part[1:], add_special_tokens=False).ids
            return out
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "hf", "json": self.tok.to_str()}

    def save(self, path):
        self.tok.save(str(path))


def _split_specials(text, specials):
    """[text, special, text, special, ...]"""
    import re

    if not specials:
        return [text]
    pat = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return re.split(pat, text)


class TiktokenTokenizer(Tokenizer):
    def __init__(self, rank_file, preset: str):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        if preset not in PRESETS:
            raise TokenizerError(f"unknown tiktoken preset {preset!r}; choose from {sorted(PRESETS)}")
        path = Path(rank_file)
        if not path.exists():
            raise TokenizerError(f"tiktoken rank file {path} not found")
        pat, specials = PRESETS[preset]
        ranks = load_tiktoken_bpe(str(path))
        self.enc = tiktoken.Encoding(name=preset, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
        self.special_tokens = dict(specials)
        self.rank_file, self.preset = str(path), preset

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def _encode(self, text, special):
        return self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)

    def _decode(self, ids):
        return self.enc.decode(ids)

    def spec(self) -> dict:
        return {"kind": "tiktoken", "path": self.rank_file, "preset": self.preset}


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = TINY_SPECIALS) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style) trained on texts; special tokens take the first ids."""
    from tokenizers import Tokenizer as _T
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


def load_tokenizer(spec) -> Tokenizer:
    """From a spec dict (as `Tokenizer.spec()` writes) or a string: `path/tokenizer.json`,
    `path/x.tiktoken` (preset from the file name), `PRESET:path.tiktoken`, or `asset:NAME` (shipped)."""
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "hf":
            return HFTokenizer.from_str(spec["json"]) if "json" in spec else HFTokenizer.from_file(spec["path"])
        if kind == "tiktoken":
            return TiktokenTokenizer(spec["path"], spec.get("preset", "o200k_base"))
        raise TokenizerError(f"unknown tokenizer kind {kind!r} (hf | tiktoken)")
    s = str(spec)
    if s.startswith("asset:"):
        from jaxlm import ASSETS

        s = str(ASSETS / s[len("asset:"):])
    if ":" in s and s.split(":", 1)[0] in PRESETS:
        preset, path = s.split(":", 1)
        return TiktokenTokenizer(path, preset)
    path = Path(s)
    if path.is_dir() and (path / "tokenizer.json").exists():
        path = path / "tokenizer.json"
    if path.suffix == ".json":
        if not path.exists():
            raise TokenizerError(f"tokenizer file {path} not found")
        return HFTokenizer.from_file(path)
    if path.suffix == ".tiktoken":
        preset = "gpt2" if "gpt2" in path.name or "r50k" in path.name else "o200k_base"
        return TiktokenTokenizer(path, preset)
    raise TokenizerError(f"cannot tell what tokenizer {s!r} is: give a tokenizer.json, a .tiktoken file, "
                         f"or PRESET:path with PRESET in {sorted(PRESETS)}")


# ----------------------------------------------------------------------------- chat template
def apply_chat_template(tok: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False):
    """Phi chat format. Returns (ids, loss_mask): the mask is 1 on assistant content and its <|end|>
    (what the model must learn to produce), 0 on everything else.

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
    add_generation_prompt: end with `<|assistant|>` so a model continues with the reply.
    """
    ids: list[int] = []
    mask: list[int] = []
    end = tok.token_id("<|end|>")
    for n, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise TokenizerError(f"message {n} needs role in system|user|assistant|tool and string content, got {m!r}")
        tag = tok.token_id(f"<|{role}|>")
        body = tok.encode(content, special=False) + [end]
        ids += [tag] + body
        mask += [0] + [1 if role == "assistant" else 0] * len(body)
    if add_generation_prompt:
        ids.append(tok.token_id("<|assistant|>"))
        mask.append(0)
    return ids, mask
