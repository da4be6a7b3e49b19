"""A client for chat-completions servers (OpenAI, vLLM, `jaxlm serve`): the teachers and judges of the
data recipes and the judged evals.

    client = ChatClient()                          # OPENAI_BASE_URL, OPENAI_API_KEY from the environment
    client = ChatClient("http://127.0.0.1:8000/v1", model="smollm2-135m-instruct", cache_dir="cache/teacher")
    reply = client.chat([{"role": "user", "content": "Hi"}], temperature=0)
    replies = client.chat_many(conversations, max_tokens=256)          # bounded concurrency, progress bar
    verdict = client.judge("Which answer is better? ...", choices=["A", "B"])
    scores = client.judge_json("Rate the reply ...", {"type": "object", "required": ["score"],
                                                      "properties": {"score": {"type": "integer"}}})

Async underneath (one event loop in a background thread, one connection pool, one semaphore for the
concurrency cap), with a sync facade; `achat` / `ajudge` are the async forms for code that has a loop.
Retries: 429, 5xx, timeouts and connection errors, exponential backoff with jitter, at least the
server's Retry-After. The on-disk cache is keyed by the canonical request (endpoint + JSON body with
sorted keys; never the key or the server's address), so a re-run or resumed pipeline pays for nothing
twice. Token usage is counted (`client.usage`), and so are the verdicts that could not be parsed
(`client.parse_failures`): they come back with ok=False, never silently dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx

from jaxlm.errors import JaxlmError

log = logging.getLogger("jaxlm.client")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


class ClientError(JaxlmError, RuntimeError):
    """A request the server refused (4xx other than 429) or that failed after every retry."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body


@dataclasses.dataclass
class ChatResult:
    text: str | None  # the first choice's content
    finish_reason: str | None
    tool_calls: list | None
    usage: dict
    response: dict  # the whole response body
    cached: bool = False

    @property
    def texts(self) -> list[str | None]:
        return [c["message"].get("content") for c in self.response.get("choices", [])]


@dataclasses.dataclass
class Verdict:
    ok: bool  # False: the reply could not be parsed (counted in client.parse_failures)
    value: object  # the chosen label (judge) or the parsed JSON (judge_json); None when not ok
    text: str  # the judge's raw reply
    error: str = ""


