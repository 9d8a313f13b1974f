"""The web dashboard (GET /dashboard) on a real server with API keys: the page is served
without a key and holds no data; headless Chromium, given the key in the URL fragment,
shows the sessions table and the fork/snapshot tree of the selected session.

Needs Chromium (`apt-get install -y chromium`): the browser test fails, not skips,
without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from agentos import Client
from agentos.bench.api import run_server

KEY = "sk-test"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """A server whose only key is KEY (tenant alice, an admin: it sees the engine's
    counters)."""
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": {KEY: "alice"}, "tenants": {"alice": {"admin": True}}}))
    with run_server(["--api-keys", str(keys), "--kv-blocks", "1024", "--log-level", "warning"]) as u:
        yield u


def test_page_needs_no_key_and_its_data_does(url):
    page = httpx.get(f"{url}/dashboard", trust_env=False)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for marker in ('<table id="sessions"', '<svg id="tree"', "Authorization", "API key required",
                   ">swaps</th>", ">swapped</th>", ">queue wait</th>"):
        assert marker in page.text
    # self-contained: the only URL in it is the SVG namespace, nothing is fetched from elsewhere
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page.text)) == {"http://www.w3.org/2000/svg"}
    for path in ("/v1/system", "/v1/sessions"):
        assert httpx.get(url + path, trust_env=False).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + path, headers=auth, trust_env=False).status_code == 200


def test_dashboard_in_chromium(url, tmp_path):
    browser = chromium()
    with Client(url, api_key=KEY) as client:
        root = client.create_session(prompt="The agent plans its next step")
        other = client.create_session(prompt="An unrelated agent")
        root.generate(max_tokens=4, temperature=0)
        snap = root.snapshot()
        kids = root.fork(n=2)
        tokens = {s.id: s.info()["num_tokens"] for s in (root, *kids)}
        tokens[snap.id] = snap.num_tokens
        page = f"{url}/dashboard#key={KEY}&session={root.id}"
        seen = Dom(run_chromium(browser, tmp_path / "root", "--dump-dom", page))
        from_kid = Dom(run_chromium(browser, tmp_path / "kid", "--dump-dom",
                                    f"{url}/dashboard#key={KEY}&session={kids[0].id}"))
        no_key = Dom(run_chromium(browser, tmp_path / "nokey", "--dump-dom", f"{url}/dashboard"))
        shot = tmp_path / "dashboard.png"
        run_chromium(browser, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1400,1000",
                     "--hide-scrollbars", page)
    print(f"dashboard screenshot: {shot}")

    assert seen.body["data-status"] == "ok", seen.banner
    assert int(seen.body["data-polls"]) >= 2  # it refreshes: /v1 polled every second
    rows = seen.rows()
    assert set(rows) == {root.id, other.id, *(k.id for k in kids)}
    assert {sid: r["data-parent-id"] for sid, r in rows.items()} == {
        root.id: "", other.id: "", kids[0].id: root.id, kids[1].id: root.id}
    assert [sid for sid, r in rows.items() if "selected" in r.get("class", "")] == [root.id]
    for r in rows.values():  # each session's paging and scheduling history
        assert int(r["data-swap-count"]) >= 0
        assert float(r["data-swapped-s"]) >= 0 and float(r["data-queue-wait-s"]) >= 0
    counters = {a["data-counter"] for _, a in seen.elements if "data-counter" in a}
    assert {"preemptions", "time swapped", "scheduling per step"} <= counters

    family = {root.id: "session", kids[0].id: "session", kids[1].id: "session", snap.id: "snapshot"}
    nodes = seen.nodes()
    assert {nid: n["data-kind"] for nid, n in nodes.items()} == family  # not the other session
    assert {nid: int(n["data-tokens"]) for nid, n in nodes.items()} == tokens
    assert [nid for nid, n in nodes.items() if n["data-selected"] == "true"] == [root.id]
    assert seen.edges() == {(root.id, kids[0].id, "fork"), (root.id, kids[1].id, "fork"),
                            (root.id, snap.id, "snapshot")}

    # a child selected: the same family (walked up to its root), the child marked
    kid_nodes = from_kid.nodes()
    assert {nid: n["data-kind"] for nid, n in kid_nodes.items()} == family
    assert [nid for nid, n in kid_nodes.items() if n["data-selected"] == "true"] == [kids[0].id]

    assert no_key.body["data-status"] == "auth"
    assert "API key required" in no_key.banner
    assert not no_key.rows() and not no_key.nodes()

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def chromium() -> str:
    """The path of a Chromium binary; fails the test (not a skip) when there is none."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("the dashboard test needs headless Chromium, and none of "
                f"{', '.join(BROWSERS)} is on PATH: install it with `apt-get install -y chromium`",
                pytrace=False)


def run_chromium(browser: str, profile: Path, *args: str) -> str:
    """Runs headless Chromium with a fresh profile (so no key stays in localStorage from an
    earlier run) and 5 s of virtual time (timers run: the page polls); returns stdout."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--no-proxy-server",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"chromium exited with {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


class Dom(HTMLParser):
    """The elements of a dumped DOM, by tag and attributes, and the banner's text."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.banner = ""
        self._in_banner = 0  # depth inside #banner
        self.feed(html)
        self.close()
        self.body = next(a for tag, a in self.elements if tag == "body")

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if self._in_banner or a.get("id") == "banner":
            self._in_banner += 1

    def handle_endtag(self, tag):
        if self._in_banner:
            self._in_banner -= 1

    def handle_data(self, data):
        if self._in_banner:
            self.banner += data

    def rows(self) -> dict[str, dict[str, str]]:
        return {a["data-session-id"]: a for tag, a in self.elements
                if tag == "tr" and "data-session-id" in a}

    def nodes(self) -> dict[str, dict[str, str]]:
        return {a["data-node-id"]: a for _, a in self.elements if "data-node-id" in a}

    def edges(self) -> set[tuple[str, str, str]]:
        return {(a["data-from"], a["data-to"], a["data-edge"]) for _, a in self.elements
                if "data-edge" in a}


def test_api_docs_work_offline(url, tmp_path):
    """/docs loads Swagger UI from this server only (no CDN), and Chromium renders the
    operations from /openapi.json with no other host reachable."""
    page = httpx.get(f"{url}/docs", trust_env=False)
    assert page.status_code == 200
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert refs and all(r.startswith("/docs-assets/") for r in refs), refs
    assert "cdn." not in page.text and "unpkg" not in page.text
    for ref in refs:
        asset = httpx.get(url + ref, trust_env=False)
        assert asset.status_code == 200 and len(asset.content) > 500, ref
    browser = chromium()
    # every host but this server is unreachable for the browser
    dom = run_chromium(browser, tmp_path / "docs", "--host-resolver-rules=MAP * ~NOTFOUND, "
                       "EXCLUDE 127.0.0.1", "--dump-dom", f"{url}/docs")
    assert "opblock" in dom and "/v1/sessions" in dom  # the operations were rendered
