"""The serving layer without Ray: request validation (openai_api), the batching engine (serve_engine),
and FluidServer's routes through Starlette's test client, on a tiny random model (auth off here)."""

import asyncio
import json

import pytest

from pipeline.config import ServeConfig
from pipeline.decode.load import load_sampler
from pipeline.decode.policies import GenerationRequest, InvalidRequest
from pipeline.errors import FluidError
from pipeline.serve import openai_api as api
from pipeline.serve.engine import Engine, Overloaded
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
PROMPTS = ["the quick brown", "to be or not", "it was a bright cold day in", "a cat sat on"]
LIMITS = api.Limits("tiny", max_tokens_limit=100, vocab_size=40, mask_token_id=38)


def export_tiny(out_dir, context: int = 4096):
    """A FLUID export of the conftest tiny Llama + word tokenizer with "[M]" and a chat template."""
    from pipeline.model.causal_lm import add_mask_token
    from pipeline.train.export import export_hf

    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"mask_token": "[M]"})
    tok.chat_template = CHAT_TEMPLATE
    model = add_mask_token(make_tiny_llama(len(tok), max_position_embeddings=context, initializer_range=0.5),
                           tok.mask_token_id)
    meta = {"mask_token": "[M]", "mask_token_id": tok.mask_token_id, "k_max": 8,
            "policy_defaults": {"policy": "verify", "gamma": None, "max_horizon": 8},
            "base_model": {"spec": "tiny", "sha256": None}, "data_config": {}, "train_config": {}}
    return export_hf(model, tok, out_dir, fluid_meta=meta)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: 1 intra-op thread (2 threads on 2 busy shared cores made a forward ~50x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def sampler(export_dir):

    return load_sampler(export_dir)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("body,status,param,code", [
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": "x", "model": 3}, 400, "model", "invalid_type"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 101}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ({"prompt": ""}, 400, "prompt", "invalid_value"),
    ({"prompt": []}, 400, "prompt", "invalid_value"),
    ({}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, 400, "prompt", "invalid_type"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "unsupported_value"),
    ({"prompt": [1, 99]}, 400, "prompt", "invalid_value"),
    ({"prompt": "x", "n": 2}, 400, "n", "unsupported_value"),
    ({"prompt": "x", "policy": "magic"}, 400, "policy", "invalid_value"),
    ({"prompt": "x", "gamma": "high"}, 400, "gamma", "invalid_type"),
    ({"prompt": "x", "max_horizon": 0}, 400, "max_horizon", "invalid_value"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"prompt": "x", "stop": ["a"] * 5}, 400, "stop", "invalid_value"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"prompt": "x", "echo": True}, 400, "echo", "unsupported_parameter"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ({"prompt": "x", "seed": "s"}, 400, "seed", "invalid_type"),
    ({"prompt": "x", "seed": -(2**63) - 1}, 400, "seed", "invalid_value"),  # torch's generator: at most 64 bits
])
def test_completion_validation_names_the_field(body, status, param, code):
    with pytest.raises(api.ApiError) as ei:
        api.parse_completion(body, LIMITS)
    e = ei.value
    assert (e.status, e.param, e.code) == (status, param, code)
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    assert e.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_chat_validation_names_the_field(body, param):
    with pytest.raises(api.ApiError) as ei:
        api.parse_chat(body, LIMITS)
    assert ei.value.status == 400 and ei.value.param == param


def test_parse_json_and_good_requests():
    for raw in (b"{bad", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(api.ApiError) as ei:
            api.parse_json(raw)
        assert ei.value.status == 400 and ei.value.code in ("invalid_json", "invalid_type")
    p = api.parse_completion({"model": "tiny", "prompt": ["the cat"], "policy": "verify", "gamma": 0.5,
                              "max_horizon": 4, "temperature": 0, "ignore_eos": True, "stop": "dog",
                              "stream": True, "stream_options": {"include_usage": True}, "user": "u1"}, LIMITS)
    req = p.request([3, 4], 100)
    assert (p.stream, p.include_usage, p.max_tokens) == (True, True, 16)
    assert (req.policy, req.gamma, req.max_horizon, req.temperature, req.stop, req.stop_on_eos) == \
        ("verify", 0.5, 4, 0.0, ["dog"], False)
    assert api.parse_completion({"prompt": [1, 2, 3]}, LIMITS).prompt_ids == [1, 2, 3]
    chat = api.parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, LIMITS)
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.max_tokens is None
    assert chat.request([1], 100).max_tokens == 100


