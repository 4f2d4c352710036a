"""Schema-based fuzzing with schemathesis: requests generated from the server's own OpenAPI schema (valid ones and
ones that break it), sent with the key to a served tiny model. No 5xx, every status documented, every error body an
OpenAI error object. Bounded in examples (no wall-clock assertion)."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from phi3v.api import load
from phi3v.serve.app import Settings, create_app, running

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (a test dependency)")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

KEY = "sk-fuzz"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 40  # per mode, over all operations


@pytest.fixture(scope="module")
def served(tiny_phi3):
    model = load(tiny_phi3, dtype="float32")
    app = create_app(model, Settings(max_batch=4, max_context=128, api_key=KEY, max_tokens_limit=8,
                                     max_body_bytes=1 << 20))
    with running(app) as url:
        yield url, app


def test_the_schema_declares_the_request_bodies(served):
    url, app = served
    schema = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"messages", "model", "temperature", "seed", "tools"} <= set(chat["properties"])
    assert chat["properties"]["model"]["enum"] == [app.state.service.name]
    assert {"type": "number", "minimum": 0.0, "maximum": 2.0} in chat["properties"]["temperature"]["anyOf"]
    assert "400" in schema["paths"]["/v1/completions"]["post"]["responses"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_5xx(served, mode):
    url, app = served
    schema = schemathesis.openapi.from_dict(app.openapi())
    statuses = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(schema.as_strategy(mode))
    def check(case):
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert statuses and max(statuses) < 500
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses  # some generated requests were served, not only refused
    assert httpx.get(url + "/health").status_code == 200
