"""Sessions as resources: create, inspect, append, generate (plain or streamed), fork,
tokens, close."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response

from agentos.api import deps
from agentos.api.schemas import (
    ERRORS,
    Append,
    CreateSession,
    Deleted,
    Fork,
    Generate,
    GenerationOut,
    NextTokenLogprobsOut,
    NextTokenLogprobsRequest,
    Score,
    ScoreOut,
    SessionInfo,
    SessionLength,
    SessionList,
    SessionTokens,
)
from agentos.api.tenants import Tenant
from agentos.api.wire import MSGPACK, EventStream, error_body, sse
from agentos.kernel.errors import AgentOSError, APIStatusError, InvalidRequestError, NotFoundError
from agentos.kernel.sampling_params import SamplingParams
from agentos.session import Session
from agentos.snapshot.codec import Record

router = APIRouter(prefix="/v1", tags=["sessions"], responses=ERRORS)

T = TypeVar("T")


async def session_info(engine, sid: str) -> dict:
    infos = await engine.list_sessions([sid])
    if not infos:
        raise NotFoundError(f"no session {sid!r}")
    return infos[0]


@router.post("/sessions", status_code=201, response_model=SessionInfo)
async def create_session(body: CreateSession, t: Tenant = Depends(deps.tenant),
                         engine=Depends(deps.engine)):
    ids = body.tokens if body.tokens is not None else await engine.encode_async(body.prompt, True)
    async with t.admit(engine, sessions=1, tokens=len(ids)):
        s = await engine.create_session(tokens=ids, seed=body.seed, owner=t.name)
    return await session_info(engine, s.id)


@router.get("/sessions", response_model=SessionList)
async def list_sessions(t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    infos = await engine.list_sessions(owner=t.name)
    return {"data": sorted(infos, key=lambda i: i["id"])}


@router.get("/sessions/{sid}", response_model=SessionInfo)
async def get_session(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    return await session_info(engine, await t.session(engine, sid))


@router.delete("/sessions/{sid}", response_model=Deleted)
async def close_session(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    await Session(engine, await t.session(engine, sid)).close()
    return {"id": sid, "object": "session.deleted"}


@router.post("/sessions/{sid}/append", response_model=SessionLength)
async def append(sid: str, body: Append, t: Tenant = Depends(deps.tenant),
                 engine=Depends(deps.engine)):
    s = Session(engine, await t.session(engine, sid))
    ids = body.tokens if body.tokens is not None else await engine.encode_async(body.text, False)
    async with t.admit(engine, tokens=len(ids)):
        num_tokens = await s.append(tokens=ids)
    return {"id": sid, "num_tokens": num_tokens}


@router.post("/sessions/{sid}/generate", response_model=GenerationOut,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the Generation, or with stream: server-sent "
                              "events, one per token, then one with finish_reason"}})
async def generate(sid: str, body: Generate, request: Request, t: Tenant = Depends(deps.tenant),
                   engine=Depends(deps.engine), settings=Depends(deps.settings)):
    s = Session(engine, await t.session(engine, sid))
    params = sampling_params(body.model_dump(exclude={"stream", "append"}),
                             settings.max_tokens_cap)
    ids = None
    if (more := body.append) is not None:
        ids = more.tokens if more.tokens is not None else await engine.encode_async(more.text, False)
    release = await t.reserve(engine, tokens=params.max_tokens + len(ids or ()))
    if not body.stream:
        try:
            return await until_disconnected(request, s.generate(params=params, append=ids))
        finally:
            release()
    try:
        chunks = await s.generate(params=params, stream=True, append=ids)
    except BaseException:
        release()
        raise

    async def on_close():
        await chunks.aclose()
        release()

    return EventStream(events(chunks), on_close)


async def until_disconnected(request: Request, call: Awaitable[T]) -> T:
    """Awaits call; cancels it as soon as the client disconnects (a generate is then
    aborted, keeping the tokens it made) and raises ClientDisconnectedError."""
    task = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnectedError("the client disconnected before the answer")
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def _client_gone(request: Request, poll_s: float = 0.2) -> None:
    """Returns when the client has disconnected. The body was read before the call ran, so
    the next ASGI message is the disconnect (the server sends it as the connection
    drops); anything else falls back to polling."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(poll_s)


class ClientDisconnectedError(APIStatusError):
    """The client went away while its call ran (nginx's 499; nobody reads the answer)."""

    status_code = 499
    type = "client_disconnected"


