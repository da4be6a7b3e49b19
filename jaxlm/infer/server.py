"""`jaxlm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching
engine (jaxlm.infer.engine).

    POST /v1/chat/completions   messages, n, temperature, top_p, top_k, max_tokens | max_completion_tokens,
                                stop, seed, logprobs, top_logprobs, stream (+ include_usage), tools, tool_choice
    POST /v1/completions        prompt (text, token ids, or a list of either), echo, logprobs, max_tokens 0..
    GET  /v1/models, /v1/models/{id}, /openapi.json, /health
    GET  /tokenizer_info, POST /tokenize, /detokenize   (vLLM's; lm-evaluation-harness tokenizes with them)

Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with its 4xx; a bad request
never reaches the engine. Each request is logged with its id, latency and token counts; the API key
never is. Requests and their `n` / `max_tokens` / body size are capped (untrusted input). The schemas,
tool prompt and detokenizer are in jaxlm.infer.protocol; the error handlers, the key and size guard and
the uvicorn runners in jaxlm.infer.web.

    server = Server(Engine(config, params, slots=8, max_len=2048), tokenizer, model_name="m")
    serve(server.app(), port=8000)                      # or: with Background(server.app(), port) as bg: ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxlm.errors import ConfigError
from jaxlm.infer import engine as E
from jaxlm.infer.generate import Sampling
from jaxlm.infer.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    TextStream,
    TokenizeRequest,
    active_tools,
    chat_logprob,
    could_be_tool_call,
    parse_tool_calls,
    render_chat,
    token_text,
)
from jaxlm.infer.protocol import _text as message_text
from jaxlm.infer.web import Background, Guard, install, serve  # noqa: F401 - serve, Background: this module's API

log = logging.getLogger("jaxlm.serve")


# ----------------------------------------------------------------------------- one engine request, async
class _Run:
    """One prompt in the engine, its events delivered to this event loop."""

    def __init__(self, engine: E.Engine, prompt, *, n, max_tokens, sampling, seed, stop_ids, top_logprobs=0,
                 echo_logprobs=None):
        self.engine, self.loop, self.q = engine, asyncio.get_running_loop(), asyncio.Queue()
        self.open = n
        self.req = E.Request(prompt, max_tokens, self._sink, sampling=sampling, seed=seed, n=n, stop_ids=stop_ids,
                             top_logprobs=top_logprobs, echo_logprobs=echo_logprobs)
        try:
            ok = engine.submit(self.req)
        except ConfigError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        if not ok:
            raise APIError(429, "the server is busy (request queue full); retry later", type="rate_limit_exceeded",
                           code="server_busy", headers={"Retry-After": "1"})

    def _sink(self, choice, ev):
        self.loop.call_soon_threadsafe(self.q.put_nowait, (choice, ev))

    async def events(self):
        while self.open:
            choice, ev = await self.q.get()
            if isinstance(ev, E.Finish):
                self.open -= 1
            yield choice, ev

    def cancel(self, choice: int = -1):
        if self.open:
            self.engine.cancel(self.req, choice)


async def _watch_disconnect(request: Request, runs):
    """Cancel the engine work of a client that has gone (frees its slots at the next step)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            for r in runs:
                r.cancel()
            return


def _seed(seed):
    return secrets.randbits(32) if seed is None else seed


def _sampling(body, default_temperature=1.0):
    t = default_temperature if body.temperature is None else body.temperature
    return Sampling(temperature=t, top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p)


def _stops(stop) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


class _Choice:
    def __init__(self, tok, stop, stop_ids):
        self.text = TextStream(tok, stop, skip_ids=stop_ids)
        self.tokens = 0
        self.finish: str | None = None
        self.held = ""  # streamed text held back while it may be a tool call
        self.released = False  # it is plain text: stream it as it comes
        self.logprobs: list = []


