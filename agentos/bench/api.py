"""`agentos bench api`: what the REST layer adds to fork, snapshot, rollback and a
one-token generate.

The server is `agentos serve` in a subprocess on a loopback port. Each request is timed
from the caller (encoding the body and decoding the answer included) through four
transports, taking turns at each repeat on the same session: one keep-alive httpx client in
JSON and in msgpack; one keep-alive connection of the standard library's http.client in
JSON, the same requests without httpx's request and response machinery (about 0.5 ms of
client CPU a call on a 2-core machine), which is closer to what the server itself adds; and
the SDK's `agentos.Client` (JSON, its http.client transport), what an agent written against
the SDK sees. The peer is the same ops on an in-process Engine with the same model and
session length, timed the same way, so HTTP p50 / in-process p50 is the price of the REST
layer: the HTTP round trip, routing, validation and the wire format.

The server runs as `agentos serve` does by default, access log included. Each timed request
carries an `X-Request-ID`, so its line in that log gives the time the server's app spent on
it (from the outermost middleware to the last byte handed to the socket): the rest of a
call's latency is the client, the socket and uvicorn's parsing.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from agentos.bench.common import (
    check,
    dtype_name,
    median,
    new_console,
    print_checks,
    print_table,
    random_prompt,
    ratio,
    timed,
)

US = 1e6
OPS = ("fork", "snapshot", "rollback", "generate")
WIRES = ("json", "msgpack")  # over httpx
# stdlib: JSON over http.client; sdk: agentos.Client (JSON, its own transport)
TRANSPORTS = (*WIRES, "stdlib", "sdk")
MSGPACK = "application/msgpack"
TARGET_US = 1000  # fork and rollback p50 over HTTP
REQUEST_ID = "bench-{transport}-{op}-{i}"  # what a timed request is logged under
_LOGGED = re.compile(r"request_id=bench-(\w+)-(\w+)-(\d+) .*\bms=([0-9.]+)")


@dataclass(slots=True)
class ApiBench:
    model: str = "tiny"  # "tiny" or a HF model folder
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's default for the device
    repeats: int = 200  # timed repeats of each op, per wire format and in-process
    warmup: int = 10  # untimed repeats before the timed ones
    num_tokens: int = 2048  # session length
    append_tokens: int = 8  # appended (untimed) before each rollback, so it drops written KV
    block_size: int = 16
    port: int | None = None  # the server's loopback port; None: a free one
    seed: int = 0  # seeds the random prompt
    startup_timeout_s: float = 120.0  # for the server to answer /health

    def __post_init__(self):
        if self.num_tokens < 2 or self.append_tokens < 1:
            raise ValueError("the session needs >= 2 tokens and append_tokens >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1, warmup >= 0")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")


def run(bench: ApiBench) -> dict:
    """Runs the in-process peer, then the server and each transport; returns the
    JSON-ready results (see `render`). The server is stopped whatever happens.

    Raises ValueError when the session does not fit the model's context or the port is
    taken, RuntimeError when the server does not start or answers an op with an error.
    """
    from agentos import Engine

    port = bench.port or free_port()
    if not _is_free(port):  # else /health could be answered by whatever listens there
        raise ValueError(f"port {port} on 127.0.0.1 is in use")
    need = bench.num_tokens + bench.append_tokens + 1
    kv_blocks = 2 * (-(-need // bench.block_size)) + 64
    with Engine(model=bench.model, device=bench.device, dtype=bench.dtype,
                block_size=bench.block_size, kv_blocks=kv_blocks) as engine:
        kernel = engine.kernel
        if need > kernel.max_model_len:
            raise ValueError(f"a session of {bench.num_tokens} tokens (+{bench.append_tokens} "
                             f"appended) exceeds the context limit of {kernel.max_model_len}")
        prompt = random_prompt(bench.num_tokens, kernel.vocab_size,
                               kernel.model_config.bos_token_id, random.Random(bench.seed))
        dtype, threads = dtype_name(kernel.dtype), _torch_threads()
        times = _measure({"inprocess": _InProcess(engine)}, prompt, bench)
    server_log: list[str] = []  # its last lines, read once it has stopped
    with _server(bench, port, kv_blocks, server_log) as url:
        import httpx

        from agentos import Client

        stdlib = _Stdlib(url)
        with httpx.Client(base_url=url, timeout=60.0, trust_env=False) as client, \
                Client(url, timeout=60.0, max_retries=0) as sdk:
            try:
                times.update(_measure({**{wire: _Http(client, wire) for wire in WIRES},
                                       "stdlib": stdlib, "sdk": _Sdk(sdk)}, prompt, bench))
            finally:
                stdlib.conn.close()
    config = {**asdict(bench), "port": port, "kv_blocks": kv_blocks, "dtype": dtype,
              "threads": threads}
    return _summarize(config, times, _app_times(server_log, bench.warmup),
                      [line for line in server_log if " msg=request " not in line][-20:])


def _app_times(log_lines: list[str], warmup: int) -> dict[str, dict[str, list[float]]]:
    """The app's seconds for each timed request (after the warm-up) of each transport and
    op, read from the server's access log: {transport: {op: [seconds]}}."""
    times: dict[str, dict[str, list[float]]] = {t: {op: [] for op in OPS} for t in TRANSPORTS}
    for line in log_lines:
        m = _LOGGED.search(line)
        if m and m[1] in times and m[2] in OPS and int(m[3]) >= warmup:
            times[m[1]][m[2]].append(float(m[4]) / 1e3)
    return times