def canonical_key(path: str, body: dict) -> str:
    """The cache key of a request: sha256 of the endpoint and the body as canonical JSON."""
    text = json.dumps({"path": path, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


class ChatClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None, *,
                 concurrency: int = 8, retries: int = 5, timeout: float = 120.0, cache_dir: str | Path | None = None,
                 backoff: float = 0.5, max_backoff: float = 60.0, progress: bool = True, transport=None):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise JaxlmError("no server: pass base_url or set OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1)")
        if concurrency < 1 or retries < 0:
            raise JaxlmError(f"concurrency must be >= 1 and retries >= 0 (got {concurrency}, {retries})")
        self.base_url = base_url.rstrip("/")
        self._key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.model, self.concurrency, self.retries, self.timeout = model, concurrency, retries, timeout
        self.backoff, self.max_backoff, self.progress = backoff, max_backoff, progress
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.usage: Counter = Counter()  # prompt_tokens, completion_tokens, requests, cached, retries
        self.parse_failures: Counter = Counter()  # judge / judge_json replies that could not be parsed
        self.failed_texts: list[str] = []  # the first few unparsable replies, for a report
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    def __repr__(self):  # never show the key
        return f"ChatClient({self.base_url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # -- the loop that everything runs on ---------------------------------------------------------
    def _ensure_loop(self):
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="jaxlm-client", daemon=True)
                self._thread.start()
                asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result()
        return self._loop

    async def _setup(self):
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                       transport=self._transport,
                                       limits=httpx.Limits(max_connections=self.concurrency + 4))
        self._sem = asyncio.Semaphore(self.concurrency)

    def _run(self, coro):
        """Run a coroutine on the client's loop and wait for it (the sync facade)."""
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop()).result()

    async def _on_loop(self, coro):
        """Await a coroutine that runs on the client's loop, from any other loop."""
        loop = self._ensure_loop()
        try:
            if asyncio.get_running_loop() is loop:
                return await coro
        except RuntimeError:
            pass
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def close(self):
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._http.aclose(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one request: cache, concurrency cap, retries ---------------------------------------------
    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    async def _post(self, path: str, body: dict) -> tuple[dict, bool]:
        key = canonical_key(path, body) if self.cache_dir else None
        if key:
            f = self._cache_path(key)
            if f.exists():
                try:
                    out = json.loads(f.read_text())
                    self.usage["cached"] += 1
                    return out, True
                except ValueError:
                    log.warning("unreadable cache entry %s; asking again", f)
        async with self._sem:
            out = await self._send(path, body)
        self.usage["requests"] += 1
        for k in ("prompt_tokens", "completion_tokens"):
            self.usage[k] += int((out.get("usage") or {}).get(k) or 0)
        if key:
            f = self._cache_path(key)
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(out))
            tmp.replace(f)
        return out, False

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)
        return max(d, retry_after) if retry_after is not None else d

    async def _send(self, path: str, body: dict) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                resp = await self._http.post(path, json=body)
            except httpx.TransportError as e:  # connection refused or reset, timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        last = f"HTTP {resp.status_code} with a body that is not JSON"
                else:
                    err = _error_message(resp)
                    if resp.status_code not in RETRY_STATUS:
                        raise ClientError(f"{path}: HTTP {resp.status_code}: {err}", resp.status_code,
                                          _json_or_none(resp))
                    last = f"HTTP {resp.status_code}: {err}"
                    retry_after = _retry_after(resp)
            if attempt < self.retries:
                self.usage["retries"] += 1
                delay = self._delay(attempt, retry_after)
                log.info("%s failed (%s); retry %d/%d in %.1fs", path, last, attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
        raise ClientError(f"{path}: failed after {self.retries + 1} attempts: {last}")

    # -- chat -------------------------------------------------------------------------------------
    def _body(self, messages, params) -> dict:
        model = params.pop("model", None) or self.model
        if not model:
            raise JaxlmError("no model: pass model= to ChatClient or to the call")
        return {"model": model, "messages": list(messages), **{k: v for k, v in params.items() if v is not None}}

    async def _achat(self, messages, **params) -> ChatResult:
        if params.get("stream"):
            raise JaxlmError("ChatClient returns whole replies; stream=True is not supported here")
        out, cached = await self._post("/chat/completions", self._body(messages, params))
        choice = (out.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        return ChatResult(msg.get("content"), choice.get("finish_reason"), msg.get("tool_calls"),
                          out.get("usage") or {}, out, cached)

    async def achat(self, messages, **params) -> ChatResult:
        """One chat completion (params: any request field: temperature, max_tokens, n, tools, ...)."""
        return await self._on_loop(self._achat(messages, **params))

    def chat(self, messages, **params) -> ChatResult:
        return self._run(self._achat(messages, **params))

    async def _amany(self, make, items, desc):
        """Run make(item) for every item with the concurrency cap, in order, with a progress bar."""
        results = [None] * len(items)
        progress = task = None
        if self.progress and len(items) > 1:
            from rich.console import Console
            from rich.progress import Progress

            progress = Progress(console=Console(stderr=True), transient=True)
            progress.start()
            task = progress.add_task(desc, total=len(items))

        async def one(i, item):
            results[i] = await make(item)
            if progress is not None:
                progress.advance(task)

        try:
            await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
        finally:
            if progress is not None:
                progress.stop()
        return results

    def chat_many(self, conversations, **params) -> list[ChatResult]:
        """Chat completions of many conversations (same params), at most `concurrency` in flight."""
        return self._run(self._amany(lambda m: self._achat(m, **dict(params)), list(conversations), "chat"))

    # -- judges -----------------------------------------------------------------------------------
    def _fail(self, kind: str, text: str, error: str) -> Verdict:
        self.parse_failures[kind] += 1
        if len(self.failed_texts) < 20:
            self.failed_texts.append(text)
        log.warning("%s: reply could not be parsed (%s): %.200r", kind, error, text)
        return Verdict(False, None, text, error)

    async def _ajudge(self, prompt, choices, system=None, **params) -> Verdict:
        choices = [str(c) for c in choices]
        if len(choices) < 2:
            raise JaxlmError("judge needs at least two choices")
        ask = f"{prompt}\n\nAnswer with exactly one of: {', '.join(choices)}."
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ask}]
        params.setdefault("temperature", 0)
        r = await self._achat(msgs, **params)
        text = r.text or ""
        value, error = parse_choice(text, choices)
        return Verdict(True, value, text) if error is None else self._fail("judge", text, error)

    def judge(self, prompt: str, choices, *, system: str | None = None, **params) -> Verdict:
        """Ask for one of `choices`; Verdict.value is the choice (ok=False when the reply names none or
        several)."""
        return self._run(self._ajudge(prompt, choices, system, **params))

    async def ajudge(self, prompt: str, choices, *, system: str | None = None, **params) -> Verdict:
        return await self._on_loop(self._ajudge(prompt, choices, system, **params))

    def judge_many(self, prompts, choices, **params) -> list[Verdict]:
        out = self._run(self._amany(lambda p: self._ajudge(p, choices, **dict(params)), list(prompts), "judge"))
        self._report("judge", out)
        return out

    async def _ajudge_json(self, prompt, schema, system=None, **params) -> Verdict:
        ask = (f"{prompt}\n\nReply with only a JSON value that follows this JSON schema:\n"
               f"{json.dumps(schema, sort_keys=True)}")
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ask}]
        params.setdefault("temperature", 0)
        r = await self._achat(msgs, **params)
        text = r.text or ""
        value, error = parse_json_reply(text, schema)
        return Verdict(True, value, text) if error is None else self._fail("judge_json", text, error)

    def judge_json(self, prompt: str, schema: dict, *, system: str | None = None, **params) -> Verdict:
        """Ask for JSON following `schema` (type, properties, required, enum, items, min/max); Verdict.value
        is the parsed value (ok=False when the reply has no JSON or breaks the schema)."""
        return self._run(self._ajudge_json(prompt, schema, system, **params))

    async def ajudge_json(self, prompt: str, schema: dict, *, system: str | None = None, **params) -> Verdict:
        return await self._on_loop(self._ajudge_json(prompt, schema, system, **params))

    def judge_json_many(self, prompts, schema, **params) -> list[Verdict]:
        out = self._run(self._amany(lambda p: self._ajudge_json(p, schema, **dict(params)), list(prompts),
                                    "judge"))
        self._report("judge_json", out)
        return out

    def _report(self, kind, verdicts):
        bad = sum(not v.ok for v in verdicts)
        if bad:
            log.warning("%s: %d of %d replies could not be parsed (client.parse_failures, client.failed_texts)",
                        kind, bad, len(verdicts))


