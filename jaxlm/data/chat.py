"""Chat templates: the model's own Jinja template, rendered in a sandbox, tokenized, with the loss
mask over assistant turns.

Rendering follows transformers' `apply_chat_template`: an `ImmutableSandboxedEnvironment` with
trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML, and the tokenizer's special tokens (bos_token, eos_token, ...)
as variables. The rendered text is tokenized as a whole with special tokens recognised, so the ids
equal transformers' for the same template and tokenizer.

Two additions:
  * The loss mask. A token is in it when it overlaps the text an assistant turn adds after the
    generation prompt: render(messages[:i], add_generation_prompt=True) is a prefix of
    render(messages[:i + 1]), and the difference (trailing whitespace dropped) is what the model
    must produce: the reply and its end-of-turn token. Templates with `{% generation %}` blocks
    mark that text themselves. A template that does not render prefix-wise falls back to finding
    each reply's content (plus a following end-of-turn token) in order.
  * Sanitising (on by default, as jaxlm's data is untrusted): special tokens written inside message
    strings are tokenized as plain text, not as control tokens, as transformers does with
    `sanitize_control_tokens=True`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime

from jaxlm.errors import TokenizerError

ROLES = ("system", "user", "assistant", "tool")
# private-use markers around special tokens found in message strings (transformers uses the same)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
_TRACK: ContextVar = ContextVar("jaxlm_generation_spans", default=None)


@functools.lru_cache(maxsize=32)
def compile_template(template: str):
    """The compiled Jinja template (sandboxed); TokenizerError when it does not parse."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text (transformers' tag)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _TRACK.get()
            if tracking is not None:  # (pieces rendered so far, spans)
                start = sum(map(len, tracking[0]))
                tracking[1].append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template does not parse: {e}") from None


def _render(template: str, messages, add_generation_prompt: bool, variables: dict):
    """(text, spans of its `{% generation %}` blocks) of one rendering."""
    import jinja2

    compiled = compile_template(template)
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACK.set((pieces, spans))
    try:
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            pieces.append(piece)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template failed on this conversation: {e}") from None
    finally:
        _TRACK.reset(token)
    return "".join(pieces), spans


def _mark(obj, pattern):
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj) if pattern else obj
    if isinstance(obj, dict):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_mark(v, pattern) for v in obj]
    return obj


def _check(messages: Sequence[dict]) -> list[dict]:
    out = []
    for n, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES or not isinstance(content, str):
            raise TokenizerError(f"message {n} needs role in system|user|assistant|tool and string content, got {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def assistant_spans(template: str, messages: list[dict], full: str, variables: dict, stop_texts=()) -> list:
    """Character spans of `full` (the rendering of `messages`) that the assistant turns produce."""
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre, _ = _render(template, messages[:i], True, variables)
        post, _ = _render(template, messages[: i + 1], False, variables)
        if post.startswith(pre) and full.startswith(post):
            start, end = len(pre), len(pre) + len(post[len(pre):].rstrip())
        else:  # not prefix-wise: find the reply's text (and a following end-of-turn token) in order
            start = full.find(m["content"], cursor)
            if start < 0:
                raise TokenizerError(f"cannot find assistant message {i} in the rendered chat: the chat template "
                                     f"rewrites it, so its loss mask is unknown")
            end = start + len(m["content"])
            end += next((len(s) for s in stop_texts if s and full.startswith(s, end)), 0)
        spans.append((start, end))
        cursor = max(cursor, end)
    return spans


def encode_chat(tok, text: str, pattern) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a rendered chat and their character spans in it. Special tokens marked by
    `_mark` are encoded as text; every piece after the first is encoded after a newline that is
    then dropped (as transformers does), so that it tokenizes as it would mid-text."""
    if pattern is None or (MARK_START not in text and MARK_END not in text):
        return tok.encode_with_offsets(text, special=True)
    markers = re.compile(f"{MARK_START}({pattern.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
    pieces, cursor = [], 0  # (text, where it starts, as plain text)
    for m in markers.finditer(text):
        pieces.append((text[cursor:m.start()], cursor, False))
        if m.group(1) is not None:
            pieces.append((m.group(1), m.start(1), True))
        cursor = m.end()
    pieces.append((text[cursor:], cursor, False))
    newline = tok.encode_with_offsets("\n", special=True)[0]
    ids, offsets = [], []
    for n, (piece, start, as_text) in enumerate(pieces):
        if not piece:
            continue
        if n == 0:
            piece_ids, piece_off = tok.encode_with_offsets(piece, special=True)
        else:
            piece_ids, piece_off = tok.encode_with_offsets("\n" + piece, special=not as_text)
            if piece_ids[: len(newline)] == newline:
                piece_ids, piece_off = piece_ids[len(newline):], [(s - 1, e - 1) for s, e in piece_off[len(newline):]]
            else:
                piece_ids, piece_off = tok.encode_with_offsets(piece, special=not as_text)
        ids += piece_ids
        offsets += [(start + max(s, 0), start + max(e, 0)) for s, e in piece_off]
    return ids, offsets


def apply_chat_template(tok, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                        sanitize: bool = True, template: str | None = None, tools: Sequence[dict] | None = None):
    """Render `messages` with the tokenizer's chat template (or `template`) and tokenize it.

    Returns (ids, loss_mask): the mask is 1 on the tokens of assistant turns (the reply and its
    end-of-turn token) and 0 elsewhere. messages: [{"role": "system"|"user"|"assistant"|"tool",
    "content": str}, ...]. add_generation_prompt: end with the header a reply follows.
    sanitize: special tokens inside message strings stay text.
    tools: OpenAI-style tool schemas ({"type": "function", "function": {...}}), given to the template
    as `tools` (as transformers does); a template that does not use them ignores them.
    """
    template = template or tok.chat_template
    if not template:
        raise TokenizerError("the tokenizer has no chat template",
                             hint="use a model that ships one, or a tokenizer with the Phi chat tokens")
    messages = _check(messages)
    pattern = None
    if sanitize and tok.special_tokens:
        pattern = re.compile("|".join(re.escape(t) for t in sorted(tok.special_tokens, key=len, reverse=True)))
        messages = _mark(messages, pattern)
    variables = tok.template_variables()
    if tools:
        variables = {**variables, "tools": list(tools)}
    full, spans = _render(template, messages, add_generation_prompt, variables)
    if not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        spans = assistant_spans(template, messages, full, variables, tok.stop_texts)
    ids, offsets = encode_chat(tok, full, pattern)
    mask = [0] * len(ids)
    k = 0
    for n, (s, e) in enumerate(offsets):  # a token overlapping a span is in the mask
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if e > spans[k][0]:
            mask[n] = 1
    return ids, mask


def render(tok, messages: Sequence[dict], *, add_generation_prompt: bool = False, template: str | None = None) -> str:
    """The chat as text (no sanitising: for display and for other tokenizers)."""
    template = template or tok.chat_template
    if not template:
        raise TokenizerError("the tokenizer has no chat template")
    return _render(template, _check(messages), add_generation_prompt, tok.template_variables())[0]