# -- the ops, in-process and over HTTP -------------------------------------------------


class _InProcess:
    """The ops on an Engine, by session and snapshot id."""

    def __init__(self, engine):
        self.engine = engine
        self.sessions: dict = {}
        self.snapshots: dict = {}

    def tag(self, op: str | None, i: int) -> None:
        pass  # no request ids in-process

    def attach(self, sid: str) -> None:
        """Takes up a session another transport created."""
        self.sessions.setdefault(sid, self.engine.session(sid))

    def create(self, tokens: list[int]) -> str:
        s = self.engine.create_session(tokens=tokens)
        self.sessions[s.id] = s
        return s.id

    def state(self, sid: str) -> str:
        return self.sessions[sid].info()["state"]

    def fork(self, sid: str) -> str:
        kid = self.sessions[sid].fork(n=1)[0]
        self.sessions[kid.id] = kid
        return kid.id

    def close(self, sid: str) -> None:
        self.sessions.pop(sid).close()

    def snapshot(self, sid: str) -> str:
        snap = self.sessions[sid].snapshot()
        self.snapshots[snap.id] = snap
        return snap.id

    def delete_snapshot(self, snap_id: str) -> None:
        self.snapshots.pop(snap_id).delete()

    def append(self, sid: str, tokens: list[int]) -> None:
        self.sessions[sid].append(tokens=tokens)

    def rollback(self, sid: str, snap_id: str) -> None:
        self.sessions[sid].rollback(snap_id)

    def generate(self, sid: str) -> None:
        self.sessions[sid].generate(max_tokens=1, temperature=0.0, ignore_eos=True)


class _Sdk(_InProcess):
    """The same ops through the SDK's Client (a Backend, as the Engine is)."""

    def tag(self, op: str | None, i: int) -> None:
        """As _Http.tag, through the headers the client sends with every call."""
        self.engine.headers.pop("X-Request-ID", None)
        if op is not None:
            self.engine.headers["X-Request-ID"] = REQUEST_ID.format(transport="sdk", op=op, i=i)