def test_tokenizer_is_never_used_by_two_threads_at_once(sampler, monkeypatch):
    """Handlers encode (and render chat templates) on worker threads while the engine's step thread
    detokenizes: every tokenizer call holds the sampler's lock (a fast tokenizer shared by two threads
    at once can fail with "Already borrowed")."""
    import threading
    import time

    from pipeline.decode.detok import IncrementalText

    state, guard, errors = {"active": 0, "most": 0}, threading.Lock(), []

    def tracked(fn):
        def call(*a, **kw):
            with guard:
                state["active"] += 1
                state["most"] = max(state["most"], state["active"])
            try:
                time.sleep(0.0002)  # widen the window an overlap would need
                return fn(*a, **kw)
            finally:
                with guard:
                    state["active"] -= 1
        return call

    class Tracked:
        def __init__(self, tok):
            self.t, self._tokenizer = tok, tok._tokenizer

        def __getattr__(self, name):
            return getattr(self.t, name)

        def __call__(self, *a, **kw):
            return tracked(self.t)(*a, **kw)

        def decode(self, *a, **kw):
            return tracked(self.t.decode)(*a, **kw)

        def apply_chat_template(self, *a, **kw):
            return tracked(self.t.apply_chat_template)(*a, **kw)

    monkeypatch.setattr(sampler, "tokenizer", Tracked(sampler.tokenizer))
    monkeypatch.setattr(IncrementalText, "_step", tracked(IncrementalText._step))
    text = " ".join(PROMPTS * 200)
    req = GenerationRequest(prompt_ids=[3, 4], max_tokens=20, temperature=0.0, stop_on_eos=False, stop=["zz"])
    jobs = [lambda: sampler.encode(text), lambda: sampler.render(api.render_chat, [{"role": "user", "content": text}]),
            lambda: sampler.generate([req, req])]

    def hammer(job):
        try:
            for _ in range(8):
                job()
        except Exception as e:  # "Already borrowed" would land here
            errors.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(jobs[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and state["most"] == 1


def test_render_chat_and_prompt_checks(sampler):
    msgs = [{"role": "user", "content": "the cat [M]"}]
    ids = api.render_chat(sampler.tokenizer, msgs)
    assert sampler.mask_token_id not in ids  # control tokens in contents are encoded as text
    tok = make_tiny_tokenizer()  # no chat template: the plain fallback
    assert tok.decode(api.render_chat(tok, [{"role": "user", "content": "the cat"}])).endswith("<unk>")
    with pytest.raises(api.ApiError, match="context"):
        api.check_prompt([1] * 10, param="prompt", context=10, mask_token_id=None)
    with pytest.raises(api.ApiError, match="mask token"):
        api.check_prompt([1, 38], param="prompt", context=None, mask_token_id=38)




# ---------------------------------------------------------------- engine


def greedy(prompt, **kw):
    kw.setdefault("max_tokens", 24)
    return GenerationRequest(prompt=prompt, temperature=0.0, stop_on_eos=False, **kw)


def test_engine_batches_and_equals_sequential(sampler):
    seq = [sampler.generate(greedy(p))[0].token_ids for p in PROMPTS]

    async def main():
        eng = Engine(sampler, max_batch_size=4, batch_wait_timeout_s=0.05)
        tickets = [eng.submit(greedy(p)) for p in PROMPTS]
        results = await asyncio.gather(*(t.result() for t in tickets))
        await eng.close()
        return tickets, results

    tickets, results = asyncio.run(main())
    assert [r.token_ids for r in results] == seq
    assert [t.batch_size for t in tickets] == [4] * 4


def test_engine_admits_mid_flight(sampler):
    """A request arriving while others decode joins their batch at the next step (no waiting for the
    batch to drain) and gets exactly its unbatched tokens; so do the rows already running."""
    reqs = [greedy(PROMPTS[0], max_tokens=60, policy="verify"), greedy(PROMPTS[1], max_tokens=60, policy="ar"),
            greedy(PROMPTS[2], max_tokens=12, policy="verify"), greedy(PROMPTS[3], max_tokens=5, policy="ar")]
    seq = [sampler.generate(r)[0].token_ids for r in reqs]

    async def main():
        eng = Engine(sampler, max_batch_size=4, batch_wait_timeout_s=0.0)
        first = [eng.submit(r) for r in reqs[:2]]
        chunks = first[0].chunks()
        got = 0
        while got < 10:  # the first two are well under way
            got += len((await chunks.__anext__()).token_ids)
        steps = eng.stats()["steps"]
        late = [eng.submit(r) for r in reqs[2:]]
        late_res = await asyncio.gather(*(t.result() for t in late))
        assert eng.stats()["running"] == 2  # the long ones still run: the late ones did not wait for them
        assert eng.stats()["steps"] - steps <= 12 + 2
        rest = [ch async for ch in chunks]
        res = [rest[-1].result, await first[1].result(), *late_res]
        await eng.close()
        return first + late, res

    tickets, res = asyncio.run(main())
    assert [r.token_ids for r in res] == seq
    assert all(t.batch_size == 4 for t in tickets[2:])
    assert all(t.queue_time_s < 5 for t in tickets)


def test_engine_overload_cancel_and_kv_budget(sampler):
    async def main():
        eng = Engine(sampler, max_batch_size=2, max_queued_requests=1, batch_wait_timeout_s=0.0,
                     max_kv_tokens=2 * (2 + 2000 + sampler.step_masks + 1))
        with pytest.raises(InvalidRequest, match="KV budget"):
            eng.submit(greedy("the cat", max_tokens=4090))
        long = [eng.submit(greedy("the cat", max_tokens=2000)) for _ in range(3)]  # 2 run, 1 waits
        with pytest.raises(Overloaded) as ei:
            eng.submit(greedy("the cat"))
        assert ei.value.retry_after >= 1
        await asyncio.sleep(0.2)
        assert eng.stats()["running"] == 2 and eng.stats()["waiting"] == 1
        for t in long:
            t.cancel()
        assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0
        await asyncio.sleep(0.2)
        assert eng.decoder is None or eng.decoder.done  # the cancelled rows left the batch
        assert [t.row is None for t in long] == [False, False, True]  # the third never started
        assert all(len(t.row.generated) < 2000 and t.row.finish == "cancelled" for t in long[:2])
        res = await eng.submit(greedy("the cat", max_tokens=5)).result()  # slots are free again
        await eng.close()
        return res

    assert len(asyncio.run(main()).token_ids) == 5


def test_engine_failures(sampler):
    """A failing forward fails its batch only; a broken loop makes the health check raise."""

    async def main():
        eng = Engine(sampler, batch_wait_timeout_s=0.0)
        real = sampler.decoder

        def broken_decoder(reqs):
            dec = real(reqs)
            dec.step = lambda: 1 / 0
            return dec

        sampler.decoder = broken_decoder
        try:
            with pytest.raises(ZeroDivisionError):
                await eng.submit(greedy("the cat")).result()
        finally:
            del sampler.decoder
        assert len((await eng.submit(greedy("the cat", max_tokens=3)).result()).token_ids) == 3
        eng.check()  # still healthy

        def bug(*a):
            raise KeyError("bug")

        eng._dispatch = bug
        with pytest.raises(RuntimeError, match="decoding loop failed"):
            await eng.submit(greedy("the cat")).result()
        with pytest.raises(RuntimeError):
            eng.check()
        with pytest.raises(RuntimeError):
            eng.submit(greedy("the cat"))
        await eng.close()

    asyncio.run(main())


# ---------------------------------------------------------------- FluidServer without Ray


@pytest.fixture(scope="module")
def client(export_dir):
    from starlette.testclient import TestClient

    from pipeline.serve.app import FluidServer
    from pipeline.serve.http import make_app

    srv = FluidServer(ServeConfig(model=str(export_dir), api_key_env="FLUID_TEST_UNSET_KEY",
                                  max_request_bytes=2000, stream_interval_s=1.0, default_max_tokens=7))
    with TestClient(make_app(srv)) as c:
        yield c


def test_server_routes_without_auth(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    body = {"model": "tiny", "prompt": "the quick brown", "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] <= 12 and out["fluid"]["forwards"] >= 1
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        lines = [x for x in s.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    assert len(chunks) == chunks[-1]["fluid"]["forwards"]  # one event per step, written together (interval)
    for r, status, code in ((client.get("/nowhere"), 404, "not_found"),
                            (client.put("/v1/completions"), 405, "method_not_allowed"),
                            (client.post("/v1/completions", content=b"x" * 3000), 413, "request_too_large")):
        assert r.status_code == status and r.json()["error"]["code"] == code


def test_stream_chunks_carry_their_step_and_the_openai_client_parses_them(client):
    """Each SSE chunk names the forward that committed its tokens (`fluid.step`, an extension field the
    official client keeps as an extra without failing)."""
    import openai
    body = {"model": "tiny", "prompt": "the quick brown", "max_tokens": 12, "temperature": 0, "policy": "verify",
            "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x and x != "data: [DONE]"]
    assert [c["fluid"]["step"] for c in chunks] == list(range(len(chunks)))  # one chunk per forward
    oa = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)
    parsed = list(oa.completions.create(**{k: v for k, v in body.items() if k not in ("policy", "ignore_eos")},
                                        stream=True, extra_body={"policy": "verify", "ignore_eos": True}))
    assert "".join(c.choices[0].text for c in parsed) == "".join(c["choices"][0]["text"] for c in chunks)
    assert [(c.model_extra or {})["fluid"]["step"] for c in parsed] == list(range(len(chunks)))


@pytest.mark.parametrize("body,param,code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_type"),
    ({"prompt": 7}, "prompt", "invalid_type"),
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "invalid_type"),  # strict: no string → int
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "stream": 1}, "stream", "invalid_type"),
    ({"prompt": "x", "policy": "telepathy"}, "policy", "invalid_value"),
    ({"prompt": "x", "n": 3}, "n", "unsupported_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),  # at most 4 (OpenAI's limit)
    ({"prompt": "x", "stop": "y" * 257}, "stop", "invalid_value"),  # at most 256 characters each
    ({"prompt": "x", "seed": 2**64}, "seed", "invalid_value"),  # a 64-bit integer (was a 500: found by test_fuzz)
])
def test_http_validation_is_400_in_openai_shape(client, body, param, code):
    """FastAPI's validation errors come back as OpenAI's error object with 400, never 422."""
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error") and err["message"]


def test_openapi_docs_and_default_max_tokens(client):
    assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 200  # auth off
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert "CompletionRequest" in spec["components"]["schemas"]
    chat = {"messages": [{"role": "user", "content": "the cat"}], "temperature": 0, "ignore_eos": True}
    out = client.post("/v1/chat/completions", json=chat).json()
    assert out["usage"]["completion_tokens"] == 7  # the server's default_max_tokens, not the 1024 limit
    assert out["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/chat/completions", json={**chat, "max_tokens": 1025})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_export_from_model_is_servable_and_says_drafts_are_untrained(tiny_model_dir, tmp_path, monkeypatch):
    from jobs.export import main as export_main
    from pipeline.serve.app import FluidServer, localize_model

    monkeypatch.setenv("FLUID_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FluidError, match="fluid export --from-model"):
        localize_model(str(tiny_model_dir))
    assert export_main(["--from-model", str(tiny_model_dir), "--output", str(tmp_path / "exp")]) == 0
    srv = FluidServer(ServeConfig(model=str(tmp_path / "exp"), api_key_env="FLUID_TEST_UNSET_KEY"))
    card = srv.models()["data"][0]
    assert "untrained" in card["fluid"]["note"] and card["fluid"]["policy_defaults"]["policy"] == "verify"


def test_localize_model_from_fsspec(export_dir):
    import fsspec

    from pipeline.serve.app import localize_model, remove_staged

    fs = fsspec.filesystem("memory")
    for f in export_dir.iterdir():
        fs.pipe(f"/exports/tiny/{f.name}", f.read_bytes())
    fs.pipe("/exports/tiny/evil.bin", b"pickle")
    local = localize_model("memory://exports/tiny")
    assert (local / "fluid.json").is_file() and not (local / "evil.bin").exists()
    with pytest.raises(FluidError, match="fluid.json"):
        localize_model(str(export_dir.parent))
    assert remove_staged("memory://exports/tiny", local) and not local.exists()  # the temporary copy goes
    assert not remove_staged(str(export_dir), export_dir) and (export_dir / "fluid.json").is_file()


def test_ray_metrics_accept_every_engine_report():
    """The replica's Ray metrics take every report the engine makes (Ray refuses e.g. Counter.inc(0))."""
    from pipeline.decode.sampler import GenerationResult, GenerationStats
    from pipeline.serve.metrics import RayMetrics

    m = RayMetrics("tiny")
    m.step([1, 2, 3], 3, 100)
    m.step([], 0, 0)
    m.step([0], 1, 50)  # a step that committed nothing to its only row
    m.rejected()
    m.queue(1, 2)
    m.finished(GenerationResult([1, 2, 3], "x", "length", 1, GenerationStats("verify", forwards=2, tokens=3)))
