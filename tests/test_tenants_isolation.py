"""Tenants against a real `agentos serve` with API keys: ownership is the kernel's record
(it survives a SIGKILL and restart on Redis), limits add up (reservations released,
rollback and restore admitted, snapshots counted), a tenant lists its snapshots, no key
claims the tenant "default", engine control on an open server needs --allow-open-admin,
and a non-streamed generate whose client has gone is aborted."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack

import httpx
import pytest

from agentos import Client
from agentos.api.app import ServerSettings
from agentos.api.tenants import load_tenants
from agentos.bench.api import free_port, run_agentos, run_server
from agentos.bench.redis_server import RedisServer

KEYS = {"sk-alice": "alice", "sk-bob": "bob", "sk-carol": "carol", "sk-dave": "dave",
        "sk-erin": "erin"}
LIMITS = {"alice": {"max_tokens": 300, "max_snapshots": 100},
          "bob": {"max_tokens": 300, "max_snapshots": 100},
          "dave": {"max_snapshots": 100}, "erin": {"max_snapshots": 100}}  # carol: the default
GEN = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}


def keys_file(tmp_path, keys: dict, tenants: dict | None = None) -> str:
    path = tmp_path / f"keys-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"keys": keys, "tenants": tenants or {}}))
    return str(path)


def as_(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def tokens(n: int, base: int = 65) -> list[int]:
    return [base + i % 26 for i in range(n)]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = keys_file(tmp_path_factory.mktemp("keys"), KEYS, LIMITS)
    with run_server(["--api-keys", path, "--kv-blocks", "2048", "--max-snapshots-per-tenant", "3",
                     "--log-level", "warning"]) as u:
        yield u


def create(http: httpx.Client, key: str, n: int) -> str:
    r = http.post("/v1/sessions", json={"tokens": tokens(n)}, headers=as_(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_non_streamed_generates_release_their_reservation(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        sid = create(http, "sk-alice", 8)
        for _ in range(12):  # 8 + 12 * 16 = 200 held: under 300, however many calls came before
            r = http.post(f"/v1/sessions/{sid}/generate", json=GEN, headers=as_("sk-alice"))
            assert r.status_code == 200, r.text
        # a call admitted at its max_tokens: over the limit is a 429, and nothing stays held
        r = http.post(f"/v1/sessions/{sid}/generate", json={**GEN, "max_tokens": 101},
                      headers=as_("sk-alice"))
        assert r.status_code == 429, r.text
        r = http.post(f"/v1/sessions/{sid}/generate", json=GEN, headers=as_("sk-alice"))
        assert r.status_code == 200, r.text
        assert http.delete(f"/v1/sessions/{sid}", headers=as_("sk-alice")).status_code == 200


def test_rollback_and_restore_are_admitted_against_max_tokens(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        big = create(http, "sk-bob", 200)
        snap = http.post(f"/v1/sessions/{big}/snapshots", headers=as_("sk-bob")).json()["id"]
        small = create(http, "sk-bob", 90)  # 290 held
        r = http.post(f"/v1/sessions/{small}/rollback", json={"snapshot_id": snap},
                      headers=as_("sk-bob"))
        assert r.status_code == 429, r.text  # 200 tokens would replace 90: 400 held
        assert http.get(f"/v1/sessions/{small}", headers=as_("sk-bob")).json()["num_tokens"] == 90
        r = http.post(f"/v1/snapshots/{snap}/restore", headers=as_("sk-bob"))
        assert r.status_code == 429, r.text
        http.delete(f"/v1/sessions/{small}", headers=as_("sk-bob"))
        r = http.post(f"/v1/sessions/{big}/rollback", json={"snapshot_id": snap},
                      headers=as_("sk-bob"))
        assert r.status_code == 200 and r.json()["num_tokens"] == 200, r.text
        http.delete(f"/v1/sessions/{big}", headers=as_("sk-bob"))
        http.delete(f"/v1/snapshots/{snap}", headers=as_("sk-bob"))


def test_snapshots_count_against_the_tenant_limit(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        sid = create(http, "sk-carol", 8)  # carol has the server's default: 3 snapshots
        snaps = []
        for _ in range(3):
            r = http.post(f"/v1/sessions/{sid}/snapshots", headers=as_("sk-carol"))
            assert r.status_code == 201, r.text
            snaps.append(r.json()["id"])
        r = http.post(f"/v1/sessions/{sid}/snapshots", headers=as_("sk-carol"))
        assert r.status_code == 429 and "3 snapshots" in r.json()["error"]["message"], r.text
        # closing the session does not free them: they outlive it until deleted
        assert http.delete(f"/v1/sessions/{sid}", headers=as_("sk-carol")).status_code == 200
        sid = create(http, "sk-carol", 8)
        assert http.post(f"/v1/sessions/{sid}/snapshots", headers=as_("sk-carol")).status_code == 429
        assert http.delete(f"/v1/snapshots/{snaps[0]}", headers=as_("sk-carol")).status_code == 200
        assert http.post(f"/v1/sessions/{sid}/snapshots", headers=as_("sk-carol")).status_code == 201
        assert http.get("/v1/system", headers=as_("sk-carol")).json()["tenant"]["snapshots"] == 3


def test_list_snapshots_of_the_tenant_only(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        sid = create(http, "sk-dave", 8)
        mine = http.post(f"/v1/sessions/{sid}/snapshots", headers=as_("sk-dave")).json()["id"]
        http.delete(f"/v1/sessions/{sid}", headers=as_("sk-dave"))
        theirs_sid = create(http, "sk-erin", 8)
        theirs = http.post(f"/v1/sessions/{theirs_sid}/snapshots", headers=as_("sk-erin")).json()["id"]
        listed = http.get("/v1/snapshots", headers=as_("sk-dave"))
        assert listed.status_code == 200, listed.text
        assert [s["id"] for s in listed.json()["data"]] == [mine]  # of a closed session too
        assert listed.json()["data"][0]["session_id"] == sid
        assert [s["id"] for s in http.get("/v1/snapshots", headers=as_("sk-erin")).json()["data"]] \
            == [theirs]
        for method, path, body in (("GET", f"/v1/snapshots/{theirs}", None),
                                   ("POST", f"/v1/snapshots/{theirs}/restore", None),
                                   ("DELETE", f"/v1/snapshots/{theirs}", None),
                                   ("GET", f"/v1/sessions/{theirs_sid}/snapshots", None),
                                   ("POST", f"/v1/sessions/{theirs_sid}/snapshots", None)):
            r = http.request(method, path, json=body, headers=as_("sk-dave"))
            assert r.status_code == 404, (method, path, r.text)
        restored = http.post(f"/v1/snapshots/{mine}/restore", headers=as_("sk-dave")).json()["id"]
        r = http.post(f"/v1/sessions/{restored}/rollback", json={"snapshot_id": theirs},
                      headers=as_("sk-dave"))
        assert r.status_code == 404, r.text
        assert [s["id"] for s in http.get("/v1/sessions", headers=as_("sk-dave")).json()["data"]] \
            == [restored]


def test_non_streamed_generate_is_aborted_when_its_client_disconnects(url):
    with httpx.Client(base_url=url, timeout=120) as http:
        sid = create(http, "sk-dave", 8)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{url}/v1/sessions/{sid}/generate", headers=as_("sk-dave"), timeout=1.5,
                       json={"max_tokens": 4000, "temperature": 0.0, "ignore_eos": True})
        deadline = time.monotonic() + 10
        while True:
            info = http.get(f"/v1/sessions/{sid}", headers=as_("sk-dave")).json()
            if info["state"] not in ("running", "runnable") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert info["state"] not in ("running", "runnable"), info  # stopped, far from 4000
        time.sleep(0.5)
        again = http.get(f"/v1/sessions/{sid}", headers=as_("sk-dave")).json()
        assert again["num_generated"] == info["num_generated"] < 4000
        # the session goes on: the aborted call kept its tokens
        r = http.post(f"/v1/sessions/{sid}/generate", json={**GEN, "max_tokens": 2},
                      headers=as_("sk-dave"))
        assert r.status_code == 200 and len(r.json()["tokens"]) == 2, r.text
        # the same through the OpenAI route: its temporary session is closed once aborted
        held = http.get("/v1/system", headers=as_("sk-erin")).json()["tenant"]["sessions"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", headers=as_("sk-erin"), timeout=1.5,
                       json={"prompt": "hello", "max_tokens": 4000, "ignore_eos": True})
        deadline = time.monotonic() + 10
        while http.get("/v1/system", headers=as_("sk-erin")).json()["tenant"]["sessions"] > held:
            assert time.monotonic() < deadline, "the completion ran on"
            time.sleep(0.1)


def test_no_key_may_claim_the_default_tenant(tmp_path):
    path = keys_file(tmp_path, {"sk-x": "default", "sk-y": "y"})
    with pytest.raises(ValueError, match="default"):
        load_tenants(path, "")
    with pytest.raises(ValueError, match="default"):
        load_tenants(None, "sk-z=default")
    proc = subprocess.run([sys.executable, "-m", "agentos.cli", "serve", "--api-keys", path,
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'default'" in proc.stderr, proc.stderr


def test_engine_control_on_an_open_server_needs_allow_open_admin():
    assert not ServerSettings().tenants().by_name["default"].admin
    assert ServerSettings(allow_open_admin=True).tenants().by_name["default"].admin
    with run_server(["--kv-blocks", "256", "--log-level", "warning"]) as u, \
            httpx.Client(base_url=u, timeout=60) as http:
        for path in ("/v1/engine/pause", "/v1/engine/sleep", "/v1/engine/abort"):
            r = http.post(path)
            assert r.status_code == 403 and "--allow-open-admin" in r.json()["error"]["message"], r.text
        r = http.post("/v1/weights", content=b"x")
        assert r.status_code == 403 and "--allow-open-admin" in r.json()["error"]["message"], r.text
        assert http.post("/v1/sessions", json={"prompt": "still served"}).status_code == 201


def test_ownership_survives_sigkill_and_restart_on_redis(tmp_path):
    path = keys_file(tmp_path, {"sk-alice": "alice", "sk-bob": "bob"})
    dep = "tenants-" + uuid.uuid4().hex[:8]
    with RedisServer() as redis:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", redis.url,
                "--deployment", dep, "--api-keys", path, "--kv-blocks", "1024",
                "--log-level", "warning"]
        before: dict[str, dict] = {}
        with run_agentos(args, base) as proc, httpx.Client(base_url=base, timeout=120) as http:
            for i, key in enumerate(("sk-alice", "sk-bob")):
                h = as_(key)
                sid = create(http, key, 10 + i)
                http.post(f"/v1/sessions/{sid}/generate", json=GEN, headers=h)
                http.post(f"/v1/sessions/{sid}/fork", json={"n": 2}, headers=h)
                snap = http.post(f"/v1/sessions/{sid}/snapshots", headers=h).json()["id"]
                http.post(f"/v1/snapshots/{snap}/restore", headers=h)
                record = http.get(f"/v1/sessions/{sid}/export", headers=h).content
                http.post("/v1/sessions/import", content=record,
                          headers={**h, "Content-Type": "application/msgpack"})
                gone = create(http, key, 5)
                http.post(f"/v1/sessions/{gone}/snapshots", headers=h)  # outlives its session
                http.delete(f"/v1/sessions/{gone}", headers=h)
                r = http.post("/v1/completions", headers=h, json={
                    "prompt": "kept", "max_tokens": 3, "keep_session": True, "ignore_eos": True})
                assert r.status_code == 200 and r.json()["session_id"], r.text
                before[key] = tenant_view(http, key)
                assert len(before[key]["sessions"]) == 6 and len(before[key]["snapshots"]) == 2
            proc.kill()  # SIGKILL: no shutdown handler runs
            proc.wait()
        with run_agentos(args, base), httpx.Client(base_url=base, timeout=120) as http:
            for key, other in (("sk-alice", "sk-bob"), ("sk-bob", "sk-alice")):
                assert tenant_view(http, key) == before[key]
                for sid in before[other]["sessions"]:
                    assert http.get(f"/v1/sessions/{sid}", headers=as_(key)).status_code == 404
                for snap in before[other]["snapshots"]:
                    assert http.post(f"/v1/snapshots/{snap}/restore", headers=as_(key)).status_code == 404


def tenant_view(http: httpx.Client, key: str) -> dict:
    """The tenant's sessions (id -> tokens) and snapshots (id -> restored tokens)."""
    h = as_(key)
    sessions = {s["id"]: http.get(f"/v1/sessions/{s['id']}/tokens", headers=h).json()["tokens"]
                for s in http.get("/v1/sessions", headers=h).json()["data"]}
    snapshots = {}
    for snap in http.get("/v1/snapshots", headers=h).json()["data"]:
        restored = http.post(f"/v1/snapshots/{snap['id']}/restore", headers=h).json()["id"]
        snapshots[snap["id"]] = http.get(f"/v1/sessions/{restored}/tokens", headers=h).json()["tokens"]
        http.delete(f"/v1/sessions/{restored}", headers=h)
    return {"sessions": sessions, "snapshots": snapshots}


