"""Ray Serve edge: an OpenAI-compatible HTTP endpoint for the elastic-horizon sampler (docs/architecture.md).

In:  `ServeConfig` (pipeline/config.py): the export folder or fsspec URL (copied locally first), limits,
     replicas, autoscaling and resources, and the API key as a file path or a salted digest (never the
     raw key: Ray shows application args and runtime envs in its dashboard and State API).
Out: `build_app(cfg)` → the Serve Application: `FluidServer` replicas behind `serve.ingress()`, whose
     FastAPI routes (http.py) serve /v1/completions, /v1/chat/completions, /v1/models, /healthz and
     /docs; `app_builder(args)` serves `serve deploy` files; `verify_auth(handle, digest)` checks that
     the replicas enforce the key the driver was given. Replica metrics go to Ray's metrics export
     port (metrics.py).

Each replica loads the model once, measures (or reads from its disk cache) the cost of a decoding step
over the batch sizes up to `max_batch_size` for the batch scheduler (pipeline/decode/scheduler.py), and
batches requests continuously (engine.py); an export staged
from an fsspec URL into a temporary folder is removed when the replica stops (`__del__`). Overload → 429 +
Retry-After; a disconnected client's request is cancelled. `FluidServer` is a plain class, so tests
run it without Ray (`http.make_app(FluidServer(cfg))`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from pathlib import Path

from starlette.responses import JSONResponse, Response, StreamingResponse

from pipeline.config import LOOPBACK_HOSTS, ServeConfig, from_dict
from pipeline.decode.policies import InvalidRequest
from pipeline.errors import FluidError
from pipeline.export_format import FLUID_META_FILE, is_export, localize_export, read_fluid_meta
from pipeline.serve import openai_api as api
from pipeline.serve.auth import Auth, driver_key, fingerprint_of, key_digest, read_key_file
from pipeline.serve.engine import Engine, Overloaded
from pipeline.serve.metrics import replica_metrics

log = logging.getLogger("fluid.serve")
_PARAMS = ("max_horizon", "policy", "gamma", "temperature", "top_p", "max_tokens", "stop", "prompt")


def localize_model(spec: str) -> Path:
    """A local folder for `spec`: a path as is, an fsspec URL copied into a fresh temporary folder
    (pickled weight files are skipped: only safetensors are ever loaded)."""
    if not spec:
        raise FluidError("serve.model is not set: give a FLUID export folder or an fsspec URL")
    if "://" not in spec or spec.startswith("file://"):
        path = Path(spec.removeprefix("file://")).expanduser()
        if not is_export(path):
            hint = (f"; `fluid export --from-model {spec} --output EXPORT_DIR` makes one from a plain model"
                    if (path / "config.json").is_file() else "")
            raise FluidError(f"serve.model {spec}: no {FLUID_META_FILE} there (not a FLUID export folder){hint}")
    return localize_export(spec, what=f"serve.model {spec}")


def load_replica_sampler(cfg: ServeConfig):
    """The Sampler of `cfg.model` on the replica's device (CUDA when GPUs are requested and present)."""
    import torch

    from pipeline.decode.dtype import inference_dtype
    from pipeline.decode.load import load_sampler

    path = localize_model(cfg.model)
    try:
        cuda = cfg.num_gpus > 0 and torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"
        dtype = inference_dtype(cfg.dtype, device, path)
        if not cuda and cfg.num_cpus >= 1:
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        return load_sampler(path, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                            matmul=cfg.matmul), path
    except BaseException:
        remove_staged(cfg.model, path)
        raise


def remove_staged(spec: str, path: Path | None) -> bool:
    """Delete `path` when it is the temporary copy `localize_model` made of the fsspec URL `spec`
    (never a local export folder). True if something was removed."""
    if path is None or "://" not in spec or spec.startswith("file://") or not path.is_dir():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _param_of(message: str) -> str | None:
    return next((p for p in _PARAMS if p in message), None)


def untrained_drafts_note(path: Path) -> str | None:
    """A note when the export's drafts were never trained (`fluid export --from-model`)."""
    try:
        meta = read_fluid_meta(path)
    except FluidError:
        return None
    if (meta.train_config or {}).get("steps_done", 1) == 0:
        return ("this export's [M] drafts are untrained (made by `fluid export --from-model`): policy 'verify' "
                "stays lossless but runs at AR speed; adapt the model (`fluid adapt`) for speed-ups")
    return None


