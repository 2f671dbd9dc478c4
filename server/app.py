"""The router's HTTP server: native `/generate`, the OpenAI API, `/health`, `/stats` and the
Prometheus `/metrics`, with every error type mapped to its status code by `server.http_errors`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.admin_api import admin_routes
from server.generate_api import generate_routes
from server.http_errors import MAPPED_ERRORS, BodyLimit, error_response, exception_response
from server.openai_api import openai_routes
from server.router import Router

# /health and /metrics stay open, as in vLLM: probes and scrapers carry no key.
PROTECTED_PREFIXES = ("/v1/", "/generate", "/stats", "/admin/")


def create_app(router: Router, api_key: str | None, max_request_bytes: int) -> FastAPI:
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
    app.include_router(openai_routes(router))
    app.include_router(admin_routes(router))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, reason = router.health()
        if ok:
            return JSONResponse({"status": "ok"})
        return error_response(503, f"not ready: {reason}", "service_unavailable")

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