class _Http:
    """The same ops as REST calls over one keep-alive httpx.Client, in JSON or msgpack."""

    def __init__(self, client, wire: str):
        import msgpack

        self.client = client
        self.wire = wire
        self.msgpack = msgpack if wire == "msgpack" else None
        self.headers = {"Content-Type": MSGPACK, "Accept": MSGPACK} if self.msgpack else {}
        self.request_id: dict[str, str] = {}  # the X-Request-ID header of the op being timed

    def attach(self, sid: str) -> None:
        pass  # sessions by id

    def tag(self, op: str | None, i: int) -> None:
        """Sends the next requests under the request id of op's i-th repeat (none: None)."""
        self.request_id = {} if op is None else {
            "X-Request-ID": REQUEST_ID.format(transport=self.wire, op=op, i=i)}

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """Returns the decoded answer. Raises ValueError for a 400 (the caller's input,
        like an InvalidRequestError in-process), RuntimeError for any other error."""
        headers = {**self.headers, **self.request_id}
        if self.msgpack:
            content = None if body is None else self.msgpack.packb(body)
            r = self.client.request(method, path, content=content, headers=headers)
        else:
            r = self.client.request(method, path, json=body, headers=headers)
        _raise_for(method, path, r.status_code, r.content)
        return self.msgpack.unpackb(r.content) if self.msgpack else r.json()

    def create(self, tokens: list[int]) -> str:
        return self.call("POST", "/v1/sessions", {"tokens": tokens})["id"]

    def state(self, sid: str) -> str:
        return self.call("GET", f"/v1/sessions/{sid}")["state"]

    def fork(self, sid: str) -> str:
        return self.call("POST", f"/v1/sessions/{sid}/fork", {"n": 1})["data"][0]["id"]

    def close(self, sid: str) -> None:
        self.call("DELETE", f"/v1/sessions/{sid}")

    def snapshot(self, sid: str) -> str:
        return self.call("POST", f"/v1/sessions/{sid}/snapshots")["id"]

    def delete_snapshot(self, snap_id: str) -> None:
        self.call("DELETE", f"/v1/snapshots/{snap_id}")

    def append(self, sid: str, tokens: list[int]) -> None:
        self.call("POST", f"/v1/sessions/{sid}/append", {"tokens": tokens})

    def rollback(self, sid: str, snap_id: str) -> None:
        self.call("POST", f"/v1/sessions/{sid}/rollback", {"snapshot_id": snap_id})

    def generate(self, sid: str) -> None:
        self.call("POST", f"/v1/sessions/{sid}/generate",
                  {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True})