STREAM = {"max_tokens": 400, "temperature": 0.8, "ignore_eos": True}  # the call a kill interrupts


def tenant_history(http: httpx.Client, key: str, n: int) -> str:
    """Sessions, a fork, a snapshot (restored) and a snapshot outliving its closed session,
    made by `key`; returns the id of a fresh session to be interrupted mid-stream."""
    h = as_(key)
    sid = create(http, key, 10 + n)
    assert http.post(f"/v1/sessions/{sid}/generate", json=GEN, headers=h).status_code == 200
    assert http.post(f"/v1/sessions/{sid}/fork", json={"n": 2}, headers=h).status_code == 201
    snap = http.post(f"/v1/sessions/{sid}/snapshots", headers=h).json()["id"]
    http.post(f"/v1/sessions/{sid}/append", json={"tokens": [70, 71]}, headers=h)
    assert http.post(f"/v1/snapshots/{snap}/restore", headers=h).status_code == 201
    gone = create(http, key, 5)
    assert http.post(f"/v1/sessions/{gone}/snapshots", headers=h).status_code == 201
    assert http.delete(f"/v1/sessions/{gone}", headers=h).status_code == 200
    return create(http, key, 8)


def stream_until_killed(base: str, key: str, sid: str, kill) -> list[int]:
    """Streams a generate of `sid`, calls `kill()` once 6 tokens came; returns the tokens
    the stream handed out."""
    streamed: list[int] = []

    def run():
        try:
            with Client(base, api_key=key, max_retries=0, timeout=60) as c:
                for chunk in c.session(sid).generate(**STREAM, stream=True):
                    if chunk.token is not None:
                        streamed.append(chunk.token)
        except Exception:  # noqa: BLE001 - the server is killed under it
            pass

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while len(streamed) < 6 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    kill()
    thread.join(30)
    assert 6 <= len(streamed) < STREAM["max_tokens"], len(streamed)
    return list(streamed)


