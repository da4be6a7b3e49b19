"""One tokenizer interface (`encode` / `decode` with special tokens) over these backends:

* a Hugging Face `tokenizer.json` (`HFTokenizer`), with the chat template and special-token names
  of its folder's tokenizer_config.json;
* the byte-level BPE of a GGUF file (`gguf:PATH`): tokens, merges and pre-tokenizer from its
  `tokenizer.ggml.*` metadata, built with HF tokenizers, plus its chat template;
* a tiktoken rank file (`TiktokenTokenizer`), with presets for gpt2, o200k_base and Phi-4-mini;
* a byte-level BPE trained on a local corpus with HF tokenizers (`train_bpe`), for tiny models.

Chat templates (jaxlm.data.chat) are the model's own Jinja template; tokenizers without one that
have the Phi chat tokens use the Phi format `<|system|>...<|end|><|user|>...<|end|><|assistant|>`.
A tokenizer's `spec()` carries its template and special-token names, so checkpoints keep them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from jaxlm.data import chat, gguf_vocab
from jaxlm.data.gguf_vocab import GPT2_PAT, O200K_PAT, bytes_to_unicode
from jaxlm.errors import TokenizerError

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
# tokens that end a reply, when the tokenizer has them as special tokens (then its eos)
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")
NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
# The Phi chat format as a Jinja template (what transformers' apply_chat_template renders for an
# exported model): <|role|>content<|end|> per message, then <|assistant|> for a generation prompt.
PHI_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
TINY_SPECIALS = ("<|pad|>", "<|endoftext|>") + CHAT_TOKENS + ("<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>")


class Tokenizer:
    """Base class: subclasses implement `_encode`, `_decode`, `encode_with_offsets`, `vocab_size`,
    `special_tokens`, `spec`. `names` maps bos_token / eos_token / pad_token / unk_token to token
    strings where the model says which; `template` is the model's chat template, if it has one."""

    special_tokens: dict[str, int]
    names: dict[str, str] = {}
    template: str = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of text; with special=True, special-token strings in text become their ids."""
        return self._encode(text, special)

    def encode_with_offsets(self, text: str, *, special: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in text."""
        raise NotImplementedError

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

    def _named(self, name: str) -> int:
        token = self.names.get(name)
        return self.special_tokens.get(token, self._vocab_id(token)) if token else -1

    def _vocab_id(self, token: str) -> int:
        return -1

    @property
    def eos_id(self) -> int:
        named = self._named("eos_token")
        return named if named >= 0 else next((self.special_tokens[t] for t in END_OF_TEXT if t in self.special_tokens), -1)

    @property
    def bos_id(self) -> int:
        return self._named("bos_token")

    @property
    def pad_id(self) -> int:
        named = self._named("pad_token")
        if named >= 0:
            return named
        return self.special_tokens.get("<|pad|>", self.eos_id if self.eos_id >= 0 else 0)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a generated reply: the end-of-turn token of chat models (<|end|>,
        <|im_end|>, <|eot_id|>, ...), the model's eos, <|endoftext|>."""
        ids = [self.special_tokens[t] for t in END_OF_TURN if t in self.special_tokens]
        ids += [self.eos_id] + [self.special_tokens[t] for t in END_OF_TEXT if t in self.special_tokens]
        return list(dict.fromkeys(i for i in ids if i >= 0))

    @property
    def stop_texts(self) -> list[str]:
        names = {v: k for k, v in self.special_tokens.items()}
        return [names[i] for i in self.stop_ids if i in names]

    @property
    def chat_template(self) -> str:
        """The model's Jinja chat template; the Phi format for jaxlm's own tokenizers."""
        if self.template:
            return self.template
        return PHI_CHAT_TEMPLATE if all(t in self.special_tokens for t in CHAT_TOKENS) else ""

    def template_variables(self) -> dict:
        """What a chat template sees besides the messages: bos_token, eos_token, ... (strings)."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self._named("pad_token"),
               "unk_token": self._named("unk_token")}
        inverse = {v: k for k, v in self.special_tokens.items()}
        out = {}
        for name in NAMES:
            token = self.names.get(name) or inverse.get(ids[name])
            if token:
                out[name] = token
        return out

    def with_chat(self, template: str = "", names: dict | None = None) -> Tokenizer:
        """Set the chat template and the special-token names (from a model's files); returns self."""
        if template:
            chat.compile_template(template)  # refuse a template that does not parse, at load time
            self.template = template
        if names:
            self.names = {k: v for k, v in names.items() if k in NAMES and isinstance(v, str) and v}
        return self

    def _chat_spec(self) -> dict:
        out = {}
        if self.template:
            out["chat_template"] = self.template
        if self.names:
            out["names"] = dict(self.names)
        return out

    def hf_json(self) -> str:
        """This tokenizer as a Hugging Face `tokenizer.json`."""
        raise NotImplementedError

    def save_hf(self, folder, model_max_length: int = 0) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json (special tokens, the chat template) and
        special_tokens_map.json into `folder`, so transformers' AutoTokenizer loads it alone.
        Returns the file names written."""
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.hf_json())
        names = {v: k for k, v in self.special_tokens.items()}
        special = {}
        if self.eos_id >= 0:
            special["eos_token"] = self.names.get("eos_token") or names[self.eos_id]
        if self.pad_id in names:
            special["pad_token"] = names[self.pad_id]
        if self.bos_id >= 0:
            special["bos_token"] = self.names.get("bos_token") or names.get(self.bos_id)
        if self.names.get("unk_token"):
            special["unk_token"] = self.names["unk_token"]
        special = {k: v for k, v in special.items() if v}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": False, "add_eos_token": False, **special}
        if model_max_length:
            config["model_max_length"] = model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


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

    def encode_with_offsets(self, text, *, special=True):
        tok = self.tok
        if not special:  # special tokens as text: a twin that does not match them
            if getattr(self, "_plain", None) is None:
                from tokenizers import Tokenizer as _T

                self._plain = _T.from_str(self.tok.to_str())
                self._plain.encode_special_tokens = True
            tok = self._plain
        enc = tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def _vocab_id(self, token):
        i = self.tok.token_to_id(token)
        return -1 if i is None else i

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "hf", "json": self.tok.to_str(), **self._chat_spec()}

    def hf_json(self) -> str:
        return self.tok.to_str()

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

    def encode_with_offsets(self, text, *, special=True):
        ids = self._encode(text, special)
        _, starts = self.enc.decode_with_offsets(ids)
        ends = starts[1:] + [len(text)]
        return ids, list(zip(starts, ends))

    def spec(self) -> dict:
        return {"kind": "tiktoken", "path": self.rank_file, "preset": self.preset, **self._chat_spec()}

    def hf_json(self) -> str:
        """The same byte-level BPE for Hugging Face tokenizers: the tiktoken regex as a Split
        pre-tokenizer, the byte alphabet of GPT-2, and merges recovered from the ranks (each token's
        bytes re-merged with the lower-ranked tokens until two parts remain)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        byte_char = bytes_to_unicode()
        ranks = self.enc._mergeable_ranks
        vocab, merges = {}, []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            vocab["".join(byte_char[b] for b in token)] = rank
            if len(token) > 1:
                a, b = _last_merge(ranks, token, rank)
                merges.append(("".join(byte_char[x] for x in a), "".join(byte_char[x] for x in b)))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.enc._pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, _ in sorted(self.special_tokens.items(), key=lambda kv: kv[1])])
        return tok.to_str()


