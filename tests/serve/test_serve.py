"""The Ray Serve app over real HTTP on 127.0.0.1: OpenAI routes, streaming, batching, bad input, auth,
429 past the queue bound, disconnects freeing their slots, the official `openai` client, and Serve
autoscaling from 1 to 2 replicas and back.

One app per module (auth on; a second, auth-off app shares the Serve instance), tiny random model."""

import json
import threading
import time

import httpx
import openai
import pytest

from pipeline.config import ServeConfig
from pipeline.decode.load import load_sampler
from tests.serve.test_openai_api import PROMPTS, export_tiny

pytestmark = pytest.mark.ray

PORT = 8123
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("serve-http") / "tiny")


@pytest.fixture(scope="module")
def server(ray_local, export, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve-key")
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    common = dict(model=str(export), max_batch_size=4, max_queued_requests=4, batch_wait_timeout_s=0.05,
                  max_tokens_limit=4000, max_request_bytes=20_000, api_key_env="FLUID_TEST_UNSET_KEY")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(ServeConfig(**common, api_key_file=str(key_file))), name="fluid-test",
              route_prefix="/fluid")
    serve.run(build_app(ServeConfig(**common)), name="fluid-open", route_prefix="/open")
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client
    serve.shutdown()


def post(client, path, body, **kw):
    return client.post(f"/fluid{path}", json=body, **kw)


def greedy(prompt, **kw):
    return {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, **kw}


def sse_events(lines):
    lines = [x for x in lines if x]
    assert lines[-1] == "data: [DONE]"
    assert all(x.startswith("data: ") for x in lines)
    return [json.loads(x[6:]) for x in lines[:-1]]


def test_health_models_and_auth(server):
    assert httpx.get(f"http://127.0.0.1:{PORT}/fluid/healthz", trust_env=False).json()["status"] == "ok"
    assert server.get("/fluid/v1/models").json()["data"][0]["id"] == "tiny"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = httpx.post(f"http://127.0.0.1:{PORT}/fluid/v1/completions", json=greedy("the cat"),
                       headers=headers, trust_env=False)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"http://127.0.0.1:{PORT}/open/v1/completions", json=greedy("the cat"), trust_env=False)
    assert r.status_code == 200, r.text  # the auth-off app needs no key


