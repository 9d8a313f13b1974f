"""FastAPI dependencies: the engine, the settings and the request's tenant.

NOTE: async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a
thread handoff per dependency per request."""

from __future__ import annotations

from fastapi import Request

from agentos.api.tenants import Tenant


async def engine(request: Request):
    """The app's AsyncEngine (created by the lifespan handler)."""
    return request.app.state.engine


async def settings(request: Request):
    return request.app.state.settings


async def tenant(request: Request) -> Tenant:
    """The tenant AuthMiddleware found for this request's key."""
    return request.state.tenant