def structured_fields(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The SamplingParams constraint of vLLM's `structured_outputs` (json, json_object,
    regex, grammar (Lark), choice): exactly one kind; anything else is a 400."""
    if not spec:
        return {}
    given = {k: v for k, v in spec.items() if v not in (None, False)}
    unknown = set(given) - {"json", "json_object", "regex", "grammar", "choice"}
    if unknown or len(given) != 1:
        raise InvalidRequestError("structured_outputs takes exactly one of json, json_object, "
                                  f"regex, grammar (Lark), choice; got {sorted(spec)}")
    (kind, value), = given.items()
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidRequestError("the json schema given as text is not JSON") from None
        return {"json_schema": value}
    if kind == "json_object":
        return {"json_schema": True}
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise InvalidRequestError("structured_outputs.choice must be a list of strings")
        return {"grammar": "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value)}
    return {kind: value}


def sampling_params(fields: dict, max_tokens_cap: int | None) -> SamplingParams:
    """SamplingParams from request fields; max_tokens over the server's cap is a 400."""
    if max_tokens_cap is not None and fields["max_tokens"] > max_tokens_cap:
        raise InvalidRequestError(f"max_tokens is {fields['max_tokens']}; this server allows "
                                  f"at most {max_tokens_cap} per call")
    fields = {k: v for k, v in fields.items() if v is not None}
    return SamplingParams(**fields)


async def events(chunks):
    """Server-sent events of a streamed generate: one `data:` line per GenerationChunk; an
    error after the stream began is an `event: error`."""
    try:
        async for chunk in chunks:
            yield sse(asdict(chunk))
    except AgentOSError as e:
        err = e if isinstance(e, APIStatusError) else APIStatusError(str(e), 500)
        yield sse(error_body(err), "error")


@router.post("/sessions/{sid}/fork", status_code=201, response_model=SessionList)
async def fork(sid: str, body: Fork, t: Tenant = Depends(deps.tenant),
               engine=Depends(deps.engine)):
    s = Session(engine, await t.session(engine, sid))
    tokens = await engine.num_tokens([sid]) * body.n if t.max_tokens is not None else 0
    async with t.admit(engine, sessions=body.n, tokens=tokens):
        children = await s.fork(n=body.n)
    return {"data": await engine.list_sessions([c.id for c in children])}


@router.get("/sessions/{sid}/tokens", response_model=SessionTokens)
async def tokens(sid: str, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    ids, mask = await Session(engine, await t.session(engine, sid)).get_tokens_and_mask()
    return {"id": sid, "tokens": ids, "mask": mask, "text": engine.decode(ids)}


@router.post("/sessions/{sid}/score", response_model=ScoreOut)
async def score(sid: str, body: Score, t: Tenant = Depends(deps.tenant),
                engine=Depends(deps.engine)):
    """Logprobs of a continuation given the session; the session is unchanged."""
    s = Session(engine, await t.session(engine, sid))
    ids = body.tokens if body.tokens is not None else await engine.encode_async(body.text, False)
    async with t.admit(engine, tokens=len(ids)):
        logprobs = await s.score(tokens=ids)
    return {"id": sid, "tokens": ids, "logprobs": logprobs}


@router.post("/sessions/{sid}/next_token_logprobs", response_model=NextTokenLogprobsOut)
async def next_token_logprobs(sid: str, body: NextTokenLogprobsRequest,
                              t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    """The distribution over the session's next token: top_k and the given candidates."""
    s = Session(engine, await t.session(engine, sid))
    dist = await s.next_token_logprobs(body.top_k, body.candidates)
    return asdict(dist)


@router.get("/sessions/{sid}/export", response_class=Response,
            responses={200: {"content": {MSGPACK: {}},
                             "description": "the session's record: versioned, checksummed msgpack"}})
async def export_session(sid: str, kv: bool = Query(False, description="include the KV bytes"),
                         t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    """The session as a record (tokens, masks, RNG state, weight versions, parent), to
    import here or on another deployment; with kv=true also its cached KV bytes."""
    data = await engine.export_session(await t.session(engine, sid), kv)
    return Response(data, media_type=MSGPACK,
                    headers={"Content-Disposition": f'attachment; filename="{sid}.agentos"'})


@router.post("/sessions/import", status_code=201, response_model=SessionInfo,
             openapi_extra={"requestBody": {"required": True, "content": {
                 MSGPACK: {"schema": {"type": "string", "format": "binary"}}}}})
async def import_session(request: Request, t: Tenant = Depends(deps.tenant),
                         engine=Depends(deps.engine)):
    """A new session from a record made by export (the raw body). A corrupted record or
    one of another format version is refused (400, nothing created)."""
    data = await request.body()
    if not data:
        raise InvalidRequestError("the body must be a session record (from GET .../export)")
    rec = Record.unpack(data)
    async with t.admit(engine, sessions=1, tokens=len(rec.token_ids)):
        s = await engine.import_session(rec, owner=t.name)
    return await session_info(engine, s.id)
