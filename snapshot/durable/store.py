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
entries are numbered, so applying one twice is harmless). A key holding the wrong type,
or a directory entry that is not one, is a bad record (CodecError): the readers below
refuse it alone and read the rest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import msgpack

from agentos.kernel.errors import CodecError, StoreUnavailableError

log = logging.getLogger("agentos.store")

Write = tuple
DirEntry = tuple[str, str, str, str]  # worker id, owner, kind "s" | "p", family
# what read_records gives per record: (base, log entries), or why it cannot be read
RecordParts: TypeAlias = tuple[bytes | None, list[bytes]] | CodecError


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

    def read_records(self, keys: Sequence[tuple[str, str]]) -> list[RecordParts]:
        """(base, log entries) of each (base key, log key), read together; a CodecError in
        place of a record whose keys hold the wrong types."""
        raise NotImplementedError

    def ping(self) -> None:
        """Returns when the store answers; raises StoreUnavailableError otherwise."""

    def close(self) -> None:
        pass

    def hget(self, key: str, name: str) -> bytes | None:
        raise NotImplementedError

    def directory(self, refused: dict[str, str] | None = None) -> dict[str, DirEntry]:
        """Every record of the deployment: id -> (worker id, owner, kind "s" or "p", family).
        Bad entries (and the whole directory, if its key is not a hash) are left out,
        logged and added to `refused` (key -> why)."""
        try:
            raw = self.hgetall(self.dir_key)
        except CodecError as e:
            _refuse(refused, self.dir_key, e.message)
            return {}
        return good_entries(self.dir_key, raw.items(), refused)

    def lookup(self, rid: str) -> DirEntry | None:
        """The directory's entry of one record, or None (also for a bad entry)."""
        return self.lookups([rid]).get(rid)

    def lookups(self, rids: Sequence[str], refused: dict[str, str] | None = None) -> dict[str, DirEntry]:
        """The directory's entries of those of `rids` it has, read together; bad ones are
        left out as in `directory`."""
        try:
            values = self.hmget(self.dir_key, list(rids)) if rids else []
        except CodecError as e:
            _refuse(refused, self.dir_key, e.message)
            return {}
        return good_entries(self.dir_key, [(r, v) for r, v in zip(rids, values) if v is not None],
                            refused)

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

    def _hash(self, key: str) -> dict[bytes, bytes]:
        h = self.data.get(key, {})
        if not isinstance(h, dict):
            raise CodecError(f"{key} holds a {type(h).__name__}, not a hash")
        return h

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        with self._lock:
            return dict(self._hash(key))

    def hget(self, key: str, name: str) -> bytes | None:
        with self._lock:
            return self._hash(key).get(_b(name))

    def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        with self._lock:
            h = self._hash(key)
            return [h.get(_b(n)) for n in names]

    def read_records(self, keys: Sequence[tuple[str, str]]) -> list[RecordParts]:
        out: list[RecordParts] = []
        with self._lock:
            for b, lg in keys:
                base, entries = self.data.get(b), self.data.get(lg, [])
                if base is not None and not isinstance(base, bytes):
                    out.append(CodecError(f"{b} holds a {type(base).__name__}, not a string"))
                elif not isinstance(entries, list):
                    out.append(CodecError(f"{lg} holds a {type(entries).__name__}, not a list"))
                else:
                    out.append((base, list(entries)))
        return out


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
        self._wrong_type = redis.ResponseError  # e.g. WRONGTYPE: a bad record, not an outage
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
        except self._wrong_type as e:
            raise CodecError(f"{key}: {e}") from None

    def hget(self, key: str, name: str) -> bytes | None:
        try:
            return self.client.hget(key, name)
        except self._errors as e:
            raise self._unavailable(e) from None
        except self._wrong_type as e:
            raise CodecError(f"{key}: {e}") from None

    def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        try:
            return self.client.hmget(key, names)
        except self._errors as e:
            raise self._unavailable(e) from None
        except self._wrong_type as e:
            raise CodecError(f"{key}: {e}") from None

    def read_records(self, keys: Sequence[tuple[str, str]]) -> list[RecordParts]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for base, lg in keys:
                pipe.get(base)
                pipe.lrange(lg, 0, -1)
            out = pipe.execute(raise_on_error=False)  # a WRONGTYPE fails its record alone
        except self._errors as e:
            raise self._unavailable(e) from None
        parts: list[RecordParts] = []
        for (b, lg), base, entries in zip(keys, out[0::2], out[1::2]):
            bad = [(k, r) for k, r in ((b, base), (lg, entries)) if isinstance(r, Exception)]
            if any(isinstance(r, self._errors) for _, r in bad):
                raise self._unavailable(bad[0][1])
            parts.append(CodecError(f"{bad[0][0]}: {bad[0][1]}") if bad else (base, entries))
        return parts

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


def dir_entry(rid: str, value: bytes) -> DirEntry:
    """A directory entry's fields. Raises CodecError when it is not one."""
    try:
        e = msgpack.unpackb(value)
    except Exception as ex:  # noqa: BLE001 - any malformed bytes are the same refusal
        raise CodecError(f"not a directory entry: malformed msgpack ({type(ex).__name__})") from None
    if not (isinstance(e, list) and len(e) in (3, 4) and all(isinstance(x, str) for x in e)
            and e[2] in ("s", "p")):
        raise CodecError("not a directory entry: [worker, owner, kind, family] expected")
    return e[0], e[1], e[2], e[3] if len(e) == 4 else rid


def good_entries(dir_key: str, items: Iterable[tuple[bytes | str, bytes]],
                 refused: dict[str, str] | None = None) -> dict[str, DirEntry]:
    """The directory entries among `items` (field, value) that read; the others are logged
    and added to `refused` (key -> why)."""
    out = {}
    for field, value in items:
        try:
            rid = field.decode() if isinstance(field, bytes) else field
            out[rid] = dir_entry(rid, value)
        except (CodecError, UnicodeDecodeError) as e:
            _refuse(refused, f"{dir_key}[{field!r}]", getattr(e, "message", str(e)))
    return out


def _refuse(refused: dict[str, str] | None, key: str, why: str) -> None:
    log.error("bad record %s refused: %s", key, why)
    if refused is not None:
        refused[key] = why


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
