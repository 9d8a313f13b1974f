"""Snapshots as resources: take, list, inspect, roll back to, restore from, delete."""

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
from agentos.session import Session, Snapshot

router = APIRouter(prefix="/v1", tags=["snapshots"], responses=ERRORS)


def snapshot_info(snap: Snapshot) -> dict:
    return {"id": snap.id, "session_id": snap.session_id, "num_tokens": snap.num_tokens,
            "device_blocks": snap.device_blocks, "host_blocks": snap.host_blocks,
            "created_at": snap.created_at}


@router.post("/sessions/{sid}/snapshots", status_code=201, response_model=SnapshotInfo)
async def take_snapshot(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    snap = await Session(engine, t.session(sid)).snapshot()
    t.snapshots.add(snap.id)
    return snapshot_info(snap)


@router.get("/sessions/{sid}/snapshots", response_model=SnapshotList)
async def list_snapshots(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    snaps = await Session(engine, t.session(sid)).snapshots()
    return {"data": [snapshot_info(s) for s in snaps if s.id in t.snapshots]}


@router.post("/sessions/{sid}/rollback", response_model=SessionLength)
async def rollback(sid: str, body: Rollback, t: Tenant = Depends(deps.tenant),
                   engine=Depends(deps.engine)):
    s = Session(engine, t.session(sid))
    num_tokens = await s.rollback(await tenant_snapshot(t, engine, body.snapshot_id))
    return {"id": sid, "num_tokens": num_tokens}


async def tenant_snapshot(t: Tenant, engine, snap_id: str) -> str:
    """The snapshot id if the tenant owns it: here, or (behind a gateway) on another worker
    of the deployment, as the store's directory says. Raises NotFoundError."""
    store = getattr(engine, "store", None)
    if snap_id not in t.snapshots and store is not None:
        entry = await asyncio.to_thread(store.lookup, snap_id)
        if entry is not None and entry[1] == t.name and entry[2] == "p":
            return snap_id
    return t.snapshot(snap_id)


@router.get("/snapshots/{snap_id}", response_model=SnapshotInfo)
async def get_snapshot(snap_id: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    return snapshot_info(await engine.get_snapshot(t.snapshot(snap_id)))


@router.delete("/snapshots/{snap_id}", response_model=Deleted)
async def delete_snapshot(snap_id: str, t: Tenant = Depends(deps.tenant),
                          engine=Depends(deps.engine)):
    await Snapshot(engine, t.snapshot(snap_id), "", 0).delete()
    t.snapshots.discard(snap_id)
    return {"id": snap_id, "object": "snapshot.deleted"}


@router.post("/snapshots/{snap_id}/restore", status_code=201, response_model=SessionInfo)
async def restore(snap_id: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    snap = await engine.get_snapshot(t.snapshot(snap_id))
    async with t.admit(engine, sessions=1, tokens=snap.num_tokens):
        s = await engine.restore(snap_id)
        t.sessions.add(s.id)
    return await session_info(engine, s.id)
