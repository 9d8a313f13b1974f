"""The engine as a whole, for RL trainers and operators (admin tenants only; on a server
without keys, only with --allow-open-admin): weight updates, pause/resume, abort of all
generate calls, sleep/wake of the KV pool."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from agentos.api import deps
from agentos.api.schemas import ERRORS, EngineState, Pause, Sleep, WeightsOut
from agentos.api.tenants import Tenant
from agentos.kernel.errors import InvalidRequestError

router = APIRouter(prefix="/v1", tags=["engine"], responses=ERRORS)


async def admin(t: Tenant = Depends(deps.tenant)) -> Tenant:
    t.require_admin()
    return t


@router.post("/weights", response_model=WeightsOut,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                 "description": "a safetensors file of HF-named tensors (all or some)"}})
async def update_weights(request: Request, version: int | None = Query(None, ge=0),
                         kv_policy: Literal["recompute", "keep"] = "recompute",
                         t: Tenant = Depends(admin), engine=Depends(deps.engine)):
    """Loads new weights between steps; returns the new weight version."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    body = await request.body()
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, OSError) as e:
        raise InvalidRequestError(f"body is not a safetensors file: {e}") from None
    if not tensors:
        raise InvalidRequestError("the safetensors body holds no tensors")
    v = await engine.update_weights(tensors, version, kv_policy)
    return {"version": v, "kv_policy": kv_policy}


@router.post("/engine/pause", response_model=EngineState)
async def pause(body: Pause | None = None, t: Tenant = Depends(admin),
                engine=Depends(deps.engine)):
    """Stops stepping; with {"wait": true}, once the calls in flight have ended (generate
    calls arriving meanwhile wait for resume)."""
    await engine.pause(wait=body is not None and body.wait)
    return {}


@router.post("/engine/resume", response_model=EngineState)
async def resume(t: Tenant = Depends(admin), engine=Depends(deps.engine)):
    await engine.resume()
    return {}


@router.post("/engine/abort", response_model=EngineState)
async def abort(t: Tenant = Depends(admin), engine=Depends(deps.engine)):
    return {"aborted": await engine.abort()}


@router.post("/engine/sleep", response_model=EngineState)
async def sleep(body: Sleep | None = None, t: Tenant = Depends(admin), engine=Depends(deps.engine)):
    await engine.sleep(body.level if body is not None else 1)
    return {}


@router.post("/engine/reset_prefix_cache")
async def reset_prefix_cache(t: Tenant = Depends(admin), engine=Depends(deps.engine)) -> dict:
    """Empties the prefix cache (every tenant's); returns {"dropped": cached pages forgotten}."""
    return {"dropped": await engine.reset_prefix_cache()}


@router.post("/engine/wake_up", response_model=EngineState)
async def wake_up(t: Tenant = Depends(admin), engine=Depends(deps.engine)):
    await engine.wake_up()
    return {}
