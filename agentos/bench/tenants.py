"""`agentos bench tenants`: does one tenant's abuse reach another tenant?

`agentos serve` runs in a subprocess with two API keys. The well-behaved tenant runs a
fixed agent workload (a few sessions, each a chain of turns: append a tool result, then
a greedy generate) twice per round: alone, and while the other tenant, from a separate
process, sends the worst requests it can at full speed: huge stop lists, oversized and
crafted imports, huge texts to tokenize, lone surrogates, generates it walks away from,
bodies shorter than their Content-Length, hundreds of connections that never finish
their headers, other tenants' ids and engine-control calls.

The peer is the same workload alone on the same server in the same run: the report is
the well-behaved tenant's p50 and p99 turn latency under attack over alone (target at
most 1.5x), whether its outputs were identical, and what each attack got (every one
should be a 4xx or a cut-short answer, never a 5xx).

The attacker's client runs on the server's machine, which a real attacker's does not: a
third phase, the control, runs the workload beside a process that burns as much CPU as
the attacker's client just did and sends nothing. Control over alone is what sharing
the machine with the load generator costs; under attack over control is what the
server's defences let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agentos.bench.api import free_port, run_agentos
from agentos.bench.common import check, new_console, print_checks, print_table, ratio

TARGET = 1.5  # under attack over alone, p50 and p99 turn latency
GOOD_KEY, EVIL_KEY = "sk-bench-good", "sk-bench-evil"


@dataclass(slots=True)
class TenantsBench:
    model: str = "tiny"
    device: str = "cpu"
    dtype: str | None = None
    agents: int = 4  # the well-behaved tenant's sessions, run concurrently
    turns: int = 6  # turns per session
    prompt_len: int = 64
    append_len: int = 16  # tokens of each tool result
    max_tokens: int = 16  # tokens generated per turn
    rounds: int = 2  # alone / under attack, alternated
    attackers: int = 4  # concurrent attack loops of the other tenant
    only: str | None = None  # run only the attacks whose names contain this
    idle_connections: int = 200  # connections that never finish their headers
    kv_blocks: int = 512
    # each tenant's rate at the door (the server's per-tenant defaults, the same for both;
    # the well-behaved tenant sends about 25 requests a second); None: no limit
    requests_per_s: float | None = 50.0
    body_bytes_per_s: float | None = float(1 << 20)
    seed: int = 0
    startup_timeout_s: float = 120.0

    def __post_init__(self):
        if min(self.agents, self.turns, self.prompt_len, self.append_len, self.max_tokens,
               self.rounds) < 1:
            raise ValueError("agents, turns, prompt_len, append_len, max_tokens and rounds "
                             "must be >= 1")
        if self.attackers < 0 or self.idle_connections < 0:
            raise ValueError("attackers and idle_connections must be >= 0")


def run(bench: TenantsBench) -> dict:
    """Runs the rounds; returns JSON-ready results (see `render`)."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({
            "keys": {GOOD_KEY: "good", EVIL_KEY: "evil"},
            "tenants": {"evil": {"max_sessions": 16, "max_tokens": 16384}}}))
        args = ["--model", bench.model, "--device", bench.device, "--kv-blocks",
                str(bench.kv_blocks), "--api-keys", str(keys), "--deterministic",
                "--log-level", "error"]
        if bench.dtype is not None:
            args += ["--dtype", bench.dtype]
        if bench.requests_per_s is not None:
            args += ["--requests-per-s-per-tenant", str(bench.requests_per_s)]
        if bench.body_bytes_per_s is not None:
            args += ["--body-bytes-per-s-per-tenant", str(bench.body_bytes_per_s)]
        log: list[str] = []
        phases: dict[str, list] = {"alone": [], "attacked": [], "control": []}
        attacks: dict[str, dict] = {}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with run_agentos(["serve", "--host", "127.0.0.1", "--port", str(port), *args], url,
                         log, bench.startup_timeout_s) as proc:
            server = _cpu_clock(proc.pid)
            asyncio.run(_agents(url, bench))  # warm-up: first steps, code paths
            for _ in range(bench.rounds):
                phases["alone"].append(_timed({"server": server},
                                              lambda: asyncio.run(_agents(url, bench))))
                phases["attacked"].append(_under_attack(url, bench, attacks, server))
                burned = phases["attacked"][-1]["cpu"]
                phases["control"].append(_beside_burner(
                    url, bench, server, burned["attacker_s"] / burned["wall_s"]))
    return _summarize(bench, phases, attacks, log)


