"""The FastAPI app over one AsyncEngine: settings, lifespan, error mapping, routers.

`create_app(settings)` builds the app; its lifespan handler starts the engine (or uses
the one passed in) and closes it on shutdown. Every error leaves as
`{"error": {"type", "message", "code"}}` with its status, mapped here and nowhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from agentos.api.fastpath import FastRoutes
from agentos.api.idempotency import IdempotencyMiddleware
from agentos.api.observe import HttpMetrics, RequestLogMiddleware
from agentos.api.routes import dashboard, internal, openai, sessions, snapshots, system, vllm
from agentos.api.routes import engine as engine_routes
from agentos.api.tenants import Tenants, load_tenants
from agentos.api.wire import AuthMiddleware, BodyMiddleware, WireResponse, error_response
from agentos.kernel.config import Config
from agentos.kernel.errors import (
    AgentOSError,
    APIStatusError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    OutOfCapacityError,
    UnprocessableEntityError,
)

log = logging.getLogger("agentos.api")
_DEFAULT_WORKER_ID = Config().worker_id


@dataclass
class ServerSettings:
    # the engine's options, model and store included: AsyncEngine(**engine_options())
    config: Config = field(default_factory=Config)
    # cluster (the store, its deployment and the worker id are the engine's)
    worker: bool = False  # register in Redis and heartbeat, behind `agentos gateway`
    advertise_url: str | None = None  # how the gateway reaches this worker (default http://host:port)
    heartbeat_s: float = 1.0  # a worker renews its lease this often (lease: 3 intervals)
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str | None = None  # JSON file of keys and tenants; AGENTOS_API_KEYS also read
    allow_open: bool = False  # serve without keys on a non-loopback address
    served_model_name: str | None = None  # the `model` of OpenAI routes (default: folder name)
    max_body_bytes: int = 16 << 20  # request bodies over this are refused (413)
    max_weights_bytes: int = 64 << 30  # a weight update's body (POST /v1/weights) at most
    max_import_bytes: int | None = None  # an import's body at most (None: a full context's KV)
    body_timeout_s: float = 60.0  # a body must arrive within this (a large one: each chunk)
    max_tokens_cap: int | None = 4096  # max_tokens per generate call at most (None: context)
    max_sessions_per_tenant: int | None = None  # default limit of live sessions per tenant
    max_tokens_per_tenant: int | None = None  # default limit of tokens held per tenant
    max_snapshots_per_tenant: int | None = None  # default limit of live snapshots per tenant
    requests_per_s_per_tenant: float | None = None  # default request rate per tenant (429 past it)
    body_bytes_per_s_per_tenant: float | None = None  # default body bytes a second per tenant
    allow_open_admin: bool = False  # without keys, let every request act on the engine (weights)
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name or self.model

    def engine_options(self) -> dict:
        """Every Config field by its name, as the engine is built from them; only the
        worker id is resolved (see resolved_worker_id)."""
        options = {f.name: getattr(self.config, f.name) for f in fields(Config)}
        options["worker_id"] = self.resolved_worker_id
        return options

    @property
    def resolved_worker_id(self) -> str:
        """The config's worker id; a worker left at the default one is host:port instead,
        since workers behind one gateway need distinct ids."""
        if self.worker and self.config.worker_id == _DEFAULT_WORKER_ID:
            return f"{self.host}:{self.port}"
        return self.config.worker_id

    @property
    def redis_url(self) -> str | None:
        """The store when it is a Redis URL (what a worker registers in), else None."""
        store = self.config.store
        return store if isinstance(store, str) and store != "memory" else None

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

    def tenants(self) -> Tenants:
        """The tenants from the keys file and environment. Raises ValueError when the
        server would be open (no keys) on a non-loopback address without allow_open."""
        tenants = load_tenants(self.api_keys, None, self.max_sessions_per_tenant,
                               self.max_tokens_per_tenant, self.max_snapshots_per_tenant,
                               self.allow_open_admin, self.requests_per_s_per_tenant,
                               self.body_bytes_per_s_per_tenant)
        if tenants.open and not self.allow_open and not _is_loopback(self.host):
            raise ValueError(f"no API keys configured: refusing to serve on {self.host} "
                             "(give --api-keys or AGENTOS_API_KEYS, or --allow-open)")
        return tenants


def create_app(settings: ServerSettings | None = None, engine=None,
               tenants: Tenants | None = None) -> FastAPI:
    """The app. Without `engine`, the lifespan handler creates an AsyncEngine from the
    settings (and closes it at shutdown); a given engine is left open."""
    settings = settings or ServerSettings()
    tenants = tenants or settings.tenants()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from agentos.engine import AsyncEngine

        own = engine is None
        app.state.engine = engine or await asyncio.to_thread(
            AsyncEngine, **settings.engine_options())
        if settings.max_import_bytes is None:
            body_limits[IMPORT_PATH] = import_limit(app.state.engine, settings.max_body_bytes)
        scopes = {n: t.cache_scope for n, t in tenants.by_name.items() if t.cache_scope}
        if scopes:  # tenants naming one cache_scope share prefix-cache pages
            k = app.state.engine.kernel
            await asyncio.wrap_future(k.call(k.memory.share_cache, scopes))
        heartbeat = None
        try:
            if settings.worker:
                heartbeat = await asyncio.to_thread(_start_heartbeat, app, settings,
                                                    asyncio.get_running_loop())
                app.state.heartbeat = heartbeat
            yield
        finally:
            if heartbeat is not None:
                await asyncio.to_thread(heartbeat.stop)
                heartbeat.registry.client.close()
            if own:
                await app.state.engine.close()

    app = FastAPI(title="AgentOS", version=_version(), lifespan=lifespan,
                  default_response_class=WireResponse, docs_url=None, redoc_url=None,
                  description="Agent sessions as processes: create, append, generate, fork, "
                  "snapshot, roll back. JSON, or msgpack with Content-Type / Accept "
                  "application/msgpack.")
    app.state.settings = settings
    app.state.tenants = tenants
    app.state.engine = engine  # None until the lifespan handler starts one
    app.state.heartbeat = None  # a worker's Heartbeat, from the lifespan handler
    app.state.cluster_secret = None  # read from Redis by a worker
    app.state.fast_routes = True  # False: every request through FastAPI (api/fastpath.py)
    routers = (sessions.router, snapshots.router, openai.router, system.router,
               engine_routes.router, internal.router, dashboard.router, vllm.router)
    for r in routers:
        app.include_router(r)
    _docs(app)
    _error_handlers(app)
    # innermost: well-formed calls of the simple routes, without FastAPI's machinery
    app.add_middleware(FastRoutes, routers=routers, errors=error_for,
                       enabled=lambda: app.state.fast_routes and not app.dependency_overrides)
    # it sees the tenant and the whole body
    app.add_middleware(IdempotencyMiddleware,
                       journal=lambda: getattr(app.state.engine, "journal", None))
    # the last added runs first: keys are checked before the body is read
    body_limits = {"/v1/weights": settings.max_weights_bytes,
                   IMPORT_PATH: settings.max_import_bytes or settings.max_body_bytes}
    app.add_middleware(BodyMiddleware, max_body_bytes=settings.max_body_bytes,
                       large=body_limits, raw={IMPORT_PATH},
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(AuthMiddleware, tenants=tenants,
                       cluster_secret=lambda: app.state.cluster_secret)
    app.add_middleware(FenceMiddleware, fenced=lambda: bool(
        app.state.heartbeat is not None and app.state.heartbeat.fenced))
    app.state.http_metrics = HttpMetrics()
    app.add_middleware(RequestLogMiddleware, metrics=app.state.http_metrics)  # outermost
    return app


IMPORT_PATH = "/v1/sessions/import"


def import_limit(engine, floor: int) -> int:
    """The largest import body a session of the engine can need: a full context's tokens
    and masks (5 bytes each) and its KV blocks, plus 1 MiB for the rest of the record; at
    least `floor`."""
    k = engine.kernel
    block_bytes = math.prod(k.kv_block_shape) * k.kv_dtype.itemsize
    num_blocks = -(-engine.max_model_len // k.block_size)
    return max(floor, num_blocks * block_bytes + 5 * engine.max_model_len + (1 << 20))


class FenceMiddleware:
    """Answers /v1/ and /health with 503 once this worker is fenced (a gateway re-homed
    its records to other workers), so two workers never serve one session."""

    def __init__(self, app, fenced: Callable[[], bool]):
        self.app = app
        self.fenced = fenced

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith(AuthMiddleware.PATHS) or path == "/health") \
                and self.fenced():
            err = OutOfCapacityError("this worker was fenced: its sessions moved to other "
                                     "workers; send requests through the gateway")
            return await error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


def _start_heartbeat(app: FastAPI, settings: ServerSettings, loop: asyncio.AbstractEventLoop):
    """Registers this worker in Redis and starts its Heartbeat (the load: live sessions
    and their tokens, read from the engine on the app's loop). Reads the cluster secret."""
    import redis

    from agentos.snapshot.durable.cluster import Heartbeat, WorkerRegistry

    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL as its store (--store, --redis)")
    timeout = max(0.5, settings.heartbeat_s)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout,
                                  socket_connect_timeout=timeout)
    registry = WorkerRegistry(client, f"agentos:{settings.config.deployment}")
    app.state.cluster_secret = registry.secret()

    async def load() -> dict:
        infos = await app.state.engine.list_sessions()
        return {"sessions": len(infos), "tokens": sum(i["num_tokens"] for i in infos)}

    def load_now() -> dict:
        fut = asyncio.run_coroutine_threadsafe(load(), loop)
        try:
            return fut.result(timeout=settings.heartbeat_s)
        finally:
            fut.cancel()

    journal = getattr(app.state.engine, "journal", None)

    def guard(registration: bytes) -> None:
        # NOTE: from now on the journal writes only while this registration stands, so a
        # worker whose sessions were re-homed (it seemed dead) can never write them again
        if journal is not None:
            journal.guard = (registry.workers_key, settings.resolved_worker_id, registration)

    return Heartbeat(registry, settings.resolved_worker_id, settings.url, load_now,
                     settings.heartbeat_s, on_register=guard).start()


