"""One typed protocol: the engines and the clients implement the same operations, with the
same arguments, and the handles call those operations by name, not through op strings."""

import ast
import inspect
from pathlib import Path
from unittest import mock

import pytest

from agentos import AsyncClient, AsyncEngine, Client, Engine, SamplingParams, Session, Snapshot
from agentos.backend import AsyncBackend, Backend, Operations

ROOT = Path(__file__).resolve().parents[1]


def public(cls) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in inspect.getmembers(cls, inspect.isfunction)
            if not n.startswith("_")}


def test_backends_implement_every_operation():
    for cls, base in ((Engine, Backend), (Client, Backend), (AsyncEngine, AsyncBackend),
                      (AsyncClient, AsyncBackend)):
        assert issubclass(cls, base) and not inspect.isabstract(cls), cls
        assert cls.is_async == (base is AsyncBackend)
    builders = {n for n in vars(Operations) if n.startswith("_op_")}
    assert len(builders) >= 27
    for cls in (Engine, Client):
        assert builders <= {n for n in dir(cls) if n.startswith("_op_")}


def test_blocking_and_asyncio_flavours_have_the_same_methods():
    sync, async_ = public(Backend), public(AsyncBackend)
    assert sync.keys() == async_.keys()
    for name, sig in sync.items():
        if name in ("encode", "decode"):  # tokenizing in-process is not awaited
            continue
        assert inspect.iscoroutinefunction(getattr(AsyncBackend, name)), name
        assert list(sig.parameters) == list(async_[name].parameters), name
        assert [p.default for p in sig.parameters.values()] == \
            [p.default for p in async_[name].parameters.values()], name


def test_backend_overrides_keep_the_protocols_arguments():
    """An engine may add arguments (the tenant); it never drops or reorders the protocol's."""
    for cls, base in ((Engine, Backend), (AsyncEngine, AsyncBackend), (Client, Backend),
                      (AsyncClient, AsyncBackend)):
        mine = public(cls)
        for name, sig in public(base).items():
            params = list(sig.parameters.values())
            theirs = list(mine[name].parameters.values())[:len(params)]
            assert [(p.name, p.default) for p in params] == \
                [(p.name, p.default) for p in theirs], (cls.__name__, name)


# each handle method, the backend method it must call, and with what
HANDLE_CALLS = [
    (lambda s: s.generate(params=PARAMS), "generate", ("s1", "PARAMS", False, None)),
    (lambda s: s.generate(params=PARAMS, append=[4]), "generate", ("s1", "PARAMS", False, [4])),
    (lambda s: s.score(tokens=[1, 2]), "score", ("s1", None, [1, 2])),
    (lambda s: s.next_token_logprobs(5, [3]), "next_token_logprobs", ("s1", 5, [3])),
    (lambda s: s.append(text="x"), "append", ("s1", "x", None)),
    (lambda s: s.fork(3), "fork", ("s1", 3)),
    (lambda s: s.snapshot(), "snapshot", ("s1",)),
    (lambda s: s.rollback("snap"), "rollback", ("s1", "snap")),
    (lambda s: s.close(), "close_session", ("s1",)),
    (lambda s: s.get_tokens_and_mask(), "tokens_and_mask", ("s1",)),
    (lambda s: s.export(kv=True), "export_session", ("s1", True)),
    (lambda s: s.info(), "session_info", ("s1",)),
    (lambda s: s.snapshots(), "list_snapshots", ("s1",)),
]
PARAMS = SamplingParams(max_tokens=3)


@pytest.mark.parametrize("call,method,args", HANDLE_CALLS, ids=[m for _, m, _ in HANDLE_CALLS])
def test_session_handle_calls_the_typed_method(call, method, args):
    backend = mock.create_autospec(Engine, instance=True)
    call(Session(backend, "s1"))
    expected = tuple(PARAMS if a == "PARAMS" else a for a in args)
    getattr(backend, method).assert_called_once_with(*expected)


def test_handles_post_process_sync_and_async_results():
    backend = mock.create_autospec(Engine, instance=True)
    backend.tokens_and_mask.return_value = ([5, 6], [0, 1])
    s = Session(backend, "s1")
    assert s.get_tokens() == [5, 6] and s.get_mask() == [0, 1] and s.tokens == [5, 6]
    Snapshot(backend, "snap", "s1", 2).delete()
    backend.delete_snapshot.assert_called_once_with("snap")

    abackend = mock.create_autospec(AsyncEngine, instance=True)
    abackend.tokens_and_mask.return_value = ([7], [1])

    async def go():
        s = Session(abackend, "s2")
        return await s.get_tokens(), await s.get_mask()

    import asyncio

    assert asyncio.run(go()) == ([7], [1])


def test_no_operation_name_strings_between_handles_and_backends():
    """The old string protocol (`backend._op("fork", ...)`, dispatch on op names) is gone:
    no `_op(` call and no `_route`/`_prepare` dispatch anywhere in the SDK."""
    for path in ("agentos/session.py", "agentos/engine.py", "agentos/client.py",
                 "agentos/backend.py", "agentos/rl.py", "agentos/search.py"):
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("_op", "_route", "_prepare", "_prepare_plain"), \
                    f"{path}:{node.lineno}"


def test_engine_and_client_run_the_same_agent(tmp_path):
    """The same blocking agent code against the engine and against a server over HTTP."""
    from fastapi.testclient import TestClient

    from agentos.api.app import ServerSettings, create_app

    def agent(backend: Backend) -> tuple:
        s = backend.create_session(tokens=[1, 2, 3, 4, 5])
        gen = s.generate(max_tokens=4, temperature=0.0, ignore_eos=True)
        kid, = s.fork(1)
        snap = kid.snapshot()
        kid.append(tokens=[9, 9])
        assert kid.rollback(snap) == 9
        out = (gen.tokens, kid.get_tokens(), backend.session_info(kid.id)["num_tokens"])
        snap.delete()
        kid.close()
        s.close()
        return out

    with Engine(model="tiny", kv_blocks=64, host_blocks=0) as engine:
        local = agent(engine)
    served = AsyncEngine(model="tiny", kv_blocks=64, host_blocks=0)
    try:
        with TestClient(create_app(ServerSettings(), engine=served)) as http:
            # the app in this process, through httpx's own Client API
            client = Client("http://testserver", max_retries=0, http_client=http)
            remote = agent(client)
    finally:
        served.kernel.shutdown()
    assert local == remote
