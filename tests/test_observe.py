"""Request logs and HTTP metrics: every request gets an id (the client's X-Request-ID when
it is sane), one log line (text or JSON) and a count by route template and status."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agentos.api.app import ServerSettings, create_app
from agentos.api.observe import configure_logging
from agentos.engine import AsyncEngine


@pytest.fixture(scope="module")
def client():
    engine = AsyncEngine("tiny", kv_blocks=256)
    with TestClient(create_app(ServerSettings(), engine=engine)) as c:
        yield c
    engine.kernel.shutdown()


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger("agentos")
    saved = root.handlers[:], root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = saved


def test_request_ids_logs_and_metrics(client, capsys):
    configure_logging("json")
    r = client.post("/v1/sessions", json={"tokens": [1, 2, 3]}, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 201 and r.headers["x-request-id"] == "req-42"
    sid = r.json()["id"]
    bad = client.get("/v1/sessions/sess_nope", headers={"X-Request-ID": "no spaces allowed!"})
    assert bad.status_code == 404 and len(bad.headers["x-request-id"]) == 32  # replaced
    client.get(f"/v1/sessions/{sid}")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    first = next(x for x in lines if x["request_id"] == "req-42")
    assert first["method"] == "POST" and first["status"] == 201 and first["route"] == "/v1/sessions"
    assert first["tenant"] == "default" and first["ms"] > 0
    assert any(x["status"] == 404 and x["route"] == "/v1/sessions/{sid}" for x in lines)

    text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    route = ("route", "/v1/sessions/{sid}")
    assert samples[("agentos_http_requests_total", (("method", "GET"), route, ("status", "404")))] >= 1
    assert samples[("agentos_http_requests_total", (("method", "GET"), route, ("status", "200")))] >= 1
    assert not any(sid in str(k) for k in samples)  # ids never become label values
    assert samples[("agentos_http_request_duration_seconds_count", (("method", "POST"),
                                                                     ("route", "/v1/sessions")))] >= 1


def test_text_log_format(client, capsys):
    configure_logging("text")
    client.get("/health", headers={"X-Request-ID": "plain-1"})
    line = next(x for x in capsys.readouterr().err.splitlines() if "plain-1" in x)
    assert "request_id=plain-1" in line and "status=200" in line and "route=/health" in line
    with pytest.raises(ValueError):
        configure_logging("xml")


def _scrape(c) -> dict:
    text = c.get("/metrics").text
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# engine-wide paging and scheduling history: totals over sessions, never a series per session
HISTORY = ("agentos_preemptions_total", "agentos_swapped_seconds_total",
           "agentos_sched_seconds_total")


def test_history_counters_are_engine_wide(client):
    sid = client.post("/v1/sessions", json={"tokens": [7, 8, 9]}).json()["id"]
    client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 2})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    stats = client.get("/v1/system").json()["stats"]
    for name, key in (("agentos_preemptions", "preemptions"), ("agentos_swapped_seconds",
                      "swapped_s"), ("agentos_sched_seconds", "sched_s")):
        fam = families[name]
        assert fam.type == "counter" and fam.documentation, name
        [sample] = fam.samples  # one series: no label per session or tenant
        assert sample.name == f"{name}_total" and not sample.labels
        assert sample.value >= 0 and stats[key] >= 0
    assert families["agentos_sched_seconds"].samples[0].value > 0  # it has scheduled steps
    client.delete(f"/v1/sessions/{sid}")


def test_metrics_move_with_sessions_forks_swaps_and_closes():
    """A small device pool with a host tier, so sessions get swapped: every family the
    operators watch moves the way the operations say."""
    engine = AsyncEngine("tiny", kv_blocks=24, host_blocks=256, max_batch_tokens=256)
    try:
        with TestClient(create_app(ServerSettings(), engine=engine)) as c:
            before = _scrape(c)
            ids = [c.post("/v1/sessions", json={"tokens": [i + 1] * 120}).json()["id"]
                   for i in range(4)]  # distinct: the prefix cache must not share them
            for sid in ids:  # each needs 8 of the 24 blocks: the others swap out in turn
                r = c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "ignore_eos": True})
                assert r.status_code == 200
            kids = c.post(f"/v1/sessions/{ids[0]}/fork", json={"n": 2}).json()["data"]
            snap = c.post(f"/v1/sessions/{ids[0]}/snapshots").json()["id"]
            c.post(f"/v1/sessions/{ids[0]}/rollback", json={"snapshot_id": snap})
            mid = _scrape(c)
            assert _get(mid, "agentos_sessions", state="sleeping") + _get(
                mid, "agentos_sessions", state="swapped") == 6
            assert sum(v for (n, _), v in mid.items() if n == "agentos_sessions_by_level") == 6
            assert _get(mid, "agentos_forks_total") - _get(before, "agentos_forks_total") == 2
            assert _get(mid, "agentos_swap_out_bytes_total") > 0
            assert _get(mid, "agentos_kv_device_blocks_used") > 0
            assert _get(mid, "agentos_snapshots") == 1
            assert _get(mid, "agentos_tokens_generated_total") >= 12
            for op in ("create", "generate", "fork", "snapshot", "rollback"):
                assert _get(mid, "agentos_op_seconds_count", op=op) >= 1, op
            assert _get(mid, "agentos_step_seconds_count") >= 4
            assert _get(mid, "agentos_step_sessions_count") == _get(mid, "agentos_step_seconds_count")
            assert _get(mid, "agentos_queue_wait_seconds_count") >= 4
            # paging and scheduling history: engine-wide counters that only go up
            assert _get(mid, "agentos_preemptions_total") >= 1  # 4 sessions in 3 sessions' room
            for name in HISTORY:
                assert 0 <= _get(before, name) <= _get(mid, name), name
            sessions = c.get("/v1/sessions").json()["data"]
            assert all(s["swap_count"] >= 0 and s["swapped_s"] >= 0 and s["queue_wait_s"] >= 0
                       for s in sessions)
            assert sum(s["swap_count"] for s in sessions) >= 1
            for sid in [*ids, *(k["id"] for k in kids)]:
                c.delete(f"/v1/sessions/{sid}")
            c.delete(f"/v1/snapshots/{snap}")
            after = _scrape(c)
            assert sum(v for (n, _), v in after.items() if n == "agentos_sessions") == 0
            assert _get(after, "agentos_kv_device_blocks_used") == 0
            assert _get(after, "agentos_op_seconds_count", op="close") == 6
            for name in HISTORY:  # closed sessions' history stays counted
                assert _get(after, name) >= _get(mid, name), name
            assert _get(after, "agentos_http_requests_total", method="DELETE",
                        route="/v1/sessions/{sid}", status="200") == 6
    finally:
        engine.kernel.shutdown()
