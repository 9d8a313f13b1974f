"""Well-formed calls of the simple routes, answered without FastAPI's per-request machinery.

A fork or a rollback is tens of microseconds of kernel work; FastAPI's routing (it
matches every included router twice), its request and dependency solving, content-type
parsing and response validation cost several times that per call. `FastRoutes`, the
innermost middleware, serves the routes whose whole input is their path parameters, at
most one JSON body model, the request itself and the app's own dependencies
(`deps.tenant`, `deps.engine`, `deps.settings`): it matches the path, validates the body
with the route's own model, calls the route's own function and renders its answer through
the route's response model, as FastAPI would (an answer that is a Response, a stream of
events say, goes out as it is). A route given the request finds it as FastAPI leaves it:
the body read, so the next message it receives is the client's disconnect.

FastAPI stays the definition of the API: its routes, their OpenAPI schema, and every
answer that is not a success. A request the fast path does not take whole goes to FastAPI
unchanged (its body replayed): another content type, a body that does not parse or
validate (FastAPI's 400 or 422), an unknown path or method (404, 405), a route with query,
header or cookie parameters, any dependency override. Errors the route itself raises are
answered by the app's error mapping (`app_errors`), the same one its exception handlers
use.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from agentos.api import deps
from agentos.api.wire import WireResponse, _header

# a dependency of the app's -> its value, from the request's scope
_PROVIDERS: dict[Callable, Callable[[dict], Any]] = {
    deps.tenant: lambda scope: scope["state"]["tenant"],
    deps.engine: lambda scope: scope["app"].state.engine,
    deps.settings: lambda scope: scope["app"].state.settings,
}


@dataclass(slots=True)
class FastRoute:
    """One route the fast path serves: how to call its function and render its answer."""

    route: APIRoute
    deps: tuple[tuple[str, Callable[[dict], Any]], ...]  # (parameter, provider)
    body_name: str | None
    body_model: type[BaseModel] | None
    request_name: str | None  # its parameter of type Request, if it has one
    answer: TypeAdapter | None  # the response model; None: the answer as it is
    status_code: int


def fast_route(route: APIRoute) -> FastRoute | None:
    """The route as the fast path serves it, or None when it takes anything the fast path
    does not supply (query, header or cookie parameters, a dependency of its own, a form
    or several body fields, a response setting other than the defaults)."""
    d = route.dependant
    if (d.query_params or d.header_params or d.cookie_params
            or d.http_connection_param_name or d.response_param_name
            or d.background_tasks_param_name or d.security_scopes_param_name
            or d.websocket_param_name or route.dependencies or len(d.body_params) > 1
            or not inspect.iscoroutinefunction(route.endpoint)
            or not isinstance(route.response_class, DefaultPlaceholder)
            or route.response_model_include is not None or route.response_model_exclude is not None
            or not route.response_model_by_alias or route.response_model_exclude_unset
            or route.response_model_exclude_defaults or route.response_model_exclude_none):
        return None
    if any(p.field_info.annotation is not str for p in d.path_params):
        return None  # str parameters only: their value is the path segment as it is
    providers = []
    for sub in d.dependencies:
        provider = _PROVIDERS.get(sub.call)  # type: ignore[arg-type]
        if provider is None or sub.name is None or not sub.use_cache:
            return None
        providers.append((sub.name, provider))
    body_name = body_model = None
    if d.body_params:
        field = d.body_params[0]
        hints = typing.get_type_hints(route.endpoint)
        body_model = hints.get(field.name)
        if (not isinstance(body_model, type) or not issubclass(body_model, BaseModel)
                or not isinstance(field.field_info, params.Body) or field.field_info.embed
                or type(field.field_info) is not params.Body):
            return None
        body_name = field.name
    model = route.response_model
    answer = TypeAdapter(model) if model is not None else None
    return FastRoute(route, tuple(providers), body_name, body_model, d.request_param_name,
                     answer, route.status_code or 200)


class FastRoutes:
    """The innermost middleware: serves the simple routes of `routers` (see the module),
    in their order, and hands everything else to the app.

    `errors(exc)` answers an exception the route raised (the app's error mapping);
    `enabled()` is checked per request (False: every request goes to FastAPI; the app
    turns it off while dependency overrides are set)."""

    def __init__(self, app, routers: Sequence[APIRouter],
                 errors: Callable[[Exception], Response], enabled: Callable[[], bool]):
        self.app = app
        self.errors = errors
        self.enabled = enabled
        # every route of the routers in FastAPI's order, with its literal start (a cheap
        # pre-check) and its FastRoute; None for one the fast path does not serve, so a
        # path that FastAPI would give such a route never goes to a later eligible one
        self.routes: list[tuple[APIRoute, str, FastRoute | None]] = [
            (r, r.path.split("{", 1)[0], fast_route(r)) for router in routers
            for r in router.routes if isinstance(r, APIRoute)]

    def match(self, scope: dict) -> tuple[FastRoute, dict[str, str]] | None:
        """The fast route that FastAPI would run for this request (the first route whose
        path and method match), with its path parameters; None when that is a route the
        fast path does not serve or there is none (FastAPI's 404 or 405)."""
        path, method = scope["path"], scope["method"]
        for route, prefix, fast in self.routes:
            if not path.startswith(prefix) or method not in route.methods:
                continue
            m = route.path_regex.match(path)
            if m is not None:
                return None if fast is None else (fast, m.groupdict())
        return None

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("root_path") or not self.enabled()
                or (found := self.match(scope)) is None):
            return await self.app(scope, receive, send)
        fast, path_params = found
        kwargs: dict[str, Any] = dict(path_params)
        replay = receive
        if fast.body_model is not None:
            message = await receive()  # BodyMiddleware hands the whole body over at once
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            replay = _replay(message, receive)
            value = None if message.get("more_body") else _validated(
                fast.body_model, body, _header(scope, b"content-type"))
            if value is None:  # FastAPI answers it: its own 400 or 422 (or reads the rest)
                return await self.app(scope, replay, send)
            kwargs[fast.body_name] = value  # type: ignore[index]
        scope["route"], scope["endpoint"] = fast.route, fast.route.endpoint
        scope["path_params"] = path_params
        try:
            if fast.request_name is not None:
                request = kwargs[fast.request_name] = Request(scope, replay)
                if fast.body_model is not None:
                    # as FastAPI leaves it: the body read (and kept for body()), so the
                    # next message the route receives is the client's disconnect
                    await request.body()
            for name, provider in fast.deps:
                kwargs[name] = provider(scope)
            result = await fast.route.endpoint(**kwargs)
            response = result if isinstance(result, Response) else _render(fast, result)
        except Exception as e:  # noqa: BLE001 - answered as the app's handlers would
            response = self.errors(e)
        await response(scope, replay, send)


def _validated(model: type[BaseModel], body: bytes, content_type: str) -> BaseModel | None:
    """The body as the model, when it is JSON that validates; None otherwise (FastAPI then
    gives the request its own answer)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if not body or not (media == "application/json" or
                        (media.startswith("application/") and media.endswith("+json"))):
        return None
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
        return None


def _render(fast: FastRoute, result: Any) -> WireResponse:
    """The answer through the route's response model (validated, then dumped as JSON
    data), as FastAPI's serialize_response does."""
    if fast.answer is not None:
        value = fast.answer.validate_python(result, from_attributes=True)
        result = fast.answer.dump_python(value, mode="json", by_alias=True)
    return WireResponse(result, status_code=fast.status_code)


def _replay(message: dict, receive) -> Callable[[], Awaitable[dict]]:
    """A receive that gives `message` once, then defers to `receive` (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return message

    return replay

