"""The chat client: retries with backoff (and Retry-After), the on-disk cache, the concurrency cap, token
accounting and the judge helpers, against test endpoints (httpx mock transports)."""

import asyncio
import json
import time

import httpx
import pytest

from jaxlm.errors import JaxlmError
from jaxlm.infer.client import ChatClient, ClientError, canonical_key, parse_choice, parse_json_reply

MSG = [{"role": "user", "content": "hi"}]


def reply(text, prompt=3, completion=2):
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


class Endpoint:
    """A test server: `fail` answers (status, headers) first, then replies from `answer(body)`."""

    def __init__(self, fail=(), answer=lambda body: reply("ok"), delay=0.0):
        self.fail, self.answer, self.delay = list(fail), answer, delay
        self.calls, self.times, self.in_flight, self.max_in_flight, self.headers = 0, [], 0, 0, []

    async def __call__(self, request: httpx.Request):
        self.calls += 1
        self.times.append(time.monotonic())
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                f = self.fail.pop(0)
                if isinstance(f, Exception):
                    raise f
                status, headers = f
                return httpx.Response(status, headers=headers, json={"error": {"message": "busy", "type": "x",
                                                                                "param": None, "code": None}})
            return httpx.Response(200, json=self.answer(json.loads(request.content)))
        finally:
            self.in_flight -= 1

    def client(self, **kw):
        kw = {"model": "m", "progress": False, "backoff": 0.01, **kw}
        return ChatClient("http://test/v1", transport=httpx.MockTransport(self), **kw)


def test_retries_then_succeeds_and_respects_retry_after():
    ep = Endpoint(fail=[(503, {}), (429, {"Retry-After": "0.4"})])
    with ep.client(api_key="sk-secret", retries=3) as c:
        r = c.chat(MSG)
    assert r.text == "ok" and ep.calls == 3 and c.usage["retries"] == 2
    assert ep.times[2] - ep.times[1] >= 0.4  # waited at least the server's Retry-After
    assert ep.headers[0]["authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(c)


def test_connection_errors_and_timeouts_are_retried_then_reported():
    ep = Endpoint(fail=[httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
    with ep.client(retries=2) as c:
        assert c.chat(MSG).text == "ok"
    ep = Endpoint(fail=[(500, {})] * 5)
    with ep.client(retries=2) as c, pytest.raises(ClientError, match="after 3 attempts"):
        c.chat(MSG)
    assert ep.calls == 3


def test_a_bad_request_is_not_retried():
    ep = Endpoint(fail=[(400, {})])
    with ep.client(retries=5) as c, pytest.raises(ClientError, match="HTTP 400") as e:
        c.chat(MSG)
    assert ep.calls == 1 and e.value.status == 400


def test_cache_hits_send_nothing(tmp_path):
    ep = Endpoint(answer=lambda body: reply(body["messages"][0]["content"].upper()))
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    with ep.client(cache_dir=tmp_path, api_key="sk-never-cached") as c:
        first = c.chat_many(convs, temperature=0)
        assert ep.calls == 5 and c.usage["prompt_tokens"] == 15 and c.usage["completion_tokens"] == 10
    with ep.client(cache_dir=tmp_path, api_key="another-key") as c:  # a re-run: a new client, the same requests
        again = c.chat_many(convs, temperature=0)
        assert ep.calls == 5 and c.usage["cached"] == 5 and c.usage["requests"] == 0
        assert [r.text for r in again] == [r.text for r in first] == [f"Q{i}" for i in range(5)]
        assert all(r.cached for r in again)
        c.chat(convs[0], temperature=0.5)  # another request is not a hit
        assert ep.calls == 6
    for f in tmp_path.rglob("*.json"):
        assert "sk-" not in f.read_text() and "another-key" not in f.read_text()
    assert canonical_key("/chat/completions", {"a": 1, "b": 2}) == canonical_key("/chat/completions", {"b": 2, "a": 1})


def test_concurrency_cap():
    ep = Endpoint(delay=0.1)
    with ep.client(concurrency=3) as c:
        out = c.chat_many([MSG] * 12)
    assert len(out) == 12 and ep.max_in_flight == 3


def test_async_use_from_another_loop():
    ep = Endpoint(delay=0.05)

    async def main(c):
        return await asyncio.gather(*(c.achat(MSG) for _ in range(4)))

    with ep.client(concurrency=2) as c:
        out = asyncio.run(main(c))
    assert [r.text for r in out] == ["ok"] * 4 and ep.max_in_flight == 2


def test_judges_count_what_they_cannot_parse():
    answers = iter(["B", "**A**", "I think both A and B", "no idea", '{"score": 4, "why": "fine"}',
                    "```json\n{\"score\": 9}\n```", '{"score": "high"}', "nothing"])
    ep = Endpoint(answer=lambda body: reply(next(answers)))
    with ep.client() as c:
        verdicts = c.judge_many(["which?"] * 4, choices=["A", "B"])
        assert [v.value for v in verdicts] == ["B", "A", None, None]
        assert [v.ok for v in verdicts] == [True, True, False, False] and c.parse_failures["judge"] == 2
        schema = {"type": "object", "required": ["score"],
                  "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}}}
        got = [c.judge_json("rate it", schema) for _ in range(4)]
        assert [v.value for v in got] == [{"score": 4, "why": "fine"}, {"score": 9}, None, None]
        assert c.parse_failures["judge_json"] == 2 and "nothing" in c.failed_texts


def test_parsers():
    assert parse_choice("Answer: B.", ["A", "B"]) == ("B", None)
    assert parse_choice("yes", ["yes", "no"]) == ("yes", None)
    assert parse_choice("Neither", ["A", "B"])[0] is None
    assert parse_json_reply('Sure! {"a": [1, 2]} hope this helps', {"type": "object"}) == ({"a": [1, 2]}, None)
    assert parse_json_reply('{"a": 1}', {"type": "object", "required": ["b"]})[1] == "$ lacks 'b'"


def test_configuration_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env-host:1234/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    c = ChatClient(model="m")
    assert c.base_url == "http://env-host:1234/v1" and "sk-env" not in repr(c)
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(JaxlmError, match="OPENAI_BASE_URL"):
        ChatClient()
