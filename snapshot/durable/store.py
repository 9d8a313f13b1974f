"""Stores: where the journal keeps session and snapshot records. One interface, two
implementations: `MemoryStore` (a dict, the embedded default: lives as long as the process)
and `RedisStore` (redis-py: durable, shared by the workers of a deployment).

A store holds byte strings, lists of byte strings and hashes under string keys, and
applies a batch of writes atomically (`write`: a MULTI/EXEC transaction on Redis). Keys
are namespaced per deployment (`ns`) and, for records, per owner (tenant):

    {ns}:{owner}:{id}:base     the record as of its last compaction (codec blob)
    {ns}:{owner}:{id}:log      entries since then (codec blobs, in order)
    {ns}:dir                   hash: id -> msgpack [worker_id, owner, kind "s" | "p", family]

(a family is the id of the session a record descends from by fork, snapshot and restore:
the gateway keeps families together when it moves a dead worker's records)

Writes are tuples: ("set", key, value), ("del", key, ...), ("rpush", key, value, ...),
("copy", src, dst) (replaces dst; a missing src deletes dst), ("hset", key, field, value),
("hdel", key, field, ...). Every method raises StoreUnavailableError when the store
cannot be reached; a failed `write` may or may not have been applied (the journal's
entries are numbered, so applying one twice is harmless).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import msgpack

from agentos.kernel.errors import StoreUnavailableError

Write = tuple


class Store:
    """The interface. `ns` prefixes every key of one deployment."""

    ns: str = "agentos:default"

    def key(self, owner: str, rid: str, part: str) -> str:
        return f"{self.ns}:{owner}:{rid}:{part}"

    @property
    def dir_key(self) -> str:
        return f"{self.ns}:dir"

    def write(self, writes: Sequence[Write], guard: tuple[str, str, bytes] | None = None) -> bool:
        """Applies the writes atomically, and only if `guard` (key, field, value) holds:
        hash `key` maps `field` to `value` (a worker's registration, so a worker that was
        fenced never writes again). Returns False, writing nothing, when it does not."""
        raise NotImplementedError

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        raise NotImplementedError

    def read_records(self, keys: Sequence[tuple[str, str]]) -> list[tuple[bytes | None, list[bytes]]]:
        """(base, log entries) of each (base key, log key), read together."""
        raise NotImplementedError

    def ping(self) -> None:
        """Returns when the store answers; raises StoreUnavailableError otherwise."""

    def close(self) -> None:
        pass

    def hget(self, key: str, name: str) -> bytes | None:
        raise NotImplementedError

    def directory(self) -> dict[str, tuple[str, str, str, str]]:
        """Every record of the deployment: id -> (worker id, owner, kind "s" or "p", family)."""
        return {k.decode(): dir_entry(k.decode(), v) for k, v in self.hgetall(self.dir_key).items()}

    def lookup(self, rid: str) -> tuple[str, str, str, str] | None:
        """The directory's entry of one record, or None."""
        v = self.hget(self.dir_key, rid)
        return None if v is None else dir_entry(rid, v)

    def lookups(self, rids: Sequence[str]) -> dict[str, tuple[str, str, str, str]]:
        """The directory's entries of those of `rids` it has, read together."""
        values = self.hmget(self.dir_key, list(rids)) if rids else []
        return {rid: dir_entry(rid, v) for rid, v in zip(rids, values) if v is not None}

    def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        raise NotImplementedError


