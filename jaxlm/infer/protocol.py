"""The OpenAI protocol as jaxlm serves it: request schemas (pydantic, strict: a wrong type is a 400, and
they make /openapi.json), the error body, chat rendering with tools, tool-call parsing and the
incremental detokenizer that holds back stop strings.

Tools. When the model's chat template takes tools (`apply_chat_template(..., tools=...)` and a
template that mentions them), they go through it. Otherwise the default tool prompt below is added
to the system message, and a reply that is a JSON function call (optionally in <tool_call> tags or a
```json fence) comes back as `tool_calls` with finish_reason "tool_calls":

    DEFAULT_TOOL_PROMPT + one JSON line per function ({"name", "description", "parameters"})
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from jaxlm.data.tokenizer import apply_chat_template
from jaxlm.errors import TokenizerError

MAX_TOP_LOGPROBS = 20  # OpenAI's cap
MAX_STOP = 4  # OpenAI's cap on stop sequences

DEFAULT_TOOL_PROMPT = (
    "You can call the following tools. To call a tool, reply with only a JSON object of the form "
    '{"name": "<tool name>", "arguments": {"<argument>": <value>, ...}} and nothing else.\n\nTools:\n')


class APIError(Exception):
    """An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- request schemas
def _integral(v):
    """JSON Schema's integer: 3.0 is one (strict pydantic would refuse it); 3.5, "3" and true are not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    # strict: "0.5" is not a number; unknown fields are ignored (as vLLM does), not an error
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Sampled(_Strict):
    model: str
    n: Annotated[int, Field(ge=1), BeforeValidator(_integral)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0), BeforeValidator(_integral)] | None = None  # an extension (vLLM has it too); 0 = off
    stop: Stop = None
    seed: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # an extension (vLLM's): generate past end-of-turn tokens, up to max_tokens


class ChatCompletionRequest(_Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_integral)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Annotated[int, Field(ge=0), BeforeValidator(_integral)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_integral)] | None = None


class TokenizeRequest(_Strict):
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    tokens: list[Annotated[int, Field(ge=0), BeforeValidator(_integral)]]


# ----------------------------------------------------------------------------- chat rendering and tools
def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def tool_call_text(calls: list[ToolCall]) -> str:
    """How an earlier assistant tool call is shown back to the model (the format it is asked to use)."""
    out = [json.dumps({"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}) for c in calls]
    return "\n".join(out)


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s


def _template_takes_tools(tok) -> bool:
    return "tools" in inspect.signature(apply_chat_template).parameters and "tools" in (tok.chat_template or "")


def tool_prompt(tools: list[Tool], choice) -> str:
    lines = [json.dumps(t.function.model_dump(exclude_none=True)) for t in tools]
    text = DEFAULT_TOOL_PROMPT + "\n".join(lines)
    if choice == "required":
        text += "\n\nYou must call one of these tools."
    elif isinstance(choice, NamedToolChoice):
        text += f"\n\nYou must call the tool {choice.function.name}."
    return text


def active_tools(req: ChatCompletionRequest) -> list[Tool]:
    """The tools the model may call (none with tool_choice "none"; only the named one when named)."""
    if not req.tools or req.tool_choice == "none":
        return []
    if isinstance(req.tool_choice, NamedToolChoice):
        named = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice names {req.tool_choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        return named
    return list(req.tools)


def render_chat(tok, messages: list[Message], tools: list[Tool] | None = None, tool_choice=None) -> list[int]:
    """Prompt token ids of a chat: the model's chat template, with the tools in it (or in the default
    tool prompt when the template has no tool support), ending with the assistant's turn."""
    msgs = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        content = _text(m.content)
        if m.role == "assistant" and m.tool_calls:
            content = (content + "\n" if content else "") + tool_call_text(m.tool_calls)
        msgs.append({"role": role, "content": content})
    kwargs = {}
    if tools:
        if _template_takes_tools(tok):
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
        else:
            prompt = tool_prompt(tools, tool_choice)
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {"role": "system", "content": prompt + "\n\n" + msgs[0]["content"]}
            else:
                msgs.insert(0, {"role": "system", "content": prompt})
    try:
        ids, _ = apply_chat_template(tok, msgs, add_generation_prompt=True, **kwargs)
    except TokenizerError as e:
        raise APIError(400, f"messages cannot be rendered with the model's chat template: {e}",
                       param="messages") from None
    return list(ids)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_TAGS = re.compile(r"^<tool_call>\s*(.*?)\s*(?:</tool_call>)?$", re.S)


def parse_tool_calls(text: str, tools: list[Tool]) -> list[dict] | None:
    """OpenAI `tool_calls` of a reply that is a JSON function call (or a list of them, or several in
    <tool_call> tags) naming one of `tools`; None when the reply is not one."""
    s = text.strip()
    if not s or not tools:
        return None
    m = _FENCE.match(s)
    if m:
        s = m.group(1)
    parts = [p for p in re.split(r"</tool_call>\s*", s) if p.strip()] if s.startswith("<tool_call>") else [s]
    names = {t.function.name for t in tools}
    calls = []
    for part in parts:
        m = _TAGS.match(part.strip())
        body = m.group(1) if m else part
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        for c in obj if isinstance(obj, list) else [obj]:
            if not isinstance(c, dict) or c.get("name") not in names:
                return None
            args = c.get("arguments", c.get("parameters", {}))
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": c["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return calls or None


def could_be_tool_call(text: str) -> bool:
    """While streaming with tools: hold text back while it may still turn out to be a tool call."""
    s = text.lstrip()
    return not s or s[0] in "{[" or "<tool_call>".startswith(s[:11]) or "```".startswith(s[:3])


# ----------------------------------------------------------------------------- detokenizing
class TextStream:
    """The text of one choice as its tokens arrive: never emits a partial UTF-8 character, and holds back
    a tail that may be the start of a stop string; `add` returns (new text, stopped)."""

    def __init__(self, tok, stop: list[str], skip_ids=()):
        self.tok, self.stop, self.skip = tok, [s for s in stop if s], set(skip_ids)
        self.ids: list[int] = []
        self.text = ""  # the final text so far (up to a stop string once one is found)
        self.sent = 0
        self.stopped = False

    def add(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if token_id not in self.skip:
            self.ids.append(token_id)
        full = self.tok.decode(self.ids)
        cut = [i for i in (full.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0]
        if cut:
            self.text, self.stopped = full[: min(cut)], True
            return self.flush(), True
        self.text = full
        safe = len(full)
        while safe > self.sent and full[safe - 1] == "\ufffd":  # a character whose bytes are still coming
            safe -= 1
        for s in self.stop:  # the longest tail that begins a stop string
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if full[safe - k: safe] == s[:k]:
                    safe -= k
                    break
        out = full[self.sent: safe]
        self.sent = safe
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


def chat_logprob(tok, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    """One entry of choices[].logprobs.content."""
    text = token_text(tok, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := token_text(tok, i)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for i, lp in top]}