# ----------------------------------------------------------------------------- parsing verdicts
def _json_or_none(resp):
    try:
        return resp.json()
    except ValueError:
        return None


def _error_message(resp) -> str:
    body = _json_or_none(resp)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:500]
    return resp.text[:500]


def parse_choice(text: str, choices: list[str]) -> tuple[str | None, str | None]:
    """(choice, None) when the reply is one choice, or names exactly one as a whole word; else
    (None, why)."""
    s = text.strip().strip("*`'\".:()[] \n").strip()
    for c in choices:
        if s.casefold() == c.casefold():
            return c, None
    found = [c for c in choices if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text, re.I)]
    if len(found) == 1:
        return found[0], None
    return None, "names none of the choices" if not found else f"names several choices ({', '.join(found)})"


_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_json_reply(text: str, schema: dict) -> tuple[object, str | None]:
    """The first JSON value in a reply (a ```json fence, the whole reply, or its first {...} / [...]),
    checked against `schema`: (value, None) or (None, why)."""
    candidates = [m.group(1) for m in _FENCED.finditer(text)] + [text]
    dec = json.JSONDecoder()
    for cand in candidates:
        for i, ch in enumerate(cand):
            if ch in "{[":
                try:
                    value, _ = dec.raw_decode(cand[i:])
                except ValueError:
                    continue
                err = schema_error(value, schema)
                return (value, None) if err is None else (None, err)
        try:
            value = json.loads(cand)
        except ValueError:
            continue
        err = schema_error(value, schema)
        return (value, None) if err is None else (None, err)
    return None, "no JSON in the reply"


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_error(value, schema: dict, where: str = "$") -> str | None:
    """The first way `value` breaks a (subset of) JSON Schema, or None."""
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = False
        for ty in types:
            if ty == "integer":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif ty == "number":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            elif ty in _TYPES:
                ok |= isinstance(value, _TYPES[ty])
        if not ok:
            return f"{where} is not of type {t}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is not one of {schema['enum']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where} is below {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where} is above {schema['maximum']}"
    if isinstance(value, dict):
        for k in schema.get("required", []):
            if k not in value:
                return f"{where} lacks {k!r}"
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                err = schema_error(value[k], sub, f"{where}.{k}")
                if err:
                    return err
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            err = schema_error(v, schema["items"], f"{where}[{i}]")
            if err:
                return err
    return None
