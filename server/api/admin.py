"""`POST /admin/drain`: take a worker (`?instance=NAME`) or the whole deployment (no query) out
of service without losing a request. Behind the API key, like `/stats`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.errors import error_response
from server.router.core import Router


def admin_routes(router: Router) -> APIRouter:
    routes = APIRouter()

    @routes.post("/admin/drain")
    async def drain(instance: str | None = None) -> JSONResponse:
        # A worker drains itself (finishes its requests, takes nothing new, exits 0); the
        # whole deployment drains by refusing new requests while those in flight finish.
        try:
            router.drain(instance)
        except KeyError:
            return error_response(404, f"no worker named {instance!r}", "not_found_error")
        active = len(router.requests)
        return JSONResponse({"draining": instance or "all", "active_requests": active})

    return routes