def _cpu_clock(pid: int):
    """The CPU seconds (user + system, all threads) a process has used so far."""
    import psutil

    process = psutil.Process(pid)

    def seconds() -> float:
        t = process.cpu_times()
        return t.user + t.system
    return seconds


def _timed(clocks: dict, phase) -> dict:
    """Runs one phase; adds its wall time and the CPU seconds each process in `clocks`
    ({name: CPU clock}) and this one (the well-behaved tenant's client) spent in it."""
    clocks = {"client": time.process_time, **clocks}
    wall, start = time.perf_counter(), {name: clock() for name, clock in clocks.items()}
    out = phase()
    out["cpu"] = {"wall_s": time.perf_counter() - wall,
                  **{f"{name}_s": clock() - start[name] for name, clock in clocks.items()}}
    return out


# -- the well-behaved tenant -----------------------------------------------------------


async def _agents(url: str, bench: TenantsBench) -> dict:
    """The workload: {"latencies": [s per turn], "outputs": [[tokens per turn] per agent]}."""
    import httpx

    headers = {"Authorization": f"Bearer {GOOD_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300.0,
                                 trust_env=False) as client:
        runs = await asyncio.gather(*(_agent(client, bench, i) for i in range(bench.agents)))
    return {"latencies": [x for lat, _ in runs for x in lat], "outputs": [out for _, out in runs]}


