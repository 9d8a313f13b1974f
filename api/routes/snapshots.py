"""Snapshots as resources: take, list (a session's or the tenant's), inspect, roll back to,
restore from, delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from agentos.api import deps
from agentos.api.routes.sessions import session_info
from agentos.api.schemas import (
    ERRORS,
    Deleted,
    Rollback,
    SessionInfo,
    SessionLength,
    SnapshotInfo,
    SnapshotList,
)
from agentos.api.tenants import Tenant
from agentos.kernel.errors import NotFoundError
from agentos.session import Session, Snapshot

router = APIRouter(prefix="/v1", tags=["snapshots"], responses=ERRORS)


def snapshot_info(snap: Snapshot) -> dict:
    return {"id": snap.id, "session_id": snap.session_id, "num_tokens": snap.num_tokens,
            "device_blocks": snap.device_blocks, "host_blocks": snap.host_blocks,
            "created_at": snap.created_at, "owner": snap.owner}


@router.post("/sessions/{sid}/snapshots", status_code=201, response_model=SnapshotInfo)
async def take_snapshot(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    s = Session(engine, await t.session(engine, sid))
    async with t.admit(engine, snapshots=1):
        snap = await s.snapshot()
    return snapshot_info(snap)


@router.get("/sessions/{sid}/snapshots", response_model=SnapshotList)
async def list_snapshots(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    snaps = await engine.list_snapshots(await t.session(engine, sid), owner=t.name)
    return {"data": [snapshot_info(s) for s in snaps]}


@router.get("/snapshots", response_model=SnapshotList)
async def list_all_snapshots(t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    """The tenant's live snapshots, those of its closed sessions included."""
    snaps = await engine.list_snapshots(owner=t.name)
    return {"data": [snapshot_info(s) for s in sorted(snaps, key=lambda s: s.id)]}


@router.post("/sessions/{sid}/rollback", response_model=SessionLength)
async def rollback(sid: str, body: Rollback, t: Tenant = Depends(deps.tenant),
                   engine=Depends(deps.engine)):
    """Admitted against the tenant's max_tokens: the snapshot's tokens replace the
    session's."""
    s = Session(engine, await t.session(engine, sid))
    snap = await tenant_snapshot(t, engine, body.snapshot_id)
    tokens = 0
    if t.max_tokens is not None and snap is not None:
        tokens = max(0, snap.num_tokens - await engine.num_tokens([sid]))
    async with t.admit(engine, tokens=tokens):
        num_tokens = await s.rollback(body.snapshot_id)
    return {"id": sid, "num_tokens": num_tokens}


async def tenant_snapshot(t: Tenant, engine, snap_id: str) -> Snapshot | None:
    """The snapshot's handle if the tenant owns it here; None if it owns it on another
    worker of the deployment (behind a gateway), as the store's directory says. Raises
    NotFoundError."""
    try:
        return await t.snapshot(engine, snap_id)
    except NotFoundError:
        store = getattr(engine, "store", None)
        if store is None:
            raise
        entry = await asyncio.to_thread(store.lookup, snap_id)
        if entry is None or entry[1] != t.name or entry[2] != "p":
            raise
        return None


@router.get("/snapshots/{snap_id}", response_model=SnapshotInfo)
async def get_snapshot(snap_id: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    return snapshot_info(await t.snapshot(engine, snap_id))


@router.delete("/snapshots/{snap_id}", response_model=Deleted)
async def delete_snapshot(snap_id: str, t: Tenant = Depends(deps.tenant),
                          engine=Depends(deps.engine)):
    await (await t.snapshot(engine, snap_id)).delete()
    return {"id": snap_id, "object": "snapshot.deleted"}


@router.post("/snapshots/{snap_id}/restore", status_code=201, response_model=SessionInfo)
async def restore(snap_id: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    """Admitted against the tenant's max_sessions and max_tokens (the snapshot's tokens)."""
    snap = await t.snapshot(engine, snap_id)
    async with t.admit(engine, sessions=1, tokens=snap.num_tokens):
        s = await engine.restore(snap_id)
    return await session_info(engine, s.id)