class _Stdlib(_Http):
    """The same REST calls in JSON over one keep-alive http.client connection."""

    def __init__(self, url: str):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60.0)
        self.wire = "stdlib"
        self.request_id = {}

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """As _Http.call."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        headers.update(self.request_id)
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        content = r.read()
        _raise_for(method, path, r.status, content)
        return json.loads(content) if content else {}


def _raise_for(method: str, path: str, status: int, content: bytes) -> None:
    """ValueError for a 400 (the caller's input, like an InvalidRequestError in-process),
    RuntimeError for any other error status; nothing for a success."""
    if status >= 400:
        error = ValueError if status == 400 else RuntimeError
        raise error(f"{method} {path}: HTTP {status} {content[:300]!r}")


def _measure(transports: dict, prompt: list[int], bench: ApiBench) -> dict:
    """Times each op warmup + repeats times on one session holding the prompt, the
    transports taking turns at each repeat (so a slow minute of a noisy machine falls on
    all of them alike); returns {transport: {op: timed seconds}}. Between ops the session
    is back at the prompt (rolled back to a snapshot of it, untimed), so every repeat does
    the same work."""
    first = next(iter(transports.values()))
    sid = first.create(prompt)
    _wait_idle(first, sid)  # the prompt prefilled
    base = first.snapshot(sid)
    for ops in transports.values():
        ops.attach(sid)
    extra = prompt[1:1 + bench.append_tokens]  # ordinary ids (prompt[0] is BOS)
    times = {name: {op: [] for op in OPS} for name in transports}
    for i in range(bench.warmup + bench.repeats):
        for name, ops in transports.items():
            taken = _repeat(ops, sid, base, extra, i)
            if i >= bench.warmup:
                for op, t in zip(OPS, taken):
                    times[name][op].append(t)
    first.close(sid)
    first.delete_snapshot(base)
    return times


def _repeat(ops, sid: str, base: str, extra: list[int], i: int) -> tuple[float, ...]:
    """One repeat of the ops through one transport: the seconds of each of OPS."""
    ops.tag("fork", i)
    kid, t_fork = timed(lambda: ops.fork(sid))
    ops.tag(None, i)
    ops.close(kid)
    ops.tag("snapshot", i)
    snap, t_snapshot = timed(lambda: ops.snapshot(sid))
    ops.tag(None, i)
    ops.delete_snapshot(snap)
    ops.append(sid, extra)
    # NOTE: rolled back mid-prefill, a rollback would wait for the running step
    _wait_idle(ops, sid)
    ops.tag("rollback", i)
    _, t_rollback = timed(lambda: ops.rollback(sid, base))
    ops.tag("generate", i)
    _, t_generate = timed(lambda: ops.generate(sid))
    ops.tag(None, i)
    ops.rollback(sid, base)
    return t_fork, t_snapshot, t_rollback, t_generate


def _wait_idle(ops, sid: str, timeout_s: float = 60.0) -> None:
    """Returns once the session sleeps (no prefill left); RuntimeError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while ops.state(sid) != "sleeping":
        if time.monotonic() > deadline:
            raise RuntimeError(f"session {sid} still busy after {timeout_s:.0f} s")
        time.sleep(0.0005)


# -- the server ------------------------------------------------------------------------


@contextmanager
def _server(bench: ApiBench, port: int, kv_blocks: int, log_lines: list[str]):
    """The server with its default logging (an access-log line per request); its whole
    output goes to log_lines once it has stopped."""
    args = ["--model", bench.model, "--device", bench.device, "--block-size", str(bench.block_size),
            "--kv-blocks", str(kv_blocks)]
    if bench.dtype is not None:
        args += ["--dtype", bench.dtype]
    with run_server(args, port, log_lines, bench.startup_timeout_s, keep=None) as url:
        yield url


@contextmanager
def run_server(args: Sequence[str], port: int | None = None, log_lines: list[str] | None = None,
               startup_timeout_s: float = 60.0, keep: int | None = 20):
    """Runs `agentos serve --host 127.0.0.1 --port PORT *args` (a free port by default)
    until the block exits (terminated, killed if it lingers), then puts the last `keep`
    lines of its output (None: all) in log_lines; yields its URL. Raises RuntimeError when
    it exits or stays silent before answering /health."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with run_agentos(["serve", "--host", "127.0.0.1", "--port", str(port), *args], url,
                     log_lines, startup_timeout_s, keep):
        yield url


@contextmanager
def run_agentos(args: Sequence[str], url: str, log_lines: list[str] | None = None,
                startup_timeout_s: float = 60.0, keep: int | None = 20):
    """Runs `agentos *args` (a server listening at `url`) until the block exits
    (terminated, killed if it lingers, nothing done if it already exited), then puts the
    last `keep` lines of its output (None: all) in log_lines; yields its subprocess.Popen
    (to kill it, say). Raises RuntimeError when it exits or stays silent before answering {url}/health."""
    cmd = [sys.executable, "-m", "agentos.cli", *args]
    # an open loopback server: keys from the environment would turn every call into a 401
    env = {k: v for k, v in os.environ.items() if k != "AGENTOS_API_KEYS"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        try:
            _wait_healthy(proc, url, log, startup_timeout_s)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if log_lines is not None:
                log_lines.extend(_tail(log, keep))


def _wait_healthy(proc: subprocess.Popen, url: str, log, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = "\n".join(_tail(log))
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{lines}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer {url}/health within {timeout_s:.0f} s")


def _tail(log, num_lines: int | None = 20) -> list[str]:
    log.flush()
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    return lines if num_lines is None else lines[-num_lines:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- results ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _stats(seconds: Sequence[float]) -> dict:
    return {"p50_us": median(seconds) * US, "p99_us": percentile(seconds, 99) * US,
            "mean_us": statistics.fmean(seconds) * US if seconds else float("nan")}


def _summarize(config: dict, times: dict, app: dict, server_log: list[str]) -> dict:
    rows = []
    for op in OPS:
        row = {"op": op, **{t: _stats(times[t][op]) for t in ("inprocess", *TRANSPORTS)}}
        for t in TRANSPORTS:
            row[f"{t}_ratio"] = ratio(row[t]["p50_us"], row["inprocess"]["p50_us"])
            row[t]["app_p50_us"] = median(app[t][op]) * US if app[t][op] else float("nan")
        rows.append(row)
    by_op = {r["op"]: r for r in rows}
    checks = []
    for op in ("fork", "rollback"):
        p50 = {t: by_op[op][t]["p50_us"] for t in TRANSPORTS}
        detail = ", ".join(f"{_NAMES[t]} {us:.0f} us" for t, us in p50.items())
        checks.append(check(f"{op} p50 over HTTP <= {TARGET_US / 1000:g} ms (SDK Client)",
                            p50["sdk"] <= TARGET_US, detail))
        checks.append(check(f"{op} p50 over HTTP <= {TARGET_US / 1000:g} ms (plain httpx)",
                            max(p50[w] for w in WIRES) <= TARGET_US, detail))
        checks.append(check(f"{op} p50 over HTTP <= {TARGET_US / 1000:g} ms (http.client)",
                            p50["stdlib"] <= TARGET_US, detail))
    return {"bench": "api", "config": config, "ops": rows, "server_log": server_log,
            "checks": checks, "passed": all(c["passed"] for c in checks)}


_NAMES = {"json": "HTTP json", "msgpack": "HTTP msgpack", "stdlib": "HTTP json, http.client",
          "sdk": "SDK Client (json)", "inprocess": "in-process"}


def render(result: dict, console=None) -> None:
    """Prints the workload, a latency table (one row per op and transport) and one
    PASS/FAIL line per target."""
    console = console or new_console()
    cfg = result["config"]
    console.print(f"workload: one session of {cfg['num_tokens']} tokens; model {cfg['model']}, "
                  f"{cfg['device']}, {cfg['dtype']}, block size {cfg['block_size']}, "
                  f"{cfg['kv_blocks']} KV blocks; {cfg['repeats']} timed repeats after "
                  f"{cfg['warmup']} warm-up; fork n=1 (child deleted, untimed), snapshot "
                  f"(deleted, untimed), rollback after appending {cfg['append_tokens']} "
                  "tokens (untimed), generate max_tokens=1 greedy ignore_eos; server "
                  f"`agentos serve` on 127.0.0.1:{cfg['port']}, taking turns: one "
                  "keep-alive httpx client, one keep-alive http.client connection, "
                  "agentos.Client; "
                  "in-process peer: "
                  f"Engine, {cfg['threads']} torch threads")
    rows = []
    for r in result["ops"]:
        for t in (*TRANSPORTS, "inprocess"):
            name, s = _NAMES[t], r[t]
            rows.append([r["op"] if t == "json" else "", name, s["p50_us"], s["p99_us"],
                         s["mean_us"], r.get(f"{t}_ratio"), s.get("app_p50_us")])
    print_table("latency from the caller; x = p50 / in-process p50; app: the server app's own "
                "p50 (its access log)",
                ["op", "transport", "p50 us", "p99 us", "mean us", "x", "app p50 us"], rows,
                console)
    if result["server_log"]:
        console.print("server log (last lines):")
        for line in result["server_log"]:
            console.print(f"  {line}", markup=False, highlight=False)
    print_checks(result["checks"], console)
