"""`jaxlm serve` end to end: the official `openai` package against a server started here on a tiny
checkpoint (fine-tuned in the test to emit a tool call), errors, cancellation and a bounded fuzz."""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip("openai")
portpicker = pytest.importorskip("portpicker")

from jaxlm import checkpoint  # noqa: E402
from jaxlm.data.tokenizer import load_tokenizer  # noqa: E402
from jaxlm.infer.protocol import Message, Tool, render_chat  # noqa: E402
from jaxlm.model import ModelConfig, forward, init_params  # noqa: E402

KEY = "sk-test-7c1d"  # must never show up in the server's log
CFG = ModelConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  init_std=0.3, max_position_embeddings=512)
CONTEXT = 384
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
HELLO = [{"role": "user", "content": "Good morrow, my lord. What news?"}]


def finetune_tool_caller(tok, steps=120):
    """A tiny model trained until it answers ASK (with TOOL in the default tool prompt) with CALL."""
    import optax

    prompt = render_chat(tok, [Message(**m) for m in ASK], [Tool.model_validate(TOOL)])
    seq = prompt + tok.encode(CALL, special=False) + [tok.token_id("<|end|>")]
    tokens, labels = jnp.asarray([seq[:-1]]), jnp.asarray([seq[1:]])
    mask = (jnp.arange(len(seq) - 1) >= len(prompt) - 1)[None].astype(jnp.float32)
    params = init_params(CFG, jax.random.key(0))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss(p):
            lp = jax.nn.log_softmax(forward(CFG, p, tokens), axis=-1)
            nll = -jnp.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]
            return (nll * mask).sum() / mask.sum()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    for _ in range(steps):
        params, state, value = step(params, state)
    assert float(value) < 0.05, f"the tool-call fine-tune did not converge (loss {float(value):.3f})"
    return params


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("asset:tiny_bpe.json")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tok):
    params = finetune_tool_caller(tok)
    ckpt = tmp_path_factory.mktemp("serve") / "tiny-chat"
    checkpoint.save_params(ckpt, params, {"model": CFG.to_dict()}, tok.spec())
    return ckpt, params


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    ckpt, _ = model
    port = portpicker.pick_unused_port()
    logfile = tmp_path_factory.mktemp("serve-log") / "server.log"
    with open(logfile, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "serve", "--checkpoint", str(ckpt), "--port",
                                 str(port), "--slots", "4", "--max-len", str(CONTEXT), "--max-n", "4",
                                 "--model-name", "tiny", "--max-queue", "64"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAXLM_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"jaxlm serve did not start:\n{logfile.read_text()[-3000:]}")
        time.sleep(0.3)
    yield url, logfile
    proc.terminate()
    proc.wait(timeout=30)
    assert KEY not in logfile.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)


def chat_ids(tok, messages):
    return render_chat(tok, [Message(**m) for m in messages])


# ----------------------------------------------------------------------------- the openai package
def test_chat_streamed_and_not(client, server):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    with httpx.stream("POST", server[0] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": HELLO, "max_tokens": 3, "stream": True}, timeout=120) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_greedy_equals_jaxlm_generate(client, model, capsys):
    from jaxlm.cli import main

    prompt = HELLO[0]["content"]
    assert main(["generate", "--checkpoint", str(model[0]), "--chat", "--prompt", prompt,
                 "--max-new-tokens", "16"]) == 0
    expected = capsys.readouterr().out
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    assert r.choices[0].message.content + "\n" == expected


def test_n_stop_seed_and_logprobs(client, tok, model):
    _, params = model
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=3)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, seed=5, n=3)
    assert [c.message.content for c in again.choices] == texts  # a seed fixes the draws
    # logprobs: the model's own log-softmax of the prompt + the greedy reply
    g = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = g.choices[0].logprobs.content
    ids = chat_ids(tok, HELLO)
    seq = list(ids)
    lp = None
    for entry in content:  # rebuild the greedy tokens from the model itself
        lp = jax.nn.log_softmax(forward(CFG, params, jnp.asarray([seq]))[0, -1])
        nxt = int(jnp.argmax(lp))
        assert entry.token == tok.decode([nxt])
        np.testing.assert_allclose(entry.logprob, float(lp[nxt]), atol=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], np.sort(np.asarray(lp))[::-1][:3],
                                   atol=1e-4)
        seq.append(nxt)
    # stop: the reply ends before the first stop string, finish_reason "stop"
    text = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    cut = text[len(text) // 2: len(text) // 2 + 2]
    s = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, stop=[cut, "zzz"],
                                       extra_body={"ignore_eos": True})
    assert s.choices[0].message.content == text[: text.index(cut)] and s.choices[0].finish_reason == "stop"
    st = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, stop=cut,
                                        stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in st if c.choices) == text[: text.index(cut)]