class FluidServer:
    """One replica: the model, the batching engine, the key check; HTTP routes come from http.make_app."""

    def __init__(self, cfg: ServeConfig | dict):
        self.cfg = cfg if isinstance(cfg, ServeConfig) else from_dict({"serve": dict(cfg)}).serve
        self.auth = Auth.for_replica(self.cfg.api_key_file, self.cfg.api_key_sha256, self.cfg.api_key_env)
        self.staged = None
        self.sampler, path = load_replica_sampler(self.cfg)
        self.staged = path  # removed again when the replica stops (`shutdown`), if a temporary copy
        steps = self.sampler.calibrate_steps(self.cfg.max_batch_size)  # what the batch scheduler prices
        log.info("step cost over batch sizes up to %d: %s in %.2f s (%s)", self.cfg.max_batch_size,
                 "read from the cache" if steps["cached"] else "measured", steps["seconds"], steps["file"])
        name = self.cfg.model_name or Path(self.cfg.model.rstrip("/")).name or path.name
        vocab = self.sampler.model.get_output_embeddings().weight.shape[0]
        self.limits = api.Limits(name, self.cfg.max_tokens_limit, vocab, self.sampler.mask_token_id,
                                 default_max_tokens=min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit))
        self.engine = Engine(self.sampler, max_batch_size=self.cfg.max_batch_size,
                             batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                             max_queued_requests=self.cfg.max_queued_requests,
                             max_kv_tokens=self.cfg.max_kv_tokens or None, metrics=replica_metrics(name))
        self.created = int(time.time())
        self.drafts_note = untrained_drafts_note(path)
        if self.drafts_note:
            log.warning("%s", self.drafts_note)
        if not self.auth.on and self.cfg.host not in LOOPBACK_HOSTS:
            log.warning("serving on %s without an API key: anyone who reaches the port can generate", self.cfg.host)
        log.info("FLUID replica ready: model %s from %s, auth %s", name, path, "on" if self.auth.on else "off")

    def __serve_build_asgi_app__(self):
        """Ray Serve (`serve.ingress()`) asks each replica for its ASGI app after __init__."""
        from pipeline.serve.http import make_app

        return make_app(self)

    def shutdown(self) -> None:
        """Remove the export's temporary copy (an fsspec URL staged here); idempotent."""
        staged, self.staged = getattr(self, "staged", None), None
        remove_staged(self.cfg.model, staged)

    def __del__(self):  # Ray Serve calls __del__ when it stops a replica
        self.shutdown()

    def check_health(self) -> None:
        """Serve's health check: an exception makes Serve replace this replica."""
        self.engine.check()

    def auth_fingerprint(self) -> str | None:
        """Called by `fluid serve` through a handle: which key (if any) this replica enforces."""
        return self.auth.fingerprint()

    def health(self) -> Response:
        try:
            self.engine.check()
        except RuntimeError as e:
            return JSONResponse({"status": "error", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.limits.model, "auth": self.auth.on, **self.engine.stats()})

    def models(self) -> dict:
        s = self.sampler
        card = {"id": self.limits.model, "object": "model", "created": self.created, "owned_by": "fluid",
                "fluid": {"k_max": s.k_max, "context": s.context, "policy_defaults": s.policy_defaults,
                          "max_tokens_limit": self.limits.max_tokens_limit,
                          "default_max_tokens": self.limits.default_max_tokens,
                          **({"note": self.drafts_note} if self.drafts_note else {})}}
        return {"object": "list", "data": [card]}

    async def generate(self, kind: str, body: dict):
        """A validated body → the OpenAI response dict, or a StreamingResponse of SSE events."""
        chat = kind == "chat"
        p = (api.parse_chat if chat else api.parse_completion)(body, self.limits)
        if p.messages is not None:
            ids = await asyncio.to_thread(self.sampler.render, api.render_chat, p.messages)
        elif p.prompt is not None:
            ids = await asyncio.to_thread(self.sampler.encode, p.prompt)
        else:
            ids = p.prompt_ids
        param = "messages" if chat else "prompt"
        api.check_prompt(ids, param=param, context=self.sampler.context, mask_token_id=self.sampler.mask_token_id)
        try:
            ticket = self.engine.submit(p.request(ids, self.limits.default_max_tokens), stream=p.stream)
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
        return api.response(p.kind, rid, p.model, result, fluid)

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
                # the forward that committed the chunk's tokens, and how many it committed
                extra = {"fluid": {"step": ch.step, "committed": len(ch.token_ids)}}
                if ch.result is not None:
                    extra["fluid"] = api.fluid_stats(ch.result.stats, queue_time_s=round(ticket.queue_time_s, 4),
                                                     batch_size=ticket.batch_size, **extra["fluid"])
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
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests, "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s, "look_back_period_s": cfg.look_back_period_s}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def check_config(cfg: ServeConfig) -> None:
    """Reject impossible serve settings before anything starts (the message names the key)."""
    for key in ("max_batch_size", "max_request_bytes", "max_tokens_limit", "default_max_tokens", "num_replicas",
                "min_replicas", "max_replicas", "port"):
        if getattr(cfg, key) < (0 if key == "min_replicas" else 1):
            raise FluidError(f"serve.{key} must be >= {0 if key == 'min_replicas' else 1}, got {getattr(cfg, key)}")
    for key in ("max_queued_requests", "max_kv_tokens", "num_cpus", "num_gpus", "batch_wait_timeout_s",
                "stream_interval_s", "upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
        if getattr(cfg, key) < 0:
            raise FluidError(f"serve.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.autoscaling and cfg.min_replicas > cfg.max_replicas:
        raise FluidError(f"serve.min_replicas {cfg.min_replicas} > serve.max_replicas {cfg.max_replicas}")
    Auth(cfg.api_key_sha256)  # a malformed digest fails here


def replica_config(cfg: ServeConfig) -> ServeConfig:
    """The config the replicas get: a key given to this process (the env var `cfg.api_key_env`) becomes
    its salted digest (a fresh random salt); a key file stays a path (a mounted secret every replica
    reads and salts itself). Start Ray with `auth.key_env_hidden(cfg.api_key_env)` so that no process
    of a local Ray instance inherits the raw key."""
    key_file, raw = driver_key(cfg.api_key_env, cfg.api_key_file)
    if key_file and (raw or cfg.api_key_sha256):
        raise FluidError(f"an API key file ({key_file}) and {'$' + cfg.api_key_env if raw else 'serve.api_key_sha256'} "
                         "are both set: give one")
    out = dataclasses.replace(cfg, api_key_file=key_file)
    if raw:
        out.api_key_sha256 = key_digest(raw)
    return out


def expected_fingerprint(cfg: ServeConfig, got: str | None) -> str | None | bool:
    """The key fingerprint replicas of `replica_config(cfg)` must report, given what one reported (`got`
    carries the salt a replica drew for a key file): a string, None (auth off), or True (a key file
    this process cannot read, e.g. a secret mounted on the cluster only)."""
    if cfg.api_key_sha256:
        return Auth(cfg.api_key_sha256).fingerprint()
    if cfg.api_key_file:
        try:
            key = read_key_file(cfg.api_key_file)
        except FluidError:
            return True
        return fingerprint_of(key, got) if got else "a key"
    return None


def verify_auth(handle, cfg: ServeConfig) -> None:
    """Refuse to go on if the running replicas do not enforce the key `cfg` (a replica_config) names."""
    got = handle.auth_fingerprint.remote().result(timeout_s=60)
    want = expected_fingerprint(cfg, got)
    if (want is True and got is None) or (want is not True and got != want):
        raise FluidError(f"the replicas enforce {'no key' if got is None else 'another key'} although "
                         f"{'a key' if want else 'none'} was configured; refusing to serve")


def build_app(cfg: ServeConfig):
    """The Serve Application for `cfg` (run it with serve.run(app, name=..., route_prefix=...)).
    `cfg` must be a replica_config (no raw key); `fluid serve` and app_builder make it one."""
    from ray import serve

    check_config(cfg)
    if "://" not in cfg.model:
        localize_model(cfg.model)  # fail early on a wrong local path
    ingress = serve.ingress()(FluidServer)
    return serve.deployment(ingress, **deployment_options(cfg)).bind(dataclasses.asdict(cfg))


def app_builder(args: dict):
    """Entry point for `serve deploy` config files: `args` = ServeConfig keys (or {"serve": {...}})."""
    return build_app(replica_config(from_dict({"serve": dict(args.get("serve", args))}).serve))
