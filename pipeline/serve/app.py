"""Ray Serve edge: an OpenAI-compatible HTTP endpoint for the elastic-horizon sampler (docs/architecture.md).

In:  `ServeConfig` (pipeline/config.py): the export folder or fsspec URL (copied locally first), limits,
     replicas and resources; HTTP requests to POST /v1/completions, POST /v1/chat/completions,
     GET /v1/models and GET /healthz (relative to the app's route prefix).
Out: JSON responses, or SSE streams in the OpenAI format (one chunk per decoding step, then
     `data: [DONE]`), with `usage` and our `fluid` stats; errors as OpenAI error JSON (openai_api.py).
     `build_app(cfg)` returns the Serve Application; `app_builder(args)` serves `serve deploy` files.

`FluidServer` is a plain class (Starlette request → response) so it also runs without Ray in tests;
Ray is imported only in `build_app`. Each replica loads the model once and batches requests with
serve_engine.Engine. Overload → 429 + Retry-After; a disconnected client's request is cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pipeline.config import ServeConfig, from_dict
from pipeline.decode.policies import InvalidRequest
from pipeline.errors import FluidError
from pipeline.serve import openai_api as api
from pipeline.serve.engine import Engine, Overloaded

log = logging.getLogger("fluid.serve")
_PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PARAMS = ("max_horizon", "policy", "gamma", "temperature", "top_p", "max_tokens", "stop", "prompt")


def localize_model(spec: str) -> Path:
    """A local folder for `spec`: a path as is, an fsspec URL copied into a fresh temporary folder
    (pickled weight files are skipped: only safetensors are ever loaded)."""
    if not spec:
        raise FluidError("serve.model is not set: give a FLUID export folder or an fsspec URL")
    if "://" not in spec or spec.startswith("file://"):
        path = Path(spec.removeprefix("file://")).expanduser()
        if not (path / "fluid.json").is_file():
            raise FluidError(f"serve.model {spec}: no fluid.json there (not a FLUID export folder)")
        return path
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(spec)
        files = [f for f in fs.find(root) if not fs.isdir(f)]
    except Exception as e:
        raise FluidError(f"cannot list serve.model {spec} ({type(e).__name__}: {e})") from None
    if not files:
        raise FluidError(f"serve.model {spec} is empty or missing")
    out = Path(tempfile.mkdtemp(prefix="fluid-serve-model-"))
    root = root.rstrip("/")
    try:
        for f in files:
            rel = f[len(root):].lstrip("/")
            if not rel.endswith(_PICKLED):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(out / rel))
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if not (out / "fluid.json").is_file():
        raise FluidError(f"serve.model {spec}: no fluid.json there (not a FLUID export folder)")
    return out


def load_replica_sampler(cfg: ServeConfig):
    """The Sampler of `cfg.model` on the replica's device (CUDA when GPUs are requested and present)."""
    import torch

    from pipeline.decode.load import load_sampler

    path = localize_model(cfg.model)
    cuda = cfg.num_gpus > 0 and torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", None)
    if not cuda and cfg.num_cpus >= 1:
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
    return load_sampler(path, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code), path


def _error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _param_of(message: str) -> str | None:
    return next((p for p in _PARAMS if p in message), None)


