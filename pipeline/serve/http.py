"""The FastAPI application of one replica: OpenAI routes, auth, body limit, errors in OpenAI's shape.

In:  a `FluidServer` (app.py) that owns the sampler, the engine and the key; HTTP requests.
Out: `make_app(server)` → a FastAPI app with GET /healthz, GET /v1/models, POST /v1/completions,
     POST /v1/chat/completions, and /docs, /redoc, /openapi.json (unless serve.api_docs is false). Ray Serve mounts it with `@serve.ingress`
     (so access logs show the real route); tests run it with Starlette's TestClient, without Ray.
Every error is OpenAI's {"error": {"message", "type", "param", "code"}}: validation failures are 400
(never FastAPI's 422), unknown routes 404, wrong methods 405, oversized bodies 413, a wrong or
missing key 401 (only GET /healthz needs no key, for load balancers; with auth on, the API docs need it too).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from pipeline.serve import openai_api as api
from pipeline.serve import schema

ROUTES = "/v1/completions, /v1/chat/completions, /v1/models, /healthz, /docs"
TITLE = "FLUID — OpenAI-compatible completions"


def error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before any handler reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = api.ApiError(413, f"the request body exceeds {self.limit} bytes", None, "request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        messages, size = [], 0
        while True:  # read the body here (bounded), then replay it to the app
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await error_response(too_big)(scope, receive, send)
            if not msg.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def add_keyed_docs(app: FastAPI, require_key) -> None:
    """/openapi.json, /docs and /redoc behind the key (auth on). A browser sends no Authorization header
    by itself: fetch them with one (curl, an API client), or set serve.api_docs=false."""
    keyed = [Depends(require_key)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    async def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    async def docs(request: Request):
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=TITLE)

    @app.get("/redoc", include_in_schema=False, dependencies=keyed)
    async def redoc(request: Request):
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=TITLE)


def make_app(server) -> FastAPI:
    """The routes of `server` (a FluidServer: `.health()`, `.models()`, `.generate(kind, body)`, `.auth`)."""
    open_docs = server.cfg.api_docs and not server.auth.on  # FastAPI's own routes: no key needed
    app = FastAPI(title=TITLE, version="1",
                  description="Elastic-horizon decoding of a FLUID export. Send `Authorization: Bearer <key>` "
                  "when the server has a key. Extensions: `policy`, `gamma`, `max_horizon`, `ignore_eos`.",
                  responses={"4XX": {"model": schema.ErrorResponse}},
                  **({} if open_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, e: api.ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return error_response(schema.validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        if e.status_code == 404:
            return error_response(api.ApiError(404, f"no route {request.url.path}; see {ROUTES}", None,
                                               "not_found"))
        if e.status_code == 405:
            return error_response(api.ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                               None, "method_not_allowed"))
        return error_response(api.ApiError(e.status_code, str(e.detail), None, None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect):
        return Response(status_code=499)

    def require_key(request: Request) -> None:
        server.auth.check(request.headers.get("authorization"))

    @app.get("/healthz", summary="Liveness and load: 503 when the decoding loop died")
    async def healthz():
        return server.health()

    @app.get("/v1/models", response_model=schema.ModelList, dependencies=[Depends(require_key)])
    async def models():
        return server.models()

    @app.post("/v1/completions", response_model=schema.Completion, dependencies=[Depends(require_key)],
              responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}})
    async def completions(body: schema.CompletionRequest):
        return await server.generate("completion", body.model_dump(exclude_unset=True))

    @app.post("/v1/chat/completions", response_model=schema.ChatCompletion, dependencies=[Depends(require_key)],
              responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}})
    async def chat_completions(body: schema.ChatCompletionRequest):
        return await server.generate("chat", body.model_dump(exclude_unset=True))

    if server.cfg.api_docs and server.auth.on:
        add_keyed_docs(app, require_key)
    app.add_middleware(BodyLimit, limit=server.cfg.max_request_bytes)
    return app