def test_completion_and_chat(server, export):
    r = post(server, "/v1/completions", greedy("the quick brown", policy="verify", max_horizon=4))
    assert r.status_code == 200, r.text
    out = r.json()
    # the same completion through the sampler in this process (greedy verify is lossless: AR's output)
    from pipeline.decode.policies import GenerationRequest
    from pipeline.serve.openai_api import render_chat

    sampler = load_sampler(export)
    [want] = sampler.generate(GenerationRequest(prompt="the quick brown", max_tokens=16, temperature=0.0,
                                                policy="verify", max_horizon=4))
    assert out["object"] == "text_completion"
    choice = out["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (want.text, want.finish_reason)
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": len(want.token_ids),
                            "total_tokens": 3 + len(want.token_ids)}
    fl = out["fluid"]
    assert fl["policy"] == "verify" and fl["tokens"] == len(want.token_ids)
    assert fl["tokens_per_forward"] == pytest.approx(fl["tokens"] / fl["forwards"], abs=1e-3)
    chat = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "the cat sat on"}],
            "max_tokens": 8, "temperature": 0}
    r = post(server, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    out = r.json()
    msg = out["choices"][0]["message"]
    # the same chat through the sampler in this process: the template, the policy defaults, the text
    ids = render_chat(sampler.tokenizer, chat["messages"])
    [want] = sampler.generate(GenerationRequest(prompt_ids=ids, max_tokens=8, temperature=0.0))
    assert msg == {"role": "assistant", "content": want.text}
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want.token_ids),
                            "total_tokens": len(ids) + len(want.token_ids)}
    assert out["fluid"]["policy"] == "verify"  # the export's default


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", greedy("it was a bright cold day in", max_tokens=24, ignore_eos=True)),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "to be or not"}],
                              "max_tokens": 24, "temperature": 0, "ignore_eos": True}),
])
def test_streaming_matches_non_streamed(server, path, body):
    ref = post(server, path, body).json()
    with server.stream("POST", f"/fluid{path}", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    usage = events.pop()
    assert usage["choices"] == [] and usage["usage"] == ref["usage"]
    if "chat" in path:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        events = events[1:]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert text == ref["choices"][0]["message"]["content"]
    else:
        assert "".join(e["choices"][0]["text"] for e in events) == ref["choices"][0]["text"]
    assert len(events) == events[-1]["fluid"]["forwards"]  # one chunk per decoding step
    assert [e["fluid"]["step"] for e in events] == list(range(len(events)))  # the step that committed it
    assert events[-1]["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]


def test_concurrent_requests_are_batched_and_equal_sequential(server):
    bodies = [greedy(p, max_tokens=24, ignore_eos=True) for p in PROMPTS]
    seq = [post(server, "/v1/completions", b).json() for b in bodies]
    out = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def call(i):
        barrier.wait()
        out[i] = post(server, "/v1/completions", bodies[i]).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [o["choices"][0]["text"] for o in out] == [s["choices"][0]["text"] for s in seq]
    assert max(o["fluid"]["batch_size"] for o in out) > 1
    assert all(s["fluid"]["batch_size"] == 1 for s in seq)


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "the " * 4100}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "policy": "telepathy"}, 400, "policy"),
    ("/v1/completions", {"prompt": "x", "policy": "khead"}, 400, "policy"),  # no horizon head in the export
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = server.post(f"/fluid{path}", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert server.get("/fluid/healthz").json()["status"] == "ok"


def test_request_too_large(server):
    r = post(server, "/v1/completions", {"prompt": "x" * 30_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_overload_429_then_disconnects_free_the_slots(server):
    long = greedy("the cat", max_tokens=3900, ignore_eos=True, policy="ar", stream=True)
    served = server.get("/fluid/healthz").json()["served"]
    streams = []
    try:
        for _ in range(8):  # 4 decode (max_batch_size) + 4 wait (max_queued_requests)
            req = server.build_request("POST", "/fluid/v1/completions", json=long)
            streams.append(server.send(req, stream=True))
        assert all(s.status_code == 200 for s in streams)
        deadline = time.time() + 20
        while time.time() < deadline:
            h = server.get("/fluid/healthz").json()
            if h["running"] == 4 and h["waiting"] == 4:
                break
            time.sleep(0.1)
        assert (h["running"], h["waiting"]) == (4, 4), h
        r = post(server, "/v1/completions", greedy("the cat"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        next(streams[0].iter_lines())  # a running stream is producing chunks
    finally:
        for s in streams:
            s.close()  # the client goes away
    deadline = time.time() + 20
    while time.time() < deadline:
        h = server.get("/fluid/healthz").json()
        if (h["running"], h["waiting"], h["kv_tokens_held"]) == (0, 0, 0):
            break
        time.sleep(0.1)
    assert (h["running"], h["waiting"], h["kv_tokens_held"]) == (0, 0, 0), h
    assert h["served"] == served  # the cancelled requests never completed
    assert post(server, "/v1/completions", greedy("the cat")).status_code == 200


def test_official_openai_client(server):
    with httpx.Client(trust_env=False, timeout=60) as http:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/fluid/v1", api_key=KEY, max_retries=0,
                               http_client=http)
        assert [m.id for m in client.models.list()] == ["tiny"]
        body = greedy("the quick brown", max_tokens=12)
        raw = post(server, "/v1/completions", body).json()  # the same request over plain HTTP
        ref, u = raw["choices"][0]["text"], raw["usage"]
        c = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0)
        assert c.choices[0].text == ref
        assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
            u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
        stream = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0,
                                           stream=True, extra_body={"policy": "verify"})
        assert "".join(ch.choices[0].text for ch in stream) == ref
        chat_body = {"model": "tiny", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6,
                     "temperature": 0}
        chat_raw = post(server, "/v1/chat/completions", chat_body).json()["choices"][0]["message"]
        chat = client.chat.completions.create(**chat_body)
        assert (chat.choices[0].message.role, chat.choices[0].message.content) == (
            chat_raw["role"], chat_raw["content"])
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2)


def test_autoscaling_reaches_two_replicas_and_back(server, export):
    """target_ongoing_requests = 1 and 4 long requests: Serve adds the second replica; once they end it
    goes back to one (delays shortened from Serve's defaults of 30 s up / 600 s down)."""
    from ray import serve

    from pipeline.serve.app import build_app, replica_config

    cfg = ServeConfig(model=str(export), autoscaling=True, min_replicas=1, max_replicas=2,
                      target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=2.0,
                      look_back_period_s=1.0, max_batch_size=4, max_tokens_limit=4000,
                      api_key_env="FLUID_TEST_UNSET_KEY")
    serve.run(build_app(replica_config(cfg)), name="fluid-scale", route_prefix="/scale")

    def running():
        return serve.status().applications["fluid-scale"].deployments["FluidServer"].replica_states.get("RUNNING", 0)

    def wait_for(n, seconds=90):
        deadline = time.time() + seconds
        while time.time() < deadline and running() != n:
            time.sleep(0.25)
        return running()

    long = greedy("the cat", max_tokens=3900, ignore_eos=True, policy="ar", stream=True)
    streams = []
    try:
        assert running() == 1
        for _ in range(4):
            streams.append(server.send(server.build_request("POST", "/scale/v1/completions", json=long), stream=True))
        assert all(s.status_code == 200 for s in streams)
        assert wait_for(2) == 2
    finally:
        for s in streams:
            s.close()
    try:
        assert wait_for(1) == 1
    finally:
        serve.delete("fluid-scale")
