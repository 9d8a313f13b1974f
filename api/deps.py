"""FastAPI dependencies: the engine, the settings and the request's tenant."""

from __future__ import annotations

from fastapi import Request

from agentos.api.tenants import Tenant


def engine(request: Request):
    """The app's AsyncEngine (created by the lifespan handler)."""
    return request.app.state.engine


def settings(request: Request):
    return request.app.state.settings


def tenant(request: Request) -> Tenant:
    """The tenant AuthMiddleware found for this request's key."""
    return request.state.tenant
