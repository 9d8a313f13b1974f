"""The workers of a deployment, in Redis: registration, heartbeats (leases), the cluster
secret and the re-home lock. `agentos serve --worker` registers and heartbeats through
`Heartbeat`; `agentos gateway` reads the registry to route and re-homes the records of a
worker whose lease lapsed.

Keys (ns = agentos:{deployment}):

    {ns}:workers              hash: worker id -> msgpack {"url", "registered_at", "token"}
                              (token: random per process, so a restarted worker with the
                              same id is a new registration)
    {ns}:alive:{worker id}    msgpack {"sessions", "tokens", "ts"}: the worker's load, set
                              every heartbeat with PX = 3 intervals (its lease)
    {ns}:secret               the cluster secret (hex), SET NX by whoever needs it first;
                              internal calls carry it as header X-AgentOS-Cluster
    {ns}:lock:rehome:{id}     a random token while a gateway re-homes that worker (SET NX PX)
    {ns}:dir                  hash: record id -> msgpack [worker id, owner, kind "s" | "p"]
                              (written by the workers' journals; read here)

A worker is live when it is registered and its alive key exists; registered without an
alive key it is dead (crashed, or stopped: `Heartbeat.stop` deletes the key so its records
move at once). Re-homing ends by removing the registration; a worker that finds its own
registration gone (or replaced) is fenced: it must serve nothing more.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from agentos.snapshot.durable.store import good_entries

log = logging.getLogger("agentos.cluster")

SECRET_HEADER = "X-AgentOS-Cluster"

# SET the alive key only while this very registration stands, in one step, so a worker
# that a gateway re-homed can never look alive again
_BEAT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"""
# HDEL a registration only if it is still the one judged dead (not a restarted worker's)
_REMOVE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(slots=True)
class WorkerInfo:
    id: str
    url: str
    registration: bytes  # the raw hash value: compared when removing it
    registered_at: float
    alive: bool
    sessions: int = 0  # from its last heartbeat (0 when dead)
    tokens: int = 0
    ts: float = 0.0  # when that heartbeat was sent (its clock)


class WorkerRegistry:
    """The registry of one deployment over a redis.Redis client (`ns` = agentos:{deployment}).
    Every method is one or two round trips and raises redis' errors as they come."""

    def __init__(self, client, ns: str):
        self.client = client
        self.ns = ns
        self.workers_key = f"{ns}:workers"
        self.dir_key = f"{ns}:dir"
        self._beat = client.register_script(_BEAT)
        self._remove = client.register_script(_REMOVE)
        self._unlock = client.register_script(_UNLOCK)

    def alive_key(self, worker_id: str) -> str:
        return f"{self.ns}:alive:{worker_id}"

    def lock_key(self, worker_id: str) -> str:
        return f"{self.ns}:lock:rehome:{worker_id}"

    def register(self, worker_id: str, url: str) -> bytes:
        """Registers (or re-registers, replacing an older process's entry) the worker;
        returns the registration, which `heartbeat` and `remove` compare against."""
        reg = msgpack.packb({"url": url, "registered_at": time.time(),
                             "token": secrets.token_hex(8)})
        self.client.hset(self.workers_key, worker_id, reg)
        return reg

    def heartbeat(self, worker_id: str, registration: bytes, load: dict, ttl_ms: int) -> bool:
        """Renews the worker's lease for ttl_ms with its load ({"sessions", "tokens"}).
        Returns False, changing nothing, when `registration` is no longer the worker's
        entry (re-homed or replaced): the worker is fenced."""
        value = msgpack.packb({"sessions": int(load.get("sessions", 0)),
                               "tokens": int(load.get("tokens", 0)), "ts": time.time()})
        return bool(self._beat(keys=[self.workers_key, self.alive_key(worker_id)],
                               args=[worker_id, registration, value, int(ttl_ms)]))

    def leave(self, worker_id: str) -> None:
        """Ends the worker's lease now (a clean stop): gateways re-home its records at once."""
        self.client.delete(self.alive_key(worker_id))

    def workers(self) -> dict[str, WorkerInfo]:
        """Every registered worker, live or dead, with its last load."""
        regs = self.client.hgetall(self.workers_key)
        ids = [k.decode() for k in regs]
        beats = self.client.mget([self.alive_key(w) for w in ids]) if ids else []
        out = {}
        for (raw_id, reg), beat in zip(regs.items(), beats):
            wid = raw_id.decode()
            r = msgpack.unpackb(reg)
            info = WorkerInfo(wid, r["url"], reg, r.get("registered_at", 0.0), beat is not None)
            if beat is not None:
                b = msgpack.unpackb(beat)
                info.sessions, info.tokens, info.ts = b["sessions"], b["tokens"], b["ts"]
            out[wid] = info
        return out

    def remove(self, worker_id: str, registration: bytes) -> bool:
        """Removes the worker's registration if it is still `registration` (fencing that
        process); returns whether it did."""
        return bool(self._remove(keys=[self.workers_key], args=[worker_id, registration]))

    def records(self, worker_id: str) -> dict[str, tuple[str, str, str]]:
        """The directory's records on that worker: id -> (owner, kind "s" | "p", family);
        bad entries are logged and left out."""
        entries = good_entries(self.dir_key, self.client.hgetall(self.dir_key).items())
        return {rid: (owner, kind, family) for rid, (wid, owner, kind, family) in entries.items()
                if wid == worker_id}

    def secret(self) -> str:
        """The cluster secret, created on first use."""
        self.client.set(f"{self.ns}:secret", secrets.token_hex(32), nx=True)
        return self.client.get(f"{self.ns}:secret").decode()

    def lock(self, worker_id: str, ttl_ms: int) -> str | None:
        """Takes the re-home lock of a worker for ttl_ms; returns its token, or None when
        someone else holds it."""
        token = secrets.token_hex(16)
        ok = self.client.set(self.lock_key(worker_id), token, nx=True, px=int(ttl_ms))
        return token if ok else None

    def unlock(self, worker_id: str, token: str) -> None:
        """Releases the lock if `token` still holds it (not after it expired and was retaken)."""
        self._unlock(keys=[self.lock_key(worker_id)], args=[token])

    def locked(self, worker_id: str) -> bool:
        return bool(self.client.exists(self.lock_key(worker_id)))