async def _agent(client, bench: TenantsBench, i: int) -> tuple[list[float], list[list[int]]]:
    rng = random.Random(bench.seed * 1000 + i)
    prompt = [rng.randrange(1, 256) for _ in range(bench.prompt_len)]
    r = await client.post("/v1/sessions", json={"tokens": prompt})
    r.raise_for_status()
    sid = r.json()["id"]
    latencies, outputs = [], []
    try:
        for _ in range(bench.turns):
            result = [rng.randrange(1, 256) for _ in range(bench.append_len)]
            t0 = time.perf_counter()
            (await client.post(f"/v1/sessions/{sid}/append", json={"tokens": result})).raise_for_status()
            r = await client.post(f"/v1/sessions/{sid}/generate", json={
                "max_tokens": bench.max_tokens, "temperature": 0.0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            outputs.append(r.json()["tokens"])
    finally:
        await client.delete(f"/v1/sessions/{sid}")
    return latencies, outputs


def _under_attack(url: str, bench: TenantsBench, attacks: dict[str, dict], server_cpu) -> dict:
    """The workload while a separate process attacks; the attack counts are added up."""
    ctx = multiprocessing.get_context("spawn")
    stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
    names = [n for n in _ATTACKS if bench.only is None or bench.only in n]
    idle = bench.idle_connections if bench.only is None or bench.only in IDLE else 0
    proc = ctx.Process(target=_attack_process, args=(url, names, bench.attackers, idle, stop,
                                                     ready, results),
                       daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the attacking process did not start")
        time.sleep(1.0)  # the attack is under way before the first turn
        out = _timed({"server": server_cpu, "attacker": _cpu_clock(proc.pid)},
                     lambda: asyncio.run(_agents(url, bench)))
    finally:
        stop.set()
        counts = results.get(timeout=120)
        proc.join(timeout=30)
    for name, c in counts.items():
        total = attacks.setdefault(name, {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0,
                                          "failed": 0, "statuses": {}, "seconds": []})
        for k in ("requests", "2xx", "4xx", "5xx", "failed"):
            total[k] += c[k]
        for s, n in c["statuses"].items():
            total["statuses"][s] = total["statuses"].get(s, 0) + n
        total["seconds"] += c["seconds"]
    return out


def _beside_burner(url: str, bench: TenantsBench, server_cpu, cores: float) -> dict:
    """The workload beside a process that keeps `cores` of a core busy (at most one)."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_burn, args=(min(1.0, cores), stop), daemon=True)
    proc.start()
    try:
        time.sleep(1.0)  # started, and burning, before the first turn
        return _timed({"server": server_cpu, "attacker": _cpu_clock(proc.pid)},
                      lambda: asyncio.run(_agents(url, bench)))
    finally:
        stop.set()
        proc.join(timeout=30)


def _burn(duty: float, stop) -> None:
    """Keeps its CPU time at `duty` of the wall time until stopped: spins while behind,
    sleeps while ahead (a millisecond at a time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    while not stop.is_set():
        if time.process_time() - cpu < duty * (time.perf_counter() - wall):
            t = time.perf_counter()
            while time.perf_counter() - t < 0.001:
                pass
        else:
            time.sleep(0.001)


# -- the attacker (a separate process) -------------------------------------------------


def _attack_process(url, names, attackers, idle_connections, stop, ready, results) -> None:
    counts: dict[str, dict] = {}
    try:
        asyncio.run(_attack(url, names, attackers, idle_connections, stop, ready, counts))
    finally:
        results.put(counts)


async def _attack(url, names, attackers, idle_connections, stop, ready, counts) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {EVIL_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0,
                                 trust_env=False) as client:
        record = await _own_record(client)
        _bodies()
        ready.set()
        held = asyncio.create_task(_idle_connections(url, idle_connections, stop, counts))

        async def loop(k: int) -> None:
            i = k
            while not stop.is_set():
                name = names[i % len(names)]
                i += 1
                t0 = time.perf_counter()
                try:
                    status = await _ATTACKS[name](client, url, record)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError):
                    status = None
                _count(counts, name, status, time.perf_counter() - t0)

        await asyncio.gather(*(loop(k) for k in range(attackers if names else 0)))
        await held


HARM = "executed"  # an outcome that must never happen (counted with the 5xx)


def _count(counts: dict, name: str, status: int | str | None, seconds: float) -> None:
    """Adds one outcome: an HTTP status, a word for what happened, or None (no answer)."""
    c = counts.setdefault(name, {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0, "failed": 0,
                                 "statuses": {}, "seconds": []})
    c["requests"] += 1
    c["seconds"].append(seconds)
    if status is None:
        c["failed"] += 1
        return
    c["statuses"][str(status)] = c["statuses"].get(str(status), 0) + 1
    if isinstance(status, int) and status // 100 in (2, 4, 5):
        c[f"{status // 100}xx"] += 1
    elif status == HARM:
        c["5xx"] += 1


async def _own_record(client) -> bytes:
    """An export of one of the attacker's own sessions, to craft imports from. The last
    round's sessions are closed first (an attack's own clean-up may have been refused at
    the door), and each call waits out its 429s (the rates may still be spent)."""
    listed = await _patiently(client, "GET", "/v1/sessions")
    for info in listed.json().get("data", []):
        await _patiently(client, "DELETE", f"/v1/sessions/{info['id']}")
    r = await _patiently(client, "POST", "/v1/sessions", json={"tokens": list(range(1, 49))})
    sid = r.json()["id"]
    await _patiently(client, "POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 1})
    r = await _patiently(client, "GET", f"/v1/sessions/{sid}/export", params={"kv": "true"})
    await _patiently(client, "DELETE", f"/v1/sessions/{sid}")
    return r.content


async def _patiently(client, method: str, path: str, **kw):
    """The call, repeated after each 429's Retry-After (for up to a minute); raises on
    any other error."""
    deadline = time.monotonic() + 60.0
    while True:
        r = await client.request(method, path, **kw)
        if r.status_code != 429 or time.monotonic() > deadline:
            r.raise_for_status()
            return r
        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))


async def _stop_list(client, url, record) -> int:
    r = await client.post("/v1/sessions", json={"tokens": list(range(1, 33))})
    if r.status_code != 201:
        return r.status_code
    sid = r.json()["id"]
    try:
        r = await client.post(f"/v1/sessions/{sid}/generate", content=_bodies()["stops"],
                              headers={"Content-Type": "application/json"})
        return r.status_code
    finally:
        await client.delete(f"/v1/sessions/{sid}")


def _crafted(record: bytes, change) -> bytes:
    from agentos.snapshot.codec import pack, unpack

    body = unpack(record, "record")
    change(body)
    return pack("record", body)


async def _import(client, body: bytes) -> int:
    r = await client.post("/v1/sessions/import", content=body,
                          headers={"Content-Type": "application/msgpack"})
    if r.status_code == 201:
        await client.delete(f"/v1/sessions/{r.json()['id']}")
    return r.status_code


async def _import_draws(client, url, record) -> int:
    return await _import(client, _crafted(record, lambda b: b["rng"].update(draws=2 ** 40)))


async def _import_garbage_kv(client, url, record) -> int:
    def poison(b):
        if b.get("kv"):
            for k, v in b["kv"].items():
                if isinstance(v, bytes):
                    b["kv"][k] = bytes(len(v))
        b["mask"] = bytes([200]) * len(b["mask"])
    return await _import(client, _crafted(record, poison))


@functools.cache
def _bodies() -> dict[str, bytes]:
    """The large bodies, made once: the attacker's client spends its CPU on sending them,
    not on building them again for each request."""
    return {"stops": json.dumps({"max_tokens": 8,
                                 "stop": [f"never-{i}" for i in range(100_000)]}).encode(),
            "text": json.dumps({"text": "x" * (12 << 20)}).encode(),
            "zeros": bytes(24 << 20)}


async def _import_huge(client, url, record) -> int:
    return await _import(client, record + _bodies()["zeros"])


async def _tokenize_huge(client, url, record) -> int:
    r = await client.post("/v1/tokenize", content=_bodies()["text"],
                          headers={"Content-Type": "application/json"})
    return r.status_code


async def _surrogate(client, url, record) -> int:
    r = await client.post("/v1/sessions", content=b'{"prompt": "\\ud800"}',
                          headers={"Content-Type": "application/json"})
    if r.status_code == 201:
        await client.delete(f"/v1/sessions/{r.json()['id']}")
    return r.status_code


async def _walk_away(client, url, record) -> int:
    """A long non-streamed generate whose client leaves after 0.2 s (the server should stop
    it); the status is that of closing its session afterwards."""
    import httpx

    r = await client.post("/v1/sessions", json={"tokens": list(range(1, 33))})
    if r.status_code != 201:
        return r.status_code
    sid = r.json()["id"]
    with contextlib.suppress(httpx.TimeoutException):
        await client.post(f"/v1/sessions/{sid}/generate", timeout=0.2, json={
            "max_tokens": 1024, "ignore_eos": True})
    return (await client.delete(f"/v1/sessions/{sid}")).status_code


SHORT_BODY_TOKENS = [9] * 37  # a prompt no other attack sends


async def _short_body(client, url, record) -> str:
    """A create whose body stops short of its Content-Length, then the connection closes:
    "executed" if a session was made from half a body, else "refused"."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"tokens": SHORT_BODY_TOKENS}).encode()
    writer.write(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + EVIL_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body) + 64}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.2)
    executed = False
    for info in (await client.get("/v1/sessions")).json().get("data", []):
        if info.get("num_tokens") != len(SHORT_BODY_TOKENS):
            continue
        tokens = (await client.get(f"/v1/sessions/{info['id']}/tokens")).json()
        if tokens.get("tokens") == SHORT_BODY_TOKENS:
            executed = True
            await client.delete(f"/v1/sessions/{info['id']}")
    return HARM if executed else "refused"


async def _other_tenant(client, url, record) -> int:
    r = await client.get("/v1/sessions/sess_0000000000000000")
    return r.status_code


async def _weights(client, url, record) -> int:
    r = await client.post("/v1/weights", content=b"not weights",
                          headers={"Content-Type": "application/octet-stream"})
    return r.status_code


_ATTACKS = {
    "stop list of 100,000": _stop_list,
    "import, draws 2^40": _import_draws,
    "import, garbage KV and mask": _import_garbage_kv,
    "import of 24 MiB": _import_huge,
    "tokenize 12 MiB": _tokenize_huge,
    "lone surrogate": _surrogate,
    "generate walked away from": _walk_away,
    "body short of Content-Length": _short_body,
    "another tenant's id": _other_tenant,
    "weights without admin": _weights,
}


IDLE = "connections never finishing their headers"


async def _idle_connections(url: str, n: int, stop, counts: dict) -> None:
    """Holds n connections that send half a request and never finish it; at the end each is
    counted as "closed by the server" or "still open"."""
    if n == 0:
        return
    host, port = url.removeprefix("http://").split(":")
    name = IDLE
    held = []
    for _ in range(n):
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            held.append((reader, writer))
        except OSError:
            _count(counts, name, "refused", 0.0)
    while not stop.is_set():
        await asyncio.sleep(0.2)
    for reader, writer in held:
        _count(counts, name, "closed by the server" if reader.at_eof() else "still open", 0.0)
        writer.close()


# -- results ---------------------------------------------------------------------------


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _summarize(bench: TenantsBench, phases: dict, attacks: dict, log: list[str]) -> dict:
    stats = {}
    for name, runs in phases.items():
        lat = [x for r in runs for x in r["latencies"]]
        wall = sum(r["cpu"]["wall_s"] for r in runs)
        stats[name] = {"turns": len(lat), "p50_s": _percentile(lat, 0.5),
                       "p99_s": _percentile(lat, 0.99), "mean_s": statistics.fmean(lat),
                       "wall_s": wall,
                       # cores busy on average: where the machine's CPU went in this phase
                       "server_cores": sum(r["cpu"]["server_s"] for r in runs) / wall,
                       "client_cores": sum(r["cpu"]["client_s"] for r in runs) / wall,
                       "attacker_cores": sum(r["cpu"].get("attacker_s", 0.0) for r in runs) / wall}
    alone, attacked, control = stats["alone"], stats["attacked"], stats["control"]
    p50, p99 = ratio(attacked["p50_s"], alone["p50_s"]), ratio(attacked["p99_s"], alone["p99_s"])
    # over alone: what the load generator's CPU costs; attacked over it: what the server lets in
    shares = {q: {"control_over_alone": ratio(control[f"{q}_s"], alone[f"{q}_s"]),
                  "attacked_over_control": ratio(attacked[f"{q}_s"], control[f"{q}_s"])}
              for q in ("p50", "p99")}
    reference = phases["alone"][0]["outputs"]
    identical = all(r["outputs"] == reference for rs in phases.values() for r in rs)
    server_errors = sum(a["5xx"] for a in attacks.values())
    for a in attacks.values():
        a["median_s"] = statistics.median(a.pop("seconds")) if a.get("seconds") else float("nan")
    checks = [
        check(f"p50 turn latency under attack <= {TARGET}x alone", p50 <= TARGET, f"{p50:.2f}x"),
        check(f"p99 turn latency under attack <= {TARGET}x alone", p99 <= TARGET, f"{p99:.2f}x"),
        check("the well-behaved tenant's outputs identical", identical,
              "identical" if identical else "differ"),
        check("no attack got a 5xx", server_errors == 0, f"{server_errors} answers 5xx"),
    ]
    return {"bench": "tenants", "config": asdict(bench), "phases": stats,
            "p50_ratio": p50, "p99_ratio": p99, "shares": shares, "identical": identical,
            "attacks": attacks,
            "checks": checks, "passed": all(c["passed"] for c in checks),
            "server_log": log[-20:]}


def render(result: dict) -> None:
    console = new_console()
    rows = [(name, s["turns"], s["p50_s"], s["p99_s"], s["mean_s"], s["server_cores"],
             s["client_cores"], s["attacker_cores"]) for name, s in result["phases"].items()]
    print_table("The well-behaved tenant's turns (s), and the cores each process kept busy "
                "(attacker: the attacking client, or the control's CPU burner)",
                ("phase", "turns", "p50", "p99", "mean", "server", "client", "attacker"),
                rows, console)
    shares = result["shares"]
    print_table("Where the slowdown comes from", ("ratio", "p50", "p99"), [
        ("under attack / alone (target <= 1.5x)", result["p50_ratio"], result["p99_ratio"]),
        ("control / alone: the load generator's CPU on the server's cores",
         shares["p50"]["control_over_alone"], shares["p99"]["control_over_alone"]),
        ("under attack / control: what the server's defences let through",
         shares["p50"]["attacked_over_control"], shares["p99"]["attacked_over_control"])],
        console)
    rows = [(name, a["requests"], a["2xx"], a["4xx"], a["5xx"], a["failed"],
             ", ".join(f"{s}: {n}" for s, n in sorted(a["statuses"].items())), a["median_s"])
            for name, a in result["attacks"].items()]
    print_table("What each attack got", ("attack", "requests", "2xx", "4xx", "5xx", "no answer",
                                         "statuses", "median s"), rows, console)
    print_checks(result["checks"], console)
