"""The web dashboard: one self-contained HTML page (inline CSS and JS, nothing fetched from
elsewhere) that polls /v1/system and /v1/sessions with the API key the user gives it.

The page holds no data, so it is served without a key; every number it shows comes from
the /v1 routes, which check the key as always.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])


@cache
def page() -> str:
    """The page's HTML, read once from the package data (api/static/dashboard.html)."""
    return files("agentos.api").joinpath("static/dashboard.html").read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    # NOTE: no-store so an upgraded server's page is never served from a stale cache
    return HTMLResponse(page(), headers={"Cache-Control": "no-store"})