# ----------------------------------------------------------------------------- the app
class Server:
    def __init__(self, engine: E.Engine, tokenizer, *, model_name: str, api_key: str | None = None, max_n: int = 8,
                 max_body_bytes: int = 4 << 20, system_prompt: str | None = None):
        self.engine, self.tok, self.name, self.api_key = engine, tokenizer, model_name, api_key
        self.system_prompt = system_prompt  # added to every chat's system message (GPA-CT rubrics)
        self.max_n, self.max_body_bytes = max_n, max_body_bytes
        self.context = engine.max_len
        self.created = int(time.time())
        self.stop_ids = list(tokenizer.stop_ids)

    # -- helpers --------------------------------------------------------------------------------
    def _with_system(self, messages):
        """The request's messages with the server's system prompt after its own system message (or first)."""
        if not self.system_prompt:
            return messages
        if messages and messages[0].role in ("system", "developer"):
            own = message_text(messages[0].content)
            first = messages[0].model_copy(update={"role": "system",
                                                   "content": f"{own}\n\n{self.system_prompt}" if own else self.system_prompt})
            return [first, *messages[1:]]
        return [Message(role="system", content=self.system_prompt), *messages]

    def _check_model(self, model: str):
        if model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")

    def _check_n(self, n: int):
        if n > self.max_n:
            raise APIError(400, f"n = {n} is more than this server's cap of {self.max_n}", param="n")

    def _max_tokens(self, prompt_len: int, asked: int | None, prompt_param: str) -> int:
        left = self.context - prompt_len
        if left < (0 if asked == 0 else 1):
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, but the prompt has "
                           f"{prompt_len} tokens", param=prompt_param, code="context_length_exceeded")
        if asked is None:
            return left
        if asked > left:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len} tokens and {asked} were asked for ({prompt_len + asked} in all)",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    def _chunk(self, rid, obj, choices, **extra):
        return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                                      "choices": choices, **extra}) + "\n\n"

    def _log(self, rid, endpoint, status, t0, prompt=0, completion=0, ttft=None):
        log.info("%s %s %s %.3fs prompt_tokens=%d completion_tokens=%d%s", rid, endpoint, status,
                 time.perf_counter() - t0, prompt, completion, "" if ttft is None else f" ttft={ttft:.3f}s")

    # -- chat -----------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request):
        t0, rid = time.perf_counter(), "chatcmpl-" + uuid.uuid4().hex
        self._check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        self._check_n(body.n)
        tools = active_tools(body)
        ids = render_chat(self.tok, self._with_system(body.messages), tools, body.tool_choice)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self._max_tokens(len(ids), asked, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else 0
        run = _Run(self.engine, ids, n=body.n, max_tokens=max_tokens, sampling=_sampling(body),
                   seed=_seed(body.seed), stop_ids=[] if body.ignore_eos else self.stop_ids, top_logprobs=top)
        choices = [_Choice(self.tok, _stops(body.stop), self.stop_ids) for _ in range(body.n)]
        ctx = dict(rid=rid, t0=t0, ids=ids, run=run, choices=choices, tools=tools, body=body)
        if body.stream:
            return StreamingResponse(self._chat_stream(request, **ctx), media_type="text/event-stream",
                                     headers={"x-request-id": rid})
        watch = asyncio.create_task(_watch_disconnect(request, [run]))
        try:
            async for c, ev in run.events():
                self._chat_event(run, choices[c], c, ev, body.logprobs)
        finally:
            watch.cancel()
            run.cancel()
        out = []
        for i, ch in enumerate(choices):
            if ch.finish == "error":
                raise APIError(500, "generation failed", type="server_error")
            text = ch.text.text
            calls = parse_tool_calls(text, tools) if tools else None
            msg = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
                {"role": "assistant", "content": text}
            out.append({"index": i, "message": msg, "logprobs": {"content": ch.logprobs} if body.logprobs else None,
                        "finish_reason": "tool_calls" if calls else ch.finish})
        usage = self._usage(len(ids), choices)
        self._log(rid, "chat", 200, t0, usage["prompt_tokens"], usage["completion_tokens"])
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                             "system_fingerprint": None, "choices": out, "usage": usage},
                            headers={"x-request-id": rid})

    @staticmethod
    def _usage(prompt_len, choices):
        done = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done}

    def _chat_event(self, run, ch, c, ev, want_logprobs):
        """Apply one engine event to a choice; returns the new text (and logprobs) to stream."""
        if ch.finish is not None:
            return "", None, False
        if isinstance(ev, E.Token):
            ch.tokens += 1
            lp = chat_logprob(self.tok, ev.id, ev.logprob, ev.top) if want_logprobs else None
            if lp is not None:
                ch.logprobs.append(lp)
            text, stopped = ch.text.add(ev.id)
            if stopped:
                ch.finish = "stop"
                run.cancel(c)
            return text, lp, stopped
        if isinstance(ev, E.Finish):
            ch.finish = {"stop": "stop", "length": "length"}.get(ev.reason, ev.reason)
            return ch.text.flush(), None, True
        return "", None, False

    async def _chat_stream(self, request, *, rid, t0, ids, run, choices, tools, body):
        obj, ttft, status = "chat.completion.chunk", None, 200
        watch = asyncio.create_task(_watch_disconnect(request, [run]))
        try:
            for i in range(body.n):
                yield self._chunk(rid, obj, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}])
            async for c, ev in run.events():
                ch = choices[c]
                if ch.finish is not None and not isinstance(ev, E.Finish):
                    continue
                was_done = ch.finish is not None
                text, lp, ended = self._chat_event(run, ch, c, ev, body.logprobs)
                if was_done:
                    continue
                if ttft is None and isinstance(ev, E.Token):
                    ttft = time.perf_counter() - t0
                if tools and not ch.released:
                    ch.held += text
                    text = ""
                    if not ended and not could_be_tool_call(ch.held):
                        text, ch.held, ch.released = ch.held, "", True
                delta = {"content": text} if text else {}
                if delta or lp:
                    yield self._chunk(rid, obj, [{"index": c, "delta": delta,
                                                  "logprobs": {"content": [lp]} if lp else None, "finish_reason": None}])
                if ended:
                    if ch.finish == "error":
                        status = 500
                        yield "data: " + json.dumps(APIError(500, "generation failed", type="server_error").body()) + "\n\n"
                    reason = ch.finish
                    if tools and ch.held:
                        calls = parse_tool_calls(ch.held, tools)
                        if calls:
                            reason = "tool_calls"
                            delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                        else:
                            delta = {"content": ch.held}
                        ch.held = ""
                        yield self._chunk(rid, obj, [{"index": c, "delta": delta, "logprobs": None,
                                                      "finish_reason": None}])
                    yield self._chunk(rid, obj, [{"index": c, "delta": {}, "logprobs": None, "finish_reason": reason}])
            if body.stream_options and body.stream_options.include_usage:
                yield self._chunk(rid, obj, [], usage=self._usage(len(ids), choices))
            yield "data: [DONE]\n\n"
        finally:
            watch.cancel()
            run.cancel()
            usage = self._usage(len(ids), choices)
            self._log(rid, "chat stream", status if not run.open else 499, t0, usage["prompt_tokens"],
                      usage["completion_tokens"], ttft)

    # -- completions ----------------------------------------------------------------------------
    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tok.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tok.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise APIError(400, "prompt must be a string, a list of strings, token ids, or a list of token-id lists",
                           param="prompt")
        vocab = self.engine.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
            if max(p) >= vocab or min(p) < 0:
                raise APIError(400, f"prompt {i} has a token id outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            if len(p) > self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens, but prompt {i} "
                               f"has {len(p)} tokens", param="prompt", code="context_length_exceeded")
        return prompts

    async def completions(self, body: CompletionRequest, request: Request):
        t0, rid = time.perf_counter(), "cmpl-" + uuid.uuid4().hex
        self._check_model(body.model)
        self._check_n(body.n)
        prompts = self._prompts(body.prompt)
        if len(prompts) * body.n > 64 * self.max_n:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is too many for one request", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 needs echo=true (scoring the prompt)", param="max_tokens")
        want = body.logprobs
        runs = []
        for p in prompts:
            runs.append(_Run(self.engine, p, n=body.n, max_tokens=self._max_tokens(len(p), body.max_tokens, "prompt"),
                             sampling=_sampling(body), seed=_seed(body.seed),
                             stop_ids=[] if body.ignore_eos else self.stop_ids,
                             top_logprobs=want or 0, echo_logprobs=want if (body.echo and want is not None) else None))
        if body.stream:
            return StreamingResponse(self._completion_stream(request, rid, t0, body, prompts, runs),
                                     media_type="text/event-stream", headers={"x-request-id": rid})
        watch = asyncio.create_task(_watch_disconnect(request, runs))
        try:
            results = await asyncio.gather(*(self._collect(run, body, p) for run, p in zip(runs, prompts)))
        finally:
            watch.cancel()
            for r in runs:
                r.cancel()
        choices, completion = [], 0
        for pi, (chs, echo_lp) in enumerate(results):
            for c, ch in enumerate(chs):
                if ch.finish == "error":
                    raise APIError(500, "generation failed", type="server_error")
                completion += ch.tokens
                text = ch.text.text
                lps = None
                if want is not None:
                    lps = self._completion_logprobs(prompts[pi] if body.echo else [], echo_lp, ch.logprobs)
                if body.echo:
                    text = self.tok.decode(prompts[pi]) + text
                choices.append({"index": pi * body.n + c, "text": text, "logprobs": lps, "finish_reason": ch.finish})
        prompt_tokens = sum(map(len, prompts))
        self._log(rid, "completions", 200, t0, prompt_tokens, completion)
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.name,
                             "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                           "completion_tokens": completion,
                                                           "total_tokens": prompt_tokens + completion}},
                            headers={"x-request-id": rid})

    async def _collect(self, run, body, prompt):
        chs = [_Choice(self.tok, _stops(body.stop), self.stop_ids) for _ in range(body.n)]
        echo = None
        async for c, ev in run.events():
            if isinstance(ev, E.PromptLogprobs):
                echo = ev
                continue
            ch = chs[c]
            if isinstance(ev, E.Token) and ch.finish is None and body.logprobs is not None:
                ch.logprobs.append((ev.id, ev.logprob, ev.top))
            self._chat_event(run, ch, c, ev, False)
        return chs, echo

    def _completion_logprobs(self, prompt, echo, generated):
        """Legacy `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
        tokens, lps, tops = [], [], []
        if prompt:
            tokens = list(prompt)
            lps = list(echo.logprobs) if echo else [None] * len(prompt)
            tops = [None if t is None else {token_text(self.tok, i): lp for i, lp in t}
                    for t in (echo.top if echo else [None] * len(prompt))]
        for i, lp, top in generated:
            tokens.append(i)
            lps.append(lp)
            tops.append({token_text(self.tok, j): v for j, v in top})
        strs = [token_text(self.tok, t) for t in tokens]
        offsets, pos = [], 0
        for s in strs:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _completion_stream(self, request, rid, t0, body, prompts, runs):
        obj, ttft, completion = "text_completion", None, 0
        watch = asyncio.create_task(_watch_disconnect(request, runs))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(pi, run):
            async for c, ev in run.events():
                await queue.put((pi, c, ev))
            await queue.put((pi, None, None))

        tasks = [asyncio.create_task(pump(pi, r)) for pi, r in enumerate(runs)]
        states = [[_Choice(self.tok, _stops(body.stop), self.stop_ids) for _ in range(body.n)] for _ in prompts]
        try:
            if body.echo:
                for pi, p in enumerate(prompts):
                    for c in range(body.n):
                        yield self._chunk(rid, obj, [{"index": pi * body.n + c, "text": self.tok.decode(p),
                                                      "logprobs": None, "finish_reason": None}])
            left = len(runs)
            while left:
                pi, c, ev = await queue.get()
                if c is None:
                    left -= 1
                    continue
                if isinstance(ev, E.PromptLogprobs):
                    continue
                ch = states[pi][c]
                if ch.finish is not None:
                    continue
                if isinstance(ev, E.Token):
                    completion += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                text, _, ended = self._chat_event(runs[pi], ch, c, ev, False)
                lps = None
                if body.logprobs is not None and isinstance(ev, E.Token):
                    lps = self._completion_logprobs([], None, [(ev.id, ev.logprob, ev.top)])
                if text or lps or ended:
                    yield self._chunk(rid, obj, [{"index": pi * body.n + c, "text": text, "logprobs": lps,
                                                  "finish_reason": ch.finish if ended else None}])
            if body.stream_options and body.stream_options.include_usage:
                p = sum(map(len, prompts))
                yield self._chunk(rid, obj, [], usage={"prompt_tokens": p, "completion_tokens": completion,
                                                       "total_tokens": p + completion})
            yield "data: [DONE]\n\n"
        finally:
            watch.cancel()
            for t in tasks:
                t.cancel()
            for r in runs:
                r.cancel()
            self._log(rid, "completions stream", 200, t0, sum(map(len, prompts)), completion, ttft)

    # -- models and tokenizer -------------------------------------------------------------------
    def model_card(self):
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "jaxlm",
                "max_model_len": self.context}

    def tokenizer_info(self):
        names = {v: k for k, v in self.tok.special_tokens.items()}
        eos = self.stop_ids[-1] if self.stop_ids else self.tok.eos_id
        return {"tokenizer_class": type(self.tok).__name__, "eos_token": names.get(eos),
                "bos_token": names.get(getattr(self.tok, "bos_id", -1)), "pad_token": names.get(self.tok.pad_id),
                "chat_template": self.tok.chat_template or None, "model_max_length": self.context,
                "vocab_size": self.tok.vocab_size}

    def tokenize(self, body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        ids = self.tok.encode(body.prompt) if body.prompt is not None else render_chat(self.tok, body.messages)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def detokenize(self, body: DetokenizeRequest):
        if any(t >= self.tok.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be below {self.tok.vocab_size}", param="tokens")
        return {"prompt": self.tok.decode(body.tokens)}

    # -- wiring ---------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="jaxlm serve", version="1", description="OpenAI-compatible API over a jaxlm checkpoint",
                      lifespan=self._lifespan)
        install(app)
        app.post("/v1/chat/completions", summary="Chat completion (OpenAI)")(self.chat)
        app.post("/v1/completions", summary="Text completion (OpenAI, legacy)")(self.completions)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self.model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            self._check_model(model_id)
            return self.model_card()

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.name, "slots": self.engine.slots, "busy": self.engine.busy,
                    "queued": self.engine.queued}

        app.get("/tokenizer_info")(self.tokenizer_info)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        return Guard(app, self.api_key, self.max_body_bytes)

    async def _lifespan(self, app):
        self.engine.start()
        yield
        self.engine.close()


__all__ = ["Background", "Server", "serve"]