class MemoryStore(Store):
    """Records in this process's memory: the same semantics as Redis, no durability past
    the process (an engine closed and another opened on the same MemoryStore recovers)."""

    def __init__(self, deployment: str = "default"):
        self.ns = f"agentos:{deployment}"
        self.data: dict[str, bytes | list[bytes] | dict[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def write(self, writes: Sequence[Write], guard: tuple[str, str, bytes] | None = None) -> bool:
        with self._lock:
            if guard is not None and self.data.get(guard[0], {}).get(_b(guard[1])) != guard[2]:
                return False
            for w in writes:
                self._apply(w)
        return True

    def _apply(self, w: Write) -> None:
        op, key, *args = w
        d = self.data
        if op == "set":
            d[key] = bytes(args[0])
        elif op == "del":
            for k in (key, *args):
                d.pop(k, None)
        elif op == "rpush":
            d.setdefault(key, []).extend(bytes(a) for a in args)
        elif op == "copy":
            src = d.get(key)
            if src is None:
                d.pop(args[0], None)
            else:
                d[args[0]] = src[:] if isinstance(src, list) else dict(src) if isinstance(src, dict) else src
        elif op == "hset":
            d.setdefault(key, {})[_b(args[0])] = _b(args[1])
        elif op == "hdel":
            h = d.get(key, {})
            for f in args:
                h.pop(_b(f), None)
        else:
            raise ValueError(f"unknown store write {op!r}")

    def get(self, key: str) -> bytes | None:
        v = self.data.get(key)
        return v if isinstance(v, bytes) else None

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        with self._lock:
            return dict(self.data.get(key, {}))

    def hget(self, key: str, name: str) -> bytes | None:
        with self._lock:
            return self.data.get(key, {}).get(_b(name))

    def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        with self._lock:
            h = self.data.get(key, {})
            return [h.get(_b(n)) for n in names]

    def read_records(self, keys):
        with self._lock:
            return [(self.get(b), list(self.data.get(lg, []))) for b, lg in keys]


class RedisStore(Store):
    """Records in Redis (redis-py). `url` is redis://host:port/db; keys live under
    agentos:{deployment}. Connection errors and timeouts become StoreUnavailableError."""

    def __init__(self, url: str, deployment: str = "default", timeout_s: float = 5.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.ns = f"agentos:{deployment}"
        # NOTE: no retries inside redis-py: the journal retries whole batches itself, in
        # order, and a call that cannot be made durable must fail fast (503)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=min(timeout_s, 2.0),
                                           retry=Retry(NoBackoff(), 0))
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                        OSError)
        self._guarded = self.client.register_script(_GUARDED_WRITE)

    def _unavailable(self, e: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"the store at {self.url} is unavailable "
                                     f"({type(e).__name__}: {e}); try again later")

    def write(self, writes: Sequence[Write], guard: tuple[str, str, bytes] | None = None) -> bool:
        commands = []
        for op, key, *args in writes:
            if op == "copy":
                # NOTE: COPY leaves dst alone when src is missing; delete it first so dst
                # always ends up equal to src
                commands += [("DEL", args[0]), ("COPY", key, args[0], "REPLACE")]
            elif op in _COMMANDS:
                commands.append((_COMMANDS[op], key, *args))
            else:
                raise ValueError(f"unknown store write {op!r}")
        try:
            if guard is None:
                pipe = self.client.pipeline(transaction=True)
                for c in commands:
                    pipe.execute_command(*c)
                pipe.execute()
                return True
            # one round trip, atomic: the guard is checked and the writes applied by a script
            argv = [guard[1], guard[2]]
            for c in commands:
                argv += [len(c), *c]
            return bool(self._guarded(keys=[guard[0]], args=argv))
        except self._errors as e:
            raise self._unavailable(e) from None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get(key)
        except self._errors as e:
            raise self._unavailable(e) from None

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        try:
            return self.client.hgetall(key)
        except self._errors as e:
            raise self._unavailable(e) from None

    def hget(self, key: str, name: str) -> bytes | None:
        try:
            return self.client.hget(key, name)
        except self._errors as e:
            raise self._unavailable(e) from None

    def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        try:
            return self.client.hmget(key, names)
        except self._errors as e:
            raise self._unavailable(e) from None

    def read_records(self, keys):
        try:
            pipe = self.client.pipeline(transaction=False)
            for base, log in keys:
                pipe.get(base)
                pipe.lrange(log, 0, -1)
            out = pipe.execute()
        except self._errors as e:
            raise self._unavailable(e) from None
        return [(out[i], out[i + 1]) for i in range(0, len(out), 2)]

    def ping(self) -> None:
        try:
            self.client.ping()
        except self._errors as e:
            raise self._unavailable(e) from None

    def close(self) -> None:
        self.client.close()


_COMMANDS = {"set": "SET", "del": "DEL", "rpush": "RPUSH", "hset": "HSET", "hdel": "HDEL"}

# KEYS[1]: the guard's hash; ARGV: field, value, then per command its length and words
_GUARDED_WRITE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


def open_store(spec, deployment: str = "default") -> Store | None:
    """The store a Config names: None, "memory", a redis:// URL, or a Store itself."""
    if spec is None or isinstance(spec, Store):
        return spec
    if spec == "memory":
        return MemoryStore(deployment)
    if isinstance(spec, str) and spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, deployment)
    raise ValueError(f"store must be None, 'memory' or a redis:// URL, got {spec!r}")


def dir_entry(rid: str, value: bytes) -> tuple[str, str, str, str]:
    worker, owner, kind, *family = msgpack.unpackb(value)
    return worker, owner, kind, family[0] if family else rid


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
