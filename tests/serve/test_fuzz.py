"""Schemathesis against the served API's own OpenAPI schema, without Ray: the replica's FastAPI app
(`FluidServer` + `make_app`, auth on) on a real socket (uvicorn in a thread), so every request has a
timeout. Each operation gets a small, derandomized budget of generated requests, sent with the key and
without it: none may answer 5xx, and none may hang."""

import threading

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from pipeline.config import ServeConfig
from pipeline.serve import auth
from tests.serve.test_openai_api import export_tiny

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

KEY = {"Authorization": "Bearer fuzz-key"}
TIMEOUT_S = 20.0  # a tiny model answers any request the limits allow in well under a second
EXAMPLES = 60  # per operation and key state (~480 requests): enough to find the NaN-sampling 500 fixed with it
GENERATE = (Phase.explicit, Phase.generate)  # no shrinking of a failure: its first example is reported


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    import socket

    import torch
    import uvicorn

    from pipeline.serve.app import FluidServer
    from pipeline.serve.http import make_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    export = export_tiny(tmp_path_factory.mktemp("fuzz") / "tiny")
    srv = FluidServer(ServeConfig(model=str(export), api_key_sha256=auth.key_digest("fuzz-key"),
                                  api_key_env="FLUID_TEST_UNSET_KEY", max_tokens_limit=8, default_max_tokens=4,
                                  max_request_bytes=20_000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(srv), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    yield url
    server.should_exit = True
    thread.join(timeout=30)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(base_url):
    """The schema as the server publishes it (auth on: /openapi.json needs the key)."""
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=dict(KEY), timeout=TIMEOUT_S,
                                         wait_for_schema=30)


@pytest.mark.parametrize("headers", [KEY, {}], ids=["with-key", "without-key"])
def test_no_request_gets_a_5xx_or_hangs(api_schema, base_url, headers):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"}
    statuses = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=GENERATE,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(base_url=base_url, headers=dict(headers), timeout=TIMEOUT_S)  # a hang fails here
            statuses.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error], headers=headers)
            if not headers and case.path != "/healthz":  # nothing but the body limit comes before the key
                assert response.status_code in (401, 413), (case.path, response.status_code, response.text[:300])

        call()
    assert len(statuses) >= 2 * len(operations) and max(statuses) < 500