def _error_handlers(app: FastAPI) -> None:
    for cls in (APIStatusError, AgentOSError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(cls, _handler)


async def _handler(request: Request, exc: Exception):
    return error_for(exc)


def error_for(exc: Exception) -> WireResponse:
    """The app's answer to an exception a route raised: an API error with its status; a
    malformed request (FastAPI's validation) as 400 or 422; anything else logged, and a
    500 that names only its type."""
    if isinstance(exc, APIStatusError):
        return error_response(exc)
    if isinstance(exc, AgentOSError):
        log.exception("unexpected engine error", exc_info=exc)
        return error_response(InternalServerError(str(exc)))
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(InvalidRequestError("request body is not valid JSON"))
        return error_response(UnprocessableEntityError("; ".join(_describe(e) for e in errors[:8])))
    if isinstance(exc, HTTPException):
        cls = NotFoundError if exc.status_code == 404 else APIStatusError
        err = cls(str(exc.detail), status_code=exc.status_code)
        if exc.status_code != 404:
            err.type = "http_error"
        return error_response(err)
    log.exception("unhandled error", exc_info=exc)
    return error_response(InternalServerError(f"internal error: {type(exc).__name__}"))


def _describe(e: dict) -> str:
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    return f"{where}: {e.get('msg', 'invalid')}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


DOCS_ASSETS = "/docs-assets"


def _docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI (5.x: it reads FastAPI's OpenAPI 3.1) with its scripts and
    styles served from here, the copy the swagger-ui-py package ships, so the page works
    with no network."""
    import importlib.util
    from pathlib import Path

    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    spec = importlib.util.find_spec("swagger_ui")  # its files only: nothing of it runs
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package (a dependency) is not installed")
    static = Path(spec.submodule_search_locations[0]) / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title="AgentOS API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def _version() -> str:
    from agentos import __version__

    return __version__
