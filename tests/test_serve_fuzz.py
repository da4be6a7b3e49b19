"""schemathesis over the server's /openapi.json: valid and invalid requests to every operation, bounded
in count (examples per operation) and time; none may get a 5xx, and the server keeps serving."""

import time

import jax
import pytest

schemathesis = pytest.importorskip("schemathesis")
portpicker = pytest.importorskip("portpicker")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from jaxlm.data.tokenizer import load_tokenizer  # noqa: E402
from jaxlm.infer.engine import Engine  # noqa: E402
from jaxlm.infer.server import Background, Server  # noqa: E402
from jaxlm.model import ModelConfig, init_params  # noqa: E402

EXAMPLES = 10  # per operation and generation mode
BUDGET_S = 120  # for the whole fuzz; examples past it are skipped


@pytest.fixture(scope="module")
def url():
    tok = load_tokenizer("asset:tiny_bpe.json")
    cfg = ModelConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      max_position_embeddings=64)
    engine = Engine(cfg, init_params(cfg, jax.random.key(0)), slots=4, max_len=48, pad_id=tok.pad_id)
    server = Server(engine, tok, model_name="tiny", max_n=2, max_body_bytes=1 << 20)
    with Background(server.app(), portpicker.pick_unused_port()) as bg:
        yield bg.url


def test_no_server_errors(url):
    import requests

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    end = time.monotonic() + BUDGET_S
    seen, statuses = 0, {}
    session = requests.Session()
    def fuzz(op, mode):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            nonlocal seen
            if time.monotonic() > end:
                return
            if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"  # else nearly every valid request is an unknown model (404)
            resp = case.call(base_url=url, session=session, timeout=60)
            seen += 1
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, f"{case.method} {case.formatted_path}: {resp.status_code} {resp.text[:300]}"

        try:
            run()
        except Unsatisfiable:  # nothing to get wrong (GET /v1/models has no inputs)
            assert mode == GenerationMode.NEGATIVE

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode)
    assert seen >= 20 and statuses.get(200, 0) >= 5, statuses
    ok = session.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200