def check_interrupted(got: list[int], acked: list[int], streamed: list[int]) -> None:
    """The acknowledged tokens, then every token the stream handed out (durable before it
    was sent), then at most what the call had left."""
    assert got[: len(acked)] == acked
    assert got[len(acked): len(acked) + len(streamed)] == streamed
    assert len(acked) + len(streamed) <= len(got) < len(acked) + STREAM["max_tokens"]


def check_isolated(http: httpx.Client, key: str, theirs: dict) -> None:
    """Every one of another tenant's session and snapshot ids is a 404 for `key`."""
    h = as_(key)
    for sid in theirs["sessions"]:
        for method, path in (("GET", f"/v1/sessions/{sid}"), ("GET", f"/v1/sessions/{sid}/tokens"),
                             ("POST", f"/v1/sessions/{sid}/snapshots")):
            assert http.request(method, path, headers=h).status_code == 404, (key, method, path)
    for snap in theirs["snapshots"]:
        for method, path in (("GET", f"/v1/snapshots/{snap}"),
                             ("POST", f"/v1/snapshots/{snap}/restore")):
            assert http.request(method, path, headers=h).status_code == 404, (key, method, path)


def test_sigkill_mid_stream_with_keys_then_restart(tmp_path):
    path = keys_file(tmp_path, {"sk-alice": "alice", "sk-bob": "bob"})
    dep = "tenants-stream-" + uuid.uuid4().hex[:8]
    with RedisServer() as redis:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", redis.url,
                "--deployment", dep, "--api-keys", path, "--kv-blocks", "1024",
                "--log-level", "warning"]
        before: dict[str, dict] = {}
        with run_agentos(args, base) as proc, httpx.Client(base_url=base, timeout=120) as http:
            fresh = {key: tenant_history(http, key, i) for i, key in enumerate(("sk-alice", "sk-bob"))}
            for key in ("sk-alice", "sk-bob"):
                before[key] = tenant_view(http, key)
                assert len(before[key]["sessions"]) == 5 and len(before[key]["snapshots"]) == 2
            acked = before["sk-alice"]["sessions"][fresh["sk-alice"]]

            def kill():
                proc.kill()  # SIGKILL mid-stream: no shutdown handler runs
                proc.wait()

            streamed = stream_until_killed(base, "sk-alice", fresh["sk-alice"], kill)
        with run_agentos(args, base), httpx.Client(base_url=base, timeout=120) as http:
            after = {key: tenant_view(http, key) for key in ("sk-alice", "sk-bob")}
            assert after["sk-bob"] == before["sk-bob"]
            got = after["sk-alice"]["sessions"].pop(fresh["sk-alice"])
            before["sk-alice"]["sessions"].pop(fresh["sk-alice"])
            assert after["sk-alice"] == before["sk-alice"]
            check_interrupted(got, acked, streamed)
            before["sk-alice"]["sessions"][fresh["sk-alice"]] = got
            check_isolated(http, "sk-alice", before["sk-bob"])
            check_isolated(http, "sk-bob", before["sk-alice"])


