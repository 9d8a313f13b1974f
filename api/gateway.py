"""`agentos gateway`: one address in front of the workers of a deployment (`agentos serve
--redis URL --worker`, one per accelerator), routing each request to the worker holding
its session and moving the sessions of a worker that died.

Routing, from the registry and the directory in Redis (see `agentos.snapshot.durable.cluster`):

- `POST /v1/sessions` (and `/v1/sessions/import`): the least loaded live worker (sessions
  in its last heartbeat plus those placed here since, so a burst spreads);
- `/v1/sessions/{id}/...`, `/v1/snapshots/{id}/...`, and OpenAI calls continuing a
  `session`: the worker the directory names. A fork goes to its parent's worker, which
  creates the children there; an id the directory does not know goes to any live worker
  (which answers 404 itself);
- `GET /v1/sessions`, `GET /v1/snapshots`: every live worker, their lists merged;
- `GET /v1/system`: every live worker, their stats summed (and each one's, under
  "workers"), so `agentos top` and `/dashboard` at the gateway show the deployment;
  `GET /dashboard` is served from a worker;
- `POST /v1/weights`, `/v1/engine/*` (admin): every live worker; the first error, else the
  first answer;
- everything else (OpenAI routes, tokenize, system): the least loaded live worker.

Requests and answers pass through unchanged (method, path, query, body, the auth and
format headers; status, content type, body); server-sent events stream through. Tenants'
keys are checked by the workers.

A worker is dead when its lease (alive key) lapses. Its records are re-homed: under the
worker's re-home lock, the directory's records of it are assigned to live workers by
owner and load (`plan_rehome`), each target loads them from the journal
(`POST /v1/internal/adopt` with the cluster secret), and the dead worker's registration is
removed (fencing it, should it come back). A background task does this every heartbeat
interval; a request for a record of a dead worker does it first. A worker that refuses the
connection is waited on for the rest of its lease, then re-homed and the request sent on;
when that cannot be done now the answer is 503 (nothing was changed: clients retry). A
connection that breaks after the request went out is a 503 for GET and DELETE, and a 502
otherwise (the worker may have applied the call: retrying it could apply it twice).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from contextlib import asynccontextmanager

import httpx
import msgpack
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from agentos.api.wire import MSGPACK, error_body
from agentos.kernel.errors import (
    APIStatusError,
    NotFoundError,
    OutOfCapacityError,
    StoreUnavailableError,
)
from agentos.snapshot.durable.cluster import SECRET_HEADER, WorkerInfo, WorkerRegistry, plan_rehome

log = logging.getLogger("agentos.gateway")

FORWARD_HEADERS = ("authorization", "x-api-key", "content-type", "accept", "idempotency-key")
RELAY_HEADERS = ("content-type", "retry-after", "www-authenticate", "cache-control",
                 "x-accel-buffering", "idempotent-replayed")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_RECORD = re.compile(r"^/v1/(?:sessions|snapshots)/([^/]+)(?:/.*)?$")
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class WorkerError(Exception):
    """A worker could not be reached (`sent`: whether the request may have arrived)."""

    def __init__(self, worker: WorkerInfo, cause: Exception, sent: bool):
        super().__init__(f"worker {worker.id} at {worker.url}: {type(cause).__name__}: {cause}")
        self.worker = worker
        self.sent = sent


class Gateway:
    """The routing state of one gateway: a view of the workers (refreshed every heartbeat
    interval and on demand), what it placed since their last heartbeats, re-homes in
    flight. `start`/`close` are called by the app's lifespan handler."""

    def __init__(self, redis_url: str, deployment: str = "default", worker_timeout_s: float = 3.0):
        import redis
        import redis.asyncio

        if worker_timeout_s <= 0:
            raise ValueError(f"worker timeout must be > 0, got {worker_timeout_s}")
        self.ns = f"agentos:{deployment}"
        self.worker_timeout_s = worker_timeout_s
        self.interval_s = worker_timeout_s / 3
        timeout = max(1.0, worker_timeout_s)
        # the registry and re-homing run in threads over a blocking client; the per-request
        # directory lookup stays on the loop
        self.registry = WorkerRegistry(
            redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout),
            self.ns)
        self.redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=timeout,
                                                  socket_connect_timeout=timeout)
        self.redis_errors = (redis.RedisError, OSError)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=min(2.0, worker_timeout_s)), trust_env=False,
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
        self.workers: dict[str, WorkerInfo] = {}
        self.placed: dict[str, tuple[float, int]] = {}  # worker -> (heartbeat ts, placed since)
        self.secret: str | None = None
        self.rehomed = 0  # records moved by this gateway
        self._rehoming: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self.secret = await asyncio.to_thread(self.registry.secret)
        await self.refresh()
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._rehoming.values()):
            t.cancel()
        await self.http.aclose()
        await self.redis.aclose()
        self.registry.client.close()

    async def _watch(self) -> None:
        """Every heartbeat interval: refresh the view, re-home the dead workers."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
                for w in [w for w in self.workers.values() if not w.alive]:
                    await self.rehome(w.id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down, a worker failing: try again next interval
                log.warning("gateway watch: %s: %s", type(e).__name__, e)

    # -- the view of the workers ----------------------------------------------------------

    async def refresh(self) -> dict[str, WorkerInfo]:
        """Reads the registry and the leases; returns the new view."""
        self.workers = await asyncio.to_thread(self.registry.workers)
        return self.workers

    def live(self, exclude: set[str] = frozenset()) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.alive and w.id not in exclude]

    def load(self, w: WorkerInfo) -> int:
        """Sessions on `w`: its last heartbeat's count plus those placed here since."""
        ts, n = self.placed.get(w.id, (None, 0))
        return w.sessions + (n if ts == w.ts else 0)

    def place(self, w: WorkerInfo, n: int = 1) -> None:
        ts, placed = self.placed.get(w.id, (None, 0))
        self.placed[w.id] = (w.ts, (placed if ts == w.ts else 0) + n)

    def least_loaded(self, exclude: set[str] = frozenset()) -> WorkerInfo | None:
        live = self.live(exclude)
        return min(live, key=lambda w: (self.load(w), w.tokens, w.id)) if live else None

    async def owner(self, rid: str) -> str | None:
        """The worker the directory names for a record, or None."""
        value = await self.redis.hget(f"{self.ns}:dir", rid)
        return msgpack.unpackb(value)[0] if value is not None else None

    async def worker_of(self, rid: str) -> WorkerInfo | None:
        """The live worker holding record `rid`, re-homing its dead worker first; None when
        the directory does not know it (or names a worker gone from the registry). Raises
        OutOfCapacityError when its worker is dead and cannot be re-homed now."""
        wid = await self.owner(rid)
        if wid is None:
            return None
        w = self.workers.get(wid)
        if w is not None and w.alive:
            return w
        await self.refresh()
        w = self.workers.get(wid)
        if w is None:  # not registered: a record its adopter did not find
            return None
        if not w.alive:
            if not await self.rehome(wid):
                raise OutOfCapacityError(f"the worker of {rid} ({wid}) is dead and its sessions "
                                         "could not be moved yet; try again")
            wid = await self.owner(rid)
            w = self.workers.get(wid) if wid is not None else None
        return w if w is not None and w.alive else None

    # -- re-homing ----------------------------------------------------------------------

    async def rehome(self, worker_id: str) -> bool:
        """Moves every record of the dead worker `worker_id` to live workers. Returns True
        when the worker is no longer registered (done now, earlier, or by another
        gateway); False when it is alive or it could not be done now (no live worker, an
        adopt call failed: what moved stays moved, the rest is tried again)."""
        task = self._rehoming.get(worker_id)
        if task is None:
            task = asyncio.create_task(self._rehome(worker_id))
            self._rehoming[worker_id] = task
            task.add_done_callback(lambda _: self._rehoming.pop(worker_id, None))
        return await asyncio.shield(task)

    async def _rehome(self, worker_id: str) -> bool:
        reg = self.registry
        lock_ms = int(max(30.0, 10 * self.worker_timeout_s) * 1000)
        token = await asyncio.to_thread(reg.lock, worker_id, lock_ms)
        if token is None:  # another gateway is at it: wait for it to finish
            deadline = time.monotonic() + lock_ms / 1000
            while time.monotonic() < deadline and await asyncio.to_thread(reg.locked, worker_id):
                await asyncio.sleep(self.interval_s / 3)
            return worker_id not in await self.refresh()
        try:
            view = await self.refresh()
            dead = view.get(worker_id)
            if dead is None:
                return True
            if dead.alive:
                return False
            records = await asyncio.to_thread(reg.records, worker_id)
            live = self.live()
            if records and not live:
                log.warning("cannot re-home %d records of %s: no live worker", len(records), worker_id)
                return False
            plan = plan_rehome(records, {w.id: self.load(w) for w in live})
            results = await asyncio.gather(*(self._adopt(view[t], ids) for t, ids in plan.items()))
            if not all(results):
                return False
            left = await asyncio.to_thread(reg.records, worker_id)
            if left:  # in the directory but not in the store: nothing to load them from
                log.error("re-homing %s: %d records were not found in the store: %s", worker_id,
                          len(left), ", ".join(sorted(left)[:10]))
            await asyncio.to_thread(reg.remove, worker_id, dead.registration)
            log.warning("re-homed worker %s: %d records to %s", worker_id, len(records) - len(left),
                        ", ".join(f"{t} ({len(ids)})" for t, ids in plan.items()) or "nobody")
            await self.refresh()
            return True
        finally:
            await asyncio.to_thread(reg.unlock, worker_id, token)

    async def _adopt(self, w: WorkerInfo, ids: list[str]) -> bool:
        try:
            r = await self.http.post(f"{w.url}/v1/internal/adopt", json={"ids": ids},
                                     headers={SECRET_HEADER: self.secret or ""})
        except httpx.HTTPError as e:
            log.warning("adopt on %s failed: %s: %s", w.id, type(e).__name__, e)
            return False
        if r.status_code != 200:
            log.warning("adopt on %s failed: HTTP %d %s", w.id, r.status_code, r.text[:300])
            return False
        items = r.json()["data"]
        self.place(w, sum(i["kind"] == "session" for i in items))
        self.rehomed += len(items)
        return True

    # -- proxying -------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        body = await request.body()
        try:
            if path.startswith("/v1/internal/"):
                raise NotFoundError("not found")
            if not self.live():
                await self.refresh()
            if not self.live():
                raise OutOfCapacityError("no live workers")
            if method == "GET" and path in ("/v1/sessions", "/v1/snapshots"):
                return await self.list_sessions(request)
            if method == "GET" and path == "/v1/system":
                return await self.system(request)
            if path == "/v1/weights" or path.startswith("/v1/engine/"):
                return await self.broadcast(request, body)
            rid = self._record_id(method, path, request.headers.get("content-type", ""), body)
            if rid is not None:
                return await self.to_record(request, body, rid)
            placing = method == "POST" and path in ("/v1/sessions", "/v1/sessions/import")
            return await self.to_least_loaded(request, body, placing)
        except APIStatusError as e:
            return _error(e)
        except self.redis_errors as e:
            return _error(StoreUnavailableError(f"the gateway cannot reach Redis ({type(e).__name__}: "
                                                f"{e}); try again later"))

    @staticmethod
    def _record_id(method: str, path: str, content_type: str, body: bytes) -> str | None:
        if path == "/v1/sessions/import":
            return None
        m = _RECORD.match(path)
        if m:
            return m.group(1)
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions") and body:
            try:
                data = (msgpack.unpackb(body) if content_type.startswith(MSGPACK)
                        else json.loads(body))
            except (ValueError, msgpack.UnpackException):
                return None  # the worker answers the bad body
            sid = data.get("session") if isinstance(data, dict) else None
            return sid if isinstance(sid, str) else None
        return None

    async def to_record(self, request: Request, body: bytes, rid: str) -> Response:
        w = await self.worker_of(rid) or self.least_loaded()
        if w is None:
            raise OutOfCapacityError("no live workers")
        try:
            return await self.send(w, request, body)
        except WorkerError as e:
            if e.sent:
                raise _broken(e, request.method) from None
            if not await self._wait_dead(w):
                raise OutOfCapacityError(f"worker {w.id} refused the connection and still holds "
                                         f"its lease; try again ({e})") from None
            w = await self.worker_of(rid) or self.least_loaded()
            if w is None:
                raise OutOfCapacityError("no live workers") from None
            try:
                return await self.send(w, request, body)
            except WorkerError as e2:
                raise (_broken(e2, request.method) if e2.sent else
                       OutOfCapacityError(f"no worker answered: {e2}")) from None

    async def to_least_loaded(self, request: Request, body: bytes, placing: bool) -> Response:
        refused: set[str] = set()
        while (w := self.least_loaded(refused)) is not None:
            if placing:
                self.place(w)
            try:
                return await self.send(w, request, body)
            except WorkerError as e:
                if e.sent:
                    raise _broken(e, request.method) from None
                refused.add(w.id)  # never sent: another worker may take it (the watch task
                # re-homes this one once its lease lapses)
        raise OutOfCapacityError("no live worker answered")

    async def _wait_dead(self, w: WorkerInfo) -> bool:
        """After a refused connection: waits out `w`'s lease (a worker restarting in place
        keeps renewing it), and re-homes it once lapsed. Returns whether it was re-homed."""
        deadline = time.monotonic() + self.worker_timeout_s + self.interval_s
        while True:
            view = await self.refresh()
            info = view.get(w.id)
            if info is None:
                return True
            if not info.alive:
                return await self.rehome(w.id)
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.interval_s / 3)

    def _build(self, w: WorkerInfo, request: Request, body: bytes,
               accept: str | None = None) -> httpx.Request:
        headers = {k: v for k, v in request.headers.items() if k in FORWARD_HEADERS}
        if accept is not None:
            headers["accept"] = accept
        query = request.url.query
        url = w.url + request.url.path + (f"?{query}" if query else "")
        return self.http.build_request(request.method, url, content=body or None, headers=headers)

    async def send(self, w: WorkerInfo, request: Request, body: bytes) -> Response:
        """Sends the request to `w` and relays its answer: server-sent events as they come,
        anything else once read. Raises WorkerError when `w` cannot be reached or breaks."""
        try:
            r = await self.http.send(self._build(w, request, body), stream=True)
        except _NEVER_SENT as e:
            raise WorkerError(w, e, sent=False) from None
        except httpx.HTTPError as e:
            raise WorkerError(w, e, sent=True) from None
        headers = {k: v for k, v in r.headers.items() if k in RELAY_HEADERS}
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return _Relay(r, headers)
        try:
            content = await r.aread()
        except httpx.HTTPError as e:
            raise WorkerError(w, e, sent=True) from None
        finally:
            await r.aclose()
        return Response(content, status_code=r.status_code, headers=headers)

    async def _fetch(self, w: WorkerInfo, request: Request, body: bytes,
                     accept: str | None = None) -> httpx.Response:
        try:
            return await self.http.send(self._build(w, request, body, accept))
        except _NEVER_SENT as e:
            raise WorkerError(w, e, sent=False) from None
        except httpx.HTTPError as e:
            raise WorkerError(w, e, sent=True) from None

    async def list_sessions(self, request: Request) -> Response:
        """GET /v1/sessions (or /v1/snapshots) on every live worker, merged (by id, as a
        worker sorts them). Dead workers are re-homed first, so their records are listed
        too."""
        for w in [w for w in self.workers.values() if not w.alive]:
            await self.rehome(w.id)
        live = self.live()
        if not live:
            raise OutOfCapacityError("no live workers")
        answers = await self._get_all(live, request, "list sessions")
        if isinstance(answers, Response):
            return answers
        data = sorted((s for r in answers for s in r.json()["data"]), key=lambda s: s["id"])
        return _render({"object": "list", "data": data}, 200, request)

    async def _get_all(self, live: list[WorkerInfo], request: Request,
                       what: str) -> list[httpx.Response] | Response:
        """The GET `request` on every live worker (JSON answers): all the answers, or the
        first that is not a 200, relayed as it is. Raises OutOfCapacityError when a worker
        cannot be reached."""
        try:
            answers = await asyncio.gather(*(self._fetch(w, request, b"", "application/json")
                                             for w in live))
        except WorkerError as e:
            raise OutOfCapacityError(f"cannot {what} now: {e}") from None
        for r in answers:
            if r.status_code != 200:
                return Response(r.content, status_code=r.status_code,
                                headers={k: v for k, v in r.headers.items() if k in RELAY_HEADERS})
        return answers

    async def system(self, request: Request) -> Response:
        """GET /v1/system of the whole deployment: each live worker's answer under
        "workers", and "stats" summed over them (counts, blocks, tokens, times), so
        `agentos top` and /dashboard pointed at the gateway show the cluster."""
        live = self.live()
        answers = await self._get_all(live, request, "read the workers' state")
        if isinstance(answers, Response):
            return answers
        bodies = [r.json() for r in answers]
        merged = dict(bodies[0])
        merged["stats"] = _sum_stats([b["stats"] for b in bodies])
        merged["workers"] = [{"id": w.id, "url": w.url, "stats": b["stats"]} for w, b in zip(live, bodies)]
        tenant = dict(bodies[0].get("tenant", {}))
        for key in ("sessions", "snapshots"):
            if key in tenant:
                tenant[key] = sum(b.get("tenant", {}).get(key, 0) for b in bodies)
        merged["tenant"] = tenant
        return _render(merged, 200, request)

    async def dashboard(self) -> Response:
        """The dashboard page (static: its data calls come back through the gateway)."""
        w = self.least_loaded()
        if w is None:
            raise OutOfCapacityError("no live workers")
        try:
            r = await self.http.get(f"{w.url}/dashboard")
        except httpx.HTTPError as e:
            raise OutOfCapacityError(f"worker {w.id} did not answer: {e}") from None
        return Response(r.content, status_code=r.status_code, media_type="text/html")

    async def broadcast(self, request: Request, body: bytes) -> Response:
        """An admin call on every live worker: the first error, else the first answer."""
        live = self.live()
        try:
            answers = await asyncio.gather(*(self._fetch(w, request, body) for w in live))
        except WorkerError as e:
            raise (_broken(e, request.method) if e.sent else
                   OutOfCapacityError(f"a worker is unreachable: {e}")) from None
        r = next((a for a in answers if a.status_code >= 400), answers[0])
        return Response(r.content, status_code=r.status_code,
                        headers={k: v for k, v in r.headers.items() if k in RELAY_HEADERS})

    async def health(self) -> tuple[int, dict]:
        try:
            view = await self.refresh()
        except self.redis_errors as e:
            return 503, {"status": f"cannot reach Redis: {type(e).__name__}: {e}", "live": 0,
                         "workers": [], "rehomed": self.rehomed}
        workers = [{"id": w.id, "url": w.url, "alive": w.alive, "sessions": w.sessions,
                    "tokens": w.tokens} for w in sorted(view.values(), key=lambda w: w.id)]
        live = sum(w.alive for w in view.values())
        return (200 if live else 503), {"status": "ok" if live else "no live workers",
                                        "live": live, "workers": workers, "rehomed": self.rehomed}