def plan_rehome(records: dict[str, tuple[str, str, str]], loads: dict[str, int]) -> dict[str, list[str]]:
    """Assigns a dead worker's records ({id: (owner, kind, family)}) to live workers ({id:
    live sessions}): returns {worker id: [record ids]}, empty when there are no records.

    Records move by family (a session with its forks, snapshots and restores), so pages
    they share by prefix land together; a rollback onto another worker's snapshot still
    works (the worker reads it from the store). Families go largest first to the worker
    with the fewest sessions, counting what was given. Raises ValueError when there are
    records and no live worker."""
    if not records:
        return {}
    if not loads:
        raise ValueError("no live worker to take the records")
    groups: dict[str, list[str]] = {}
    for rid, (owner, _kind, family) in sorted(records.items()):
        groups.setdefault(f"{owner}\0{family}", []).append(rid)
    load = dict(loads)
    plan: dict[str, list[str]] = {}
    for group in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        ids = groups[group]
        target = min(load, key=lambda w: (load[w], w))
        plan.setdefault(target, []).extend(ids)
        load[target] += sum(records[i][1] == "s" for i in ids)
    return plan


class Heartbeat:
    """A worker's registration and lease, kept by a daemon thread.

    `start` registers and starts beating every `interval_s` (lease = 3 intervals) with the
    load from `load()` ({"sessions", "tokens"}; on error the last one is sent again).
    `fenced` turns True for good once the registration is found removed or replaced (a
    gateway re-homed this worker's records): the worker must refuse requests from then
    on. Redis errors are logged and retried; they never stop the thread.
    """

    def __init__(self, registry: WorkerRegistry, worker_id: str, url: str,
                 load: Callable[[], dict], interval_s: float = 1.0,
                 on_register: Callable[[bytes], None] | None = None):
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {interval_s}")
        self.registry = registry
        self.worker_id = worker_id
        self.url = url
        self.load = load
        self.interval_s = interval_s
        self.ttl_ms = max(1, int(3 * interval_s * 1000))
        self.registration: bytes | None = None
        self.on_register = on_register  # told each new registration (the journal's guard)
        self.fenced = False
        self.beats = 0  # leases renewed
        self._last_load = {"sessions": 0, "tokens": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{worker_id}", daemon=True)

    def start(self) -> Heartbeat:
        """Registers and renews the lease once with the last load (no call to `load`, so it
        may run on the loop `load` waits on), then starts the thread. The worker is live
        when this returns, unless Redis is down: then the thread keeps trying."""
        self._renew(self._last_load)
        self._thread.start()
        return self

    def stop(self, leave: bool = True) -> None:
        """Stops beating and, with `leave`, ends the lease (so gateways re-home this worker's
        records now); without it the lease lapses in its time, as after a crash."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        if self.fenced or not leave:
            return
        try:
            self.registry.leave(self.worker_id)
        except Exception as e:  # whatever redis raises: the lease lapses anyway
            log.warning("heartbeat: could not end the lease of %s: %s", self.worker_id, e)

    def beat(self) -> bool:
        """One heartbeat: registers first if needed, then renews the lease. Returns whether
        the lease was renewed; False when Redis failed (logged) or the worker is fenced."""
        if self.fenced:
            return False
        try:
            self._last_load = self.load()
        except Exception as e:  # a busy or closing engine: beat with the last load
            log.debug("heartbeat: load unavailable (%s); sending the last one", e)
        return self._renew(self._last_load)

    def _renew(self, load: dict) -> bool:
        try:
            if self.registration is None:
                self.registration = self.registry.register(self.worker_id, self.url)
                if self.on_register is not None:
                    self.on_register(self.registration)
            ok = self.registry.heartbeat(self.worker_id, self.registration, load, self.ttl_ms)
        except Exception as e:  # redis down, timeouts: try again next interval
            log.warning("heartbeat of %s failed: %s", self.worker_id, e)
            return False
        if not ok:
            self.fenced = True
            log.error("worker %s was re-homed by a gateway (its registration is gone): fenced, "
                      "refusing requests", self.worker_id)
            return False
        self.beats += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and not self.fenced:
            self.beat()