def _last_merge(ranks: dict, token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The pair of lower-ranked tokens BPE merges last to form `token`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]
    if len(parts) != 2:
        raise TokenizerError(f"cannot recover the merge of tiktoken token {token!r}")
    return parts[0], parts[1]


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


def tokenizer_from_hf_folder(folder) -> Tokenizer | None:
    """The tokenizer of a Hugging Face model folder (its tokenizer.json, with the chat template and
    special-token names of tokenizer_config.json / chat_template.jinja), or None when it has none."""
    import json

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    tok = HFTokenizer.from_file(path)
    config = {}
    if (folder / "tokenizer_config.json").exists():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'} is not valid JSON ({e})") from None
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    names = {}
    for name in NAMES:
        v = config.get(name)
        names[name] = v.get("content") if isinstance(v, dict) else v
    return tok.with_chat(template, names)


def gguf_tokenizer(path, reader=None) -> HFTokenizer:
    """The byte-level BPE of a GGUF file with its chat template and special-token names
    (jaxlm.data.gguf_vocab)."""
    tok, template, names = gguf_vocab.gguf_bpe(path, reader)
    return HFTokenizer(tok).with_chat(template, names)


def load_tokenizer(spec) -> Tokenizer:
    """From a spec dict (as `Tokenizer.spec()` writes) or a string: `path/tokenizer.json` or a HF
    model folder, `gguf:path.gguf`, `path/x.tiktoken` (preset from the file name),
    `PRESET:path.tiktoken`, or `asset:NAME` (shipped)."""
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "hf":
            tok = HFTokenizer.from_str(spec["json"]) if "json" in spec else HFTokenizer.from_file(spec["path"])
        elif kind == "tiktoken":
            tok = TiktokenTokenizer(spec["path"], spec.get("preset", "o200k_base"))
        else:
            raise TokenizerError(f"unknown tokenizer kind {kind!r} (hf | tiktoken)")
        return tok.with_chat(spec.get("chat_template", ""), spec.get("names"))
    s = str(spec)
    if s.startswith("asset:"):
        from jaxlm import ASSETS

        s = str(ASSETS / s[len("asset:"):])
    if s.startswith("gguf:"):
        return gguf_tokenizer(s[len("gguf:"):])
    if ":" in s and s.split(":", 1)[0] in PRESETS:
        preset, path = s.split(":", 1)
        return TiktokenTokenizer(path, preset)
    path = Path(s)
    if path.is_dir() and (path / "tokenizer.json").exists():
        return tokenizer_from_hf_folder(path)
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if path.suffix == ".json":
        if not path.exists():
            raise TokenizerError(f"tokenizer file {path} not found")
        return HFTokenizer.from_file(path)
    if path.suffix == ".tiktoken":
        preset = "gpt2" if "gpt2" in path.name or "r50k" in path.name else "o200k_base"
        return TiktokenTokenizer(path, preset)
    raise TokenizerError(f"cannot tell what tokenizer {s!r} is: give a tokenizer.json, gguf:FILE, a .tiktoken "
                         f"file, or PRESET:path with PRESET in {sorted(PRESETS)}")


# ----------------------------------------------------------------------------- chat template
def apply_chat_template(tok: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                        sanitize: bool = True, template: str | None = None, tools: Sequence[dict] | None = None):
    """The model's chat template applied to messages (jaxlm.data.chat). Returns (ids, loss_mask):
    the mask is 1 on assistant replies and their end-of-turn token (what the model must learn to
    produce), 0 on everything else.

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
    add_generation_prompt: end with the header a reply follows (`<|assistant|>`, ...).
    sanitize: special tokens written inside messages are tokenized as text.
    template: a Jinja template to use instead of the tokenizer's.
    tools: OpenAI-style tool schemas, given to the template as `tools` (as transformers does).
    """
    return chat.apply_chat_template(tok, messages, add_generation_prompt=add_generation_prompt, sanitize=sanitize,
                                    template=template, tools=tools)
