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
