"""The router's HTTP server: native `/generate`, the OpenAI API, vLLM's `/tokenize`,
`/detokenize`, `/version` and `/ping`, `/health`, `/stats` and the Prometheus `/metrics`, with
every error type mapped to its status code by `server.api.errors`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.admin import admin_routes
from server.api.choices import DEFAULT_MAX_N
from server.api.errors import MAPPED_ERRORS, BodyLimit, error_response, exception_response
from server.api.generate import generate_routes
from server.api.openai_routes import openai_routes
from server.api.tokenize_routes import tokenize_routes
from server.router.core import Router

# /health, /ping, /version and /metrics stay open, as in vLLM: probes and scrapers carry no key.
PROTECTED_PREFIXES = ("/v1/", "/generate", "/stats", "/admin/", "/tokenize", "/detokenize")


def create_app(
    router: Router, api_key: str | None, max_request_bytes: int, max_n: int = DEFAULT_MAX_N
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="Adrenaline router", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    # Inside the key check (a middleware added later wraps those before it): a client without
    # the key gets its 401 before a byte of its body is read.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if api_key:
        install_api_key_check(app, api_key)
    app.include_router(generate_routes(router))
    app.include_router(openai_routes(router, max_n))
    app.include_router(admin_routes(router))
    app.include_router(tokenize_routes(router))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, reason = router.health()
        if ok:
            return JSONResponse({"status": "ok"})
        return error_response(503, f"not ready: {reason}", "service_unavailable")

    # SageMaker's health probe, as vLLM serves it.
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/stats")
    async def stats() -> dict:
        return router.stats()

    @app.get("/metrics")
    async def metrics() -> Response:
        # Async so the scrape reads the router's state on its own loop, never mid-update.
        return Response(router.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def install_error_handlers(app: FastAPI) -> None:
    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    for exc_type in MAPPED_ERRORS:
        app.add_exception_handler(exc_type, _mapped)


def install_api_key_check(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}"

    @app.middleware("http")
    async def _check(request: Request, call_next):
        if request.url.path.startswith(PROTECTED_PREFIXES):
            if request.headers.get("authorization") != expected:
                return error_response(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)