def wait_for_live(gateway: str, live: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{gateway}/health", timeout=10).json()["live"] != live:
        assert time.monotonic() < deadline, f"the gateway never saw {live} live workers"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_worker_mid_stream_behind_the_gateway_keeps_tenants_apart(tmp_path):
    from agentos.snapshot.durable.store import RedisStore

    path = keys_file(tmp_path, {"sk-alice": "alice", "sk-bob": "bob"})
    dep = "tenants-gw-" + uuid.uuid4().hex[:8]
    with RedisServer() as redis, ExitStack() as stack:
        store = RedisStore(redis.url, dep)
        procs = {}
        for _ in range(2):
            port = free_port()
            procs[f"127.0.0.1:{port}"] = stack.enter_context(run_agentos(
                ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", redis.url,
                 "--deployment", dep, "--worker", "--api-keys", path, "--kv-blocks", "1024",
                 "--heartbeat-s", "0.3", "--log-level", "warning"], f"http://127.0.0.1:{port}"))
        gport = free_port()
        gateway = f"http://127.0.0.1:{gport}"
        stack.enter_context(run_agentos(
            ["gateway", "--redis", redis.url, "--deployment", dep, "--port", str(gport),
             "--worker-timeout", "1", "--log-level", "warning"], gateway))
        wait_for_live(gateway, 2)
        http = stack.enter_context(httpx.Client(base_url=gateway, timeout=120))
        assert http.get("/v1/sessions").status_code == 401  # the workers check the keys
        fresh = {key: tenant_history(http, key, i) for i, key in enumerate(("sk-alice", "sk-bob"))}
        where = store.directory()
        victim = where[fresh["sk-alice"]][0]
        # placement follows the workers' load (heartbeats): should all of bob's sessions
        # have gone to the other worker, his next ones go to the victim
        for _ in range(10):
            if any(wid == victim and owner == "bob" for wid, owner, _, _ in where.values()):
                break
            create(http, "sk-bob", 6)
            where = store.directory()
        before = {key: tenant_view(http, key) for key in ("sk-alice", "sk-bob")}
        assert len(before["sk-alice"]["sessions"]) == 5 <= len(before["sk-bob"]["sessions"])
        assert len(before["sk-alice"]["snapshots"]) == len(before["sk-bob"]["snapshots"]) == 2
        acked = before["sk-alice"]["sessions"][fresh["sk-alice"]]
        survivor = next(w for w in procs if w != victim)
        on_victim = {owner for wid, owner, _, _ in where.values() if wid == victim}
        assert on_victim == {"alice", "bob"}, where  # both tenants lose a worker

        def kill():
            procs[victim].kill()  # SIGKILL mid-stream: no shutdown handler runs
            procs[victim].wait()

        streamed = stream_until_killed(gateway, "sk-alice", fresh["sk-alice"], kill)
        wait_for_live(gateway, 1)
        after = {key: tenant_view(http, key) for key in ("sk-alice", "sk-bob")}
        assert after["sk-bob"] == before["sk-bob"]
        got = after["sk-alice"]["sessions"].pop(fresh["sk-alice"])
        before["sk-alice"]["sessions"].pop(fresh["sk-alice"])
        assert after["sk-alice"] == before["sk-alice"]
        check_interrupted(got, acked, streamed)
        before["sk-alice"]["sessions"][fresh["sk-alice"]] = got
        check_isolated(http, "sk-alice", before["sk-bob"])
        check_isolated(http, "sk-bob", before["sk-alice"])
        where = store.directory()  # every record re-homed, to its tenant
        for key, name in (("sk-alice", "alice"), ("sk-bob", "bob")):
            ids = [*before[key]["sessions"], *before[key]["snapshots"]]
            assert all(where[i][0] == survivor and where[i][1] == name for i in ids), where