def test_tool_call(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert not "".join(d.content or "" for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"
    # the tool's answer goes back in, and a multi-turn chat renders
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[TOOL], max_tokens=4, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_completions_echo_scores_the_prompt(client, tok, model):
    _, params = model
    text = "Good morrow, my lord. What news?"
    ids = tok.encode(text)
    lp = jax.nn.log_softmax(forward(CFG, params, jnp.asarray([ids]))[0], axis=-1)
    want = [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
    got = r.choices[0].logprobs
    assert r.choices[0].text == text and got.token_logprobs[0] is None and len(got.tokens) == len(ids)
    np.testing.assert_allclose(got.token_logprobs[1:], want, atol=1e-4)
    # lm-evaluation-harness's local-completions request: token ids, a batch, max_tokens=1, echo, logprobs=1
    batch = [ids, ids[:5]]
    r = client.completions.create(model="tiny", prompt=batch, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                  seed=1234)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(sorted(r.choices, key=lambda c: c.index), batch):
        assert len(c.logprobs.token_logprobs) == len(p) + 1
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:len(p)], want[:len(p) - 1], atol=1e-4)
        greedy = [int(jnp.argmax(lp[t])) for t in range(len(p) - 1)]
        for t, (tok_lp, top) in enumerate(zip(c.logprobs.token_logprobs[1:len(p)], c.logprobs.top_logprobs[1:len(p)])):
            assert (tok_lp == max(top.values())) == (greedy[t] == p[t + 1])  # lm-eval's is_greedy test


def test_models_tokenizer_and_openapi(client, server, tok):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(server[0] + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] and info["model_max_length"] == CONTEXT
    toks = httpx.post(server[0] + "/tokenize", json={"prompt": "Hello there"}, headers=h).json()["tokens"]
    assert toks == tok.encode("Hello there")
    assert httpx.post(server[0] + "/detokenize", json={"tokens": toks}, headers=h).json()["prompt"] == "Hello there"
    spec = httpx.get(server[0] + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])


# ----------------------------------------------------------------------------- continuous batching over HTTP
def test_staggered_requests_over_http(server):
    url = server[0] + "/v1"
    reqs = [dict(temperature=0.9, seed=11, max_tokens=30), dict(temperature=0.0, max_tokens=7),
            dict(temperature=1.3, top_p=0.8, seed=12, max_tokens=18), dict(temperature=0.7, seed=13, max_tokens=11)]

    async def one(c, kw, delay=0.0):
        await asyncio.sleep(delay)
        s = await c.chat.completions.create(model="tiny", messages=HELLO, stream=True,
                                            extra_body={"ignore_eos": True}, **kw)
        return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300) as c:
            alone = [await one(c, kw) for kw in reqs]
            together = await asyncio.gather(*(one(c, kw, 0.1 * i) for i, kw in enumerate(reqs)))
            return alone, together

    alone, together = asyncio.run(main())
    assert together == alone


def test_a_late_request_finishes_first(server):
    url = server[0] + "/v1"

    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300) as c:
            done = {}
            got_first = asyncio.Event()

            async def long():
                s = await c.chat.completions.create(model="tiny", messages=HELLO, stream=True, max_tokens=150,
                                                    extra_body={"ignore_eos": True})
                async for ch in s:
                    if ch.choices and ch.choices[0].delta.content:
                        got_first.set()
                done["long"] = time.perf_counter()

            async def late():
                await got_first.wait()
                await c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3,
                                                extra_body={"ignore_eos": True})
                done["late"] = time.perf_counter()

            await asyncio.gather(long(), late())
            return done

    done = asyncio.run(main())
    assert done["late"] < done["long"]


def test_a_dropped_stream_frees_its_slot(server):
    url, _ = server
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=h, timeout=120,
                      json={"model": "tiny", "messages": HELLO, "stream": True, "max_tokens": 300,
                            "ignore_eos": True}) as resp:
        for n, _ in enumerate(resp.iter_lines()):
            if n > 3:
                break
    deadline = time.time() + 30
    while httpx.get(url + "/health").json()["busy"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["busy"] == 0


# ----------------------------------------------------------------------------- bad requests
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
WRONG_TYPES = {"messages": "hi", "n": "2", "temperature": "hot", "top_p": [1], "max_tokens": 2.5, "stop": 7,
               "seed": "x", "logprobs": "yes", "top_logprobs": True, "stream": "no", "tools": {"a": 1},
               "tool_choice": 3, "model": 5, "stream_options": "usage"}


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "gpt-9"}, 404, "model", "model_not_found"),
    ({"top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": [{"role": "user", "content": "word " * 500}]}, 400, "messages", "context_length_exceeded"),
    ({"max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    ({"n": 5}, 400, "n", None),
    ({"temperature": -1}, 400, "temperature", None),
    ({"messages": []}, 400, "messages", None),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [TOOL]}, 400, "tool_choice", None),
] + [({k: v}, 400, k, None) for k, v in WRONG_TYPES.items()], ids=lambda x: str(x)[:40])
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    url = server[0] + "/v1/chat/completions"
    r = httpx.post(url, json={**GOOD, **body}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


def test_malformed_auth_size_and_routes(server):
    url, _ = server
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [
        (httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=h), 400),
        (httpx.post(url + "/v1/chat/completions", content=b"[1, 2]", headers=h), 400),
        (httpx.post(url + "/v1/chat/completions", json=GOOD), 401),
        (httpx.post(url + "/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer wrong"}), 401),
        (httpx.post(url + "/v1/chat/completions", content=b"x" * (5 << 20), headers=h), 413),
        (httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [[]]}, headers=h), 400),
        (httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [99999]}, headers=h), 400),
        (httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 0}, headers=h), 400),
        (httpx.get(url + "/v1/nothing", headers=h), 404),
        (httpx.get(url + "/v1/chat/completions", headers=h), 405),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    ok = httpx.post(url + "/v1/chat/completions", json=GOOD, headers=h, timeout=60)  # still serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_the_jaxlm_client_against_the_server(server):
    from jaxlm.infer.client import ChatClient

    with ChatClient(server[0] + "/v1", api_key=KEY, model="tiny", concurrency=2, progress=False) as c:
        replies = c.chat_many([HELLO, ASK, HELLO], max_tokens=4, temperature=0)
        assert replies[0].text == replies[2].text and c.usage["requests"] == 3
        assert c.usage["completion_tokens"] == sum(r.usage["completion_tokens"] for r in replies)