class _Relay(StreamingResponse):
    """A worker's server-sent events, relayed as they come; the upstream response is
    closed however this one ends (so a client gone mid-stream ends the worker's call)."""

    def __init__(self, upstream: httpx.Response, headers: dict):
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers)
        self.upstream = upstream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()


# per-worker facts, the same on every worker: kept from the first, never summed
_SAME = frozenset({"block_size", "block_bytes", "weight_version", "scheduler", "worker_id"})


def _sum_stats(parts: list[dict]) -> dict:
    """Stats dicts summed key by key: numbers added (except _SAME), flags or-ed, dicts
    merged recursively, anything else taken from the first that has it."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = _sum_stats([v]) if isinstance(v, dict) else v
            elif isinstance(v, dict) and isinstance(out[k], dict):
                out[k] = _sum_stats([out[k], v])
            elif isinstance(v, bool):  # "up" holds when every worker is up; others: any
                out[k] = (out[k] and v) if k == "up" else (out[k] or v)
            elif isinstance(v, (int, float)) and k not in _SAME:
                out[k] += v
    return out


def _broken(e: WorkerError, method: str) -> APIStatusError:
    if method in ("GET", "DELETE"):
        return OutOfCapacityError(f"the connection to a worker broke: {e}; try again")
    err = APIStatusError(f"the connection to a worker broke after the request was sent ({e}); "
                         "it may or may not have been applied", status_code=502)
    err.type = "bad_gateway"
    return err


def _render(content: dict, status: int, request: Request) -> Response:
    if MSGPACK in request.headers.get("accept", ""):
        return Response(msgpack.packb(content, use_bin_type=True), status_code=status,
                        media_type=MSGPACK)
    return JSONResponse(content, status_code=status)


def _error(err: APIStatusError) -> Response:
    return JSONResponse(error_body(err), status_code=err.status_code)


def create_gateway(redis_url: str, deployment: str = "default",
                   worker_timeout_s: float = 3.0) -> FastAPI:
    """The gateway app: a reverse proxy over the live workers of `deployment` (see the
    module docstring). `worker_timeout_s` is the workers' lease (3 heartbeat intervals):
    the gateway checks for dead workers every third of it."""
    gateway = Gateway(redis_url, deployment, worker_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="AgentOS gateway", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.gateway = gateway

    @app.get("/health")
    async def health():
        status, body = await gateway.health()
        return JSONResponse(body, status_code=status)

    @app.get("/dashboard")
    async def dashboard():
        try:
            return await gateway.dashboard()
        except APIStatusError as e:
            return _error(e)

    @app.api_route("/v1/{path:path}", methods=METHODS)
    async def proxy(request: Request, path: str):
        return await gateway.handle(request)

    return app
