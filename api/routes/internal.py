"""Calls between the gateway and its workers, under /v1/internal/. AuthMiddleware lets
them through only with the cluster secret (header X-AgentOS-Cluster), never with a
tenant's key; they are left out of the OpenAPI schema."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import Field

from agentos.api import deps
from agentos.api.schemas import ERRORS
from agentos.api.schemas import Request as Body

router = APIRouter(prefix="/v1/internal", tags=["internal"], responses=ERRORS,
                   include_in_schema=False)


class Adopt(Body):
    ids: list[str] = Field(max_length=1 << 20)  # session and snapshot ids


@router.post("/adopt")
async def adopt(body: Adopt, engine=Depends(deps.engine)) -> dict:
    """Loads the records `ids` of a dead worker from the store into this one (their
    directory entries now name this worker), each still owned by its tenant. Returns
    {"data": [{"id", "kind", "owner"}]} for those found; ids not in the store are skipped."""
    return {"data": await engine.adopt(list(body.ids))}
