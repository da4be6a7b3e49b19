"""The byte-level BPE described by a GGUF file's metadata (`tokenizer.ggml.*`), built with HF
tokenizers: tokens, merges, llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`, special tokens
(CONTROL tokens special, USER_DEFINED ones plain added tokens, as llama.cpp and transformers treat
them), the chat template and the special-token names. Plus GPT-2's byte alphabet, which every
byte-level vocabulary spells its tokens in."""

from __future__ import annotations

from pathlib import Path

from jaxlm.errors import TokenizerError

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (byte-level BPE vocabularies use it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


# llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`) as regexes, applied in order (llama-vocab.cpp)
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # HF's ByteLevel regex
_LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {
    **dict.fromkeys(("gpt2", "default", "mpt", "olmo"), (_GPT2_PAT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    (r"\p{N}", _GPT2_PAT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), (_LLAMA3_PAT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2_PAT,)),
    **dict.fromkeys(("gpt-4o", "llama4"), (O200K_PAT,)),
}
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_bpe(path, reader=None):
    """(tokenizers.Tokenizer, chat template, {bos_token: ..., eos_token: ...}) of a GGUF file whose
    tokenizer.ggml.model is "gpt2" (byte-level BPE). `reader`: an open gguf.GGUFReader of it."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _T

    if reader is None:
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"GGUF file {path} not found")
        try:
            import gguf

            reader = gguf.GGUFReader(str(path))
        except ImportError:
            raise TokenizerError("reading GGUF files needs the gguf package", hint="pip install gguf") from None
        except Exception as e:  # noqa: BLE001 - the reader raises many kinds for a damaged file
            raise TokenizerError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"GGUF {path}: tokenizer.ggml.model {model!r} is not supported "
                             f"(jaxlm reads byte-level BPE, 'gpt2')")
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise TokenizerError(f"GGUF {path}: pre-tokenizer tokenizer.ggml.pre {pre!r} is not supported "
                             f"(jaxlm knows {sorted(GGUF_PRE)})")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges")
    types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens or ())
    if not tokens or merges is None:
        raise TokenizerError(f"GGUF {path} has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(t):
        return t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    tok = _T(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                        ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pat), behavior="isolated") for pat in GGUF_PRE[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == 3 and set(t) <= alphabet]  # 3: CONTROL
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    names = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        i = _gguf_field(reader, f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            names[name] = tokens[int(i)]
    return tok, _gguf_field(reader, "tokenizer.chat_template") or "", names