class FluidServer:
    """One replica: the model, the batching engine, and the OpenAI routes."""

    def __init__(self, cfg: ServeConfig | dict):
        self.cfg = cfg if isinstance(cfg, ServeConfig) else from_dict({"serve": dict(cfg)}).serve
        self.sampler, path = load_replica_sampler(self.cfg)
        self.api_key = api.load_api_key(self.cfg.api_key_env, self.cfg.api_key_file)
        name = self.cfg.model_name or Path(self.cfg.model.rstrip("/")).name or path.name
        vocab = self.sampler.model.get_output_embeddings().weight.shape[0]
        self.limits = api.Limits(name, self.cfg.max_tokens_limit, vocab, self.sampler.mask_token_id)
        self.engine = Engine(self.sampler, max_batch_size=self.cfg.max_batch_size,
                             batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                             max_queued_requests=self.cfg.max_queued_requests,
                             max_kv_tokens=self.cfg.max_kv_tokens or None)
        self.created = int(time.time())
        log.info("FLUID replica ready: model %s from %s, auth %s", name, path, "on" if self.api_key else "off")

    def check_health(self) -> None:
        """Serve's health check: an exception makes Serve replace this replica."""
        self.engine.check()

    async def __call__(self, request: Request) -> Response:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = "/" + path.strip("/")
        routes = {"/healthz": ("GET", self._health), "/v1/models": ("GET", self._models),
                  "/v1/completions": ("POST", self._generate), "/v1/chat/completions": ("POST", self._generate)}
        try:
            if path not in routes:
                raise api.ApiError(404, f"no route {path}; see /v1/completions, /v1/chat/completions, "
                                   "/v1/models, /healthz", None, "not_found")
            method, handler = routes[path]
            if request.method != method:
                raise api.ApiError(405, f"{path} accepts {method} only", None, "method_not_allowed")
            if path != "/healthz":
                api.check_auth(request.headers.get("authorization"), self.api_key)
            return await handler(request, path)
        except api.ApiError as e:
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=499)

    async def _health(self, request: Request, path: str) -> Response:
        try:
            self.engine.check()
        except RuntimeError as e:
            return JSONResponse({"status": "error", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.limits.model, **self.engine.stats()})

    async def _models(self, request: Request, path: str) -> Response:
        s = self.sampler
        card = {"id": self.limits.model, "object": "model", "created": self.created, "owned_by": "fluid",
                "fluid": {"k_max": s.k_max, "context": s.context, "policy_defaults": s.policy_defaults}}
        return JSONResponse({"object": "list", "data": [card]})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_request_bytes
        too_big = api.ApiError(413, f"the request body exceeds {limit} bytes", None, "request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > limit:
                raise too_big
        return bytes(buf)

    async def _generate(self, request: Request, path: str) -> Response:
        body = api.parse_json(await self._read_body(request))
        chat = path.endswith("/chat/completions")
        p = (api.parse_chat if chat else api.parse_completion)(body, self.limits)
        if p.messages is not None:
            ids = await asyncio.to_thread(api.render_chat, self.sampler.tokenizer, p.messages)
        elif p.prompt is not None:
            ids = await asyncio.to_thread(self.sampler.encode, p.prompt)
        else:
            ids = p.prompt_ids
        param = "messages" if chat else "prompt"
        api.check_prompt(ids, param=param, context=self.sampler.context, mask_token_id=self.sampler.mask_token_id)
        try:
            ticket = self.engine.submit(p.request(ids, self.cfg.max_tokens_limit), stream=p.stream)
        except Overloaded as e:
            raise api.ApiError(429, str(e), None, "rate_limit_exceeded", type="rate_limit_error",
                               headers={"Retry-After": str(e.retry_after)}) from None
        except InvalidRequest as e:
            raise api.bad(_param_of(str(e)), str(e)) from None
        except RuntimeError as e:
            raise api.ApiError(503, str(e), None, "server_error", type="server_error") from None
        rid = api.new_id(p.kind)
        if p.stream:
            return StreamingResponse(self._sse(p, rid, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await ticket.result()
        except Exception as e:
            raise api.ApiError(500, f"decoding failed: {e}", None, "server_error", type="server_error") from None
        finally:
            ticket.cancel()  # no-op when finished; frees the slot when this handler is cancelled
        fluid = api.fluid_stats(result.stats, queue_time_s=round(ticket.queue_time_s, 4),
                                batch_size=ticket.batch_size)
        return JSONResponse(api.response(p.kind, rid, p.model, result, fluid))

    async def _sse(self, p: api.Parsed, rid: str, ticket):
        """SSE body: one event per decoding step. Events of steps that come faster than
        `stream_interval_s` are sent together in one write (fewer messages through the proxy).
        Cancelled (client gone) → the ticket is cancelled."""
        kind, model, interval = p.kind, p.model, self.cfg.stream_interval_s
        buf, last = [], 0.0
        try:
            if kind == "chat":
                buf.append(api.sse(api.chunk(kind, rid, model, None, role=True)))
            async for ch in ticket.chunks():
                extra = {}
                if ch.result is not None:
                    extra["fluid"] = api.fluid_stats(ch.result.stats, queue_time_s=round(ticket.queue_time_s, 4),
                                                     batch_size=ticket.batch_size)
                buf.append(api.sse(api.chunk(kind, rid, model, ch.text, ch.finish_reason, **extra)))
                if ch.result is not None and p.include_usage:
                    u = api.usage(ch.result.prompt_tokens, len(ch.result.token_ids))
                    buf.append(api.sse({**api.chunk(kind, rid, model, None), "choices": [], "usage": u}))
                if ch.result is None and time.monotonic() - last >= interval:
                    yield b"".join(buf)
                    buf, last = [], time.monotonic()
            yield b"".join(buf) + api.DONE
        except Exception as e:  # headers are sent: report in-band, then end the stream
            err = api.ApiError(500, f"decoding failed: {e}", None, "server_error", type="server_error")
            yield b"".join(buf) + api.sse(err.body()) + api.DONE
        finally:
            ticket.cancel()


def deployment_options(cfg: ServeConfig) -> dict:
    opts = {
        "name": "FluidServer",
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # our own queue answers 429: let Serve pass more requests than we admit
        "max_ongoing_requests": cfg.max_batch_size + cfg.max_queued_requests + 16,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def check_config(cfg: ServeConfig) -> None:
    """Reject impossible serve settings before anything starts (the message names the key)."""
    for key in ("max_batch_size", "max_request_bytes", "max_tokens_limit", "num_replicas", "min_replicas",
                "max_replicas", "port"):
        if getattr(cfg, key) < (0 if key == "min_replicas" else 1):
            raise FluidError(f"serve.{key} must be >= {0 if key == 'min_replicas' else 1}, got {getattr(cfg, key)}")
    for key in ("max_queued_requests", "max_kv_tokens", "num_cpus", "num_gpus", "batch_wait_timeout_s",
                "stream_interval_s"):
        if getattr(cfg, key) < 0:
            raise FluidError(f"serve.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.autoscaling and cfg.min_replicas > cfg.max_replicas:
        raise FluidError(f"serve.min_replicas {cfg.min_replicas} > serve.max_replicas {cfg.max_replicas}")


def build_app(cfg: ServeConfig):
    """The Serve Application for `cfg` (run it with serve.run(app, name=..., route_prefix=...))."""
    from ray import serve

    check_config(cfg)
    if "://" not in cfg.model:
        localize_model(cfg.model)  # fail early on a wrong local path
    return serve.deployment(FluidServer, **deployment_options(cfg)).bind(dataclasses.asdict(cfg))


def app_builder(args: dict):
    """Entry point for `serve deploy` config files: `args` = ServeConfig keys (or {"serve": {...}})."""
    return build_app(from_dict({"serve": dict(args.get("serve", args))}).serve)
