"""The journal: every state change of sessions and snapshots, written to a store, and
recovery from it.

The kernel's loop thread records changes as store writes (`created`, `appended`,
`generated`, `forked`, ...) in the order it applies them; `commit` hands what was
recorded to the writer thread, which applies everything queued in one atomic batch (one
round trip: a step's generated tokens of all sessions go together). `sync()` returns a
Future that resolves once everything recorded so far is in the store; the engine waits on
it before acknowledging a change, so nothing acknowledged can be lost.

Each session or snapshot is a base record plus numbered entries (snapshot/codec.py).
Fork, snapshot, restore and rollback copy another record's keys inside the store (COPY:
no tokens cross the network, whatever the length) and add one `who` entry. A log past
`LOG_LIMIT` entries is folded into a new base. The RNG is journaled as a state plus the
number of vectors drawn since (one per sampled token), so recovery replays the draws
instead of writing the generator's state every token.

When the store is unreachable, the writer keeps the queued batches (in order) and retries;
`check()` refuses new changes (StoreUnavailableError, 503) until a write succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from array import array
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING

import msgpack
import torch

from agentos.kernel.errors import CodecError, EngineClosedError, StoreUnavailableError
from agentos.kernel.process import Process
from agentos.kernel.vm import PageTable
from agentos.snapshot import codec
from agentos.snapshot.codec import Record
from agentos.snapshot.durable.store import RecordParts, Store, chunks

if TYPE_CHECKING:
    from agentos.kernel.core import Kernel
    from agentos.snapshot.snapshot import SnapshotRecord, SnapshotTable

log = logging.getLogger("agentos.journal")

LOG_LIMIT = 256  # entries after which a session's log is folded into a new base
MAX_BATCH_WRITES = 20_000  # writes per store transaction at most


def rng_bytes(rng: torch.Generator) -> bytes:
    return rng.get_state().numpy().tobytes()


def rng_from(state: bytes, state_device: str, draws: int, device: str, vocab_size: int) -> torch.Generator:
    """A generator at `state` advanced by `draws` sampling vectors (what the sampler draws
    per sampled token: one exponential vector over the vocabulary). A state saved on
    another kind of device cannot be loaded: the generator is then seeded from it."""
    g = torch.Generator(device=device)
    if state_device != torch.device(device).type:
        log.warning("RNG state from a %s generator reseeded for %s", state_device, device)
        g.manual_seed(zlib.crc32(state) + draws)
        return g
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    for _ in range(draws):
        torch.empty(vocab_size, device=device).exponential_(generator=g)
    return g


def record_of(p: Process, n: int = 0) -> Record:
    """The whole record of a live session (its arrays are shared, not copied: pack it now)."""
    return Record(id=p.pid, kind="session", owner=p.owner, token_ids=p.token_ids, mask=p.mask,
                  rng_state=rng_bytes(p.rng), rng_device=p.rng.device.type, created_at=p.created_at,
                  parent_id=p.parent_id, num_generated=p.num_generated, num_forks=p.num_forks,
                  weight_runs=[list(r) for r in p.weight_runs], n=n,
                  grammar=p.grammar.grammar if p.grammar is not None else None,
                  grammar_start=p.grammar.start if p.grammar is not None else 0)


class Journal:
    def __init__(self, store: Store, worker_id: str):
        self.store = store
        self.worker_id = worker_id
        self._batch: list[tuple] = []
        self.recorded = 0  # writes recorded so far (loop thread)
        self.durable = 0  # of those, written to the store (writer thread)
        self._n: dict[str, int] = {}  # per record: number of its last entry
        self._since: dict[str, int] = {}  # per record: entries since its base
        self._owner: dict[str, str] = {}
        self._family: dict[str, str] = {}  # per record: the session it descends from
        self.errors: dict[str, str] = {}  # records refused at recovery: id -> why
        self._queue: deque[tuple[list[tuple], int]] = deque()
        self._waiters: list[tuple[int, Future]] = []
        self._cv = threading.Condition()
        self.error: StoreUnavailableError | None = None  # set while the store is down
        # (hash key, field, value) that must hold for any write: a worker's registration
        self.guard: tuple[str, str, bytes] | None = None
        self.fenced = False  # the guard failed: another worker owns these records now
        self.stats = {"journal_writes": 0, "journal_batches": 0, "journal_failures": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="agentos-journal", daemon=True)
        self._thread.start()

    # -- callers' side ------------------------------------------------------------------

    def check(self) -> None:
        """Raises StoreUnavailableError while the store is down (a change now could not be
        acknowledged); changes nothing."""
        err = self.error
        if self.fenced:
            raise StoreUnavailableError(err.message)
        if err is not None:
            raise StoreUnavailableError(f"{err.message} (changes are refused until it is back)")

    def sync(self, target: int | None = None) -> Future:
        """A Future that resolves when every change recorded so far (or the first `target`
        writes) is in the store, or fails with StoreUnavailableError (the store is down;
        the change stays queued)."""
        target = self.recorded if target is None else target
        fut: Future = Future()
        with self._cv:
            if self.fenced:
                fut.set_exception(self.error)
            elif self.durable >= target:
                fut.set_result(None)
            elif self.error is not None:
                fut.set_exception(self.error)
            else:
                self._waiters.append((target, fut))
        return fut

    def close(self, timeout_s: float = 10.0) -> None:
        """Writes what is queued (waiting up to timeout_s while the store is down), then
        stops the writer."""
        self.commit()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
        with self._cv:
            waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(EngineClosedError("engine closed before the change was durable"))

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.05
        deadline = None
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                batches, size = [], 0
                for b in self._queue:
                    if batches and size + len(b[0]) > MAX_BATCH_WRITES:
                        break
                    batches.append(b)
                    size += len(b[0])
                if self._closed and deadline is None:
                    deadline = time.monotonic() + 10.0
            writes = [w for b, _ in batches for w in b]
            try:
                if not self.store.write(writes, self.guard):
                    self._fence()
                    return
            except StoreUnavailableError as e:
                self._failed(e)
                if deadline is not None and time.monotonic() > deadline:
                    log.error("store down at shutdown: %d queued writes were not made durable",
                              sum(len(b) for b, _ in self._queue))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except Exception:  # a bug, not an outage: keep serving, report it
                log.exception("journal write failed; %d writes dropped", len(writes))
            delay = 0.05
            upto = batches[-1][1]
            with self._cv:
                for _ in batches:
                    self._queue.popleft()
                self.durable = upto
                if self.error is not None:
                    log.warning("store is back: journal caught up")
                self.error = None
                self.stats["journal_writes"] += len(writes)
                self.stats["journal_batches"] += 1
                done = [f for t, f in self._waiters if t <= upto]
                self._waiters = [(t, f) for t, f in self._waiters if t > upto]
            for fut in done:
                if not fut.done():
                    fut.set_result(None)

    def _fence(self) -> None:
        """The guard failed: this worker's records were moved to another worker. Nothing
        queued or recorded from now on is written; every change is refused."""
        e = StoreUnavailableError(f"worker {self.worker_id} was fenced: its sessions moved to "
                                  "another worker (send requests through the gateway)")
        log.error("%s; %d queued writes dropped", e.message, sum(len(b) for b, _ in self._queue))
        with self._cv:
            self.fenced, self.error = True, e
            self._queue.clear()
            waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(e)

    def _failed(self, e: StoreUnavailableError) -> None:
        with self._cv:
            if self.error is None:
                log.error("%s", e.message)
            self.error = e
            self.stats["journal_failures"] += 1
            waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(StoreUnavailableError(
                    f"{e.message}; the change was applied here but is not durable yet"))

    # -- recording (loop thread) ----------------------------------------------------------

    def commit(self) -> None:
        """Hands the writes recorded since the last commit to the writer."""
        if not self._batch or self.fenced:
            self._batch.clear()
            return
        batch, self._batch = self._batch, []
        with self._cv:
            self._queue.append((batch, self.recorded))
            self._cv.notify()

    def _put(self, *writes: tuple) -> None:
        self._batch.extend(writes)
        self.recorded += len(writes)

    def _key(self, rid: str, part: str) -> str:
        return self.store.key(self._owner[rid], rid, part)

    def _entry(self, rid: str, op: str, **fields) -> None:
        n = self._n[rid] = self._n[rid] + 1
        self._since[rid] += 1
        self._put(("rpush", self._key(rid, "log"), codec.entry(n, op, **fields)))

    def _base(self, rec: Record) -> None:
        self._put(("set", self._key(rec.id, "base"), rec.pack()), ("del", self._key(rec.id, "log")))
        self._since[rec.id] = 0

    def _dir(self, rid: str, kind: str) -> None:
        value = msgpack.packb([self.worker_id, self._owner[rid], kind, self._family[rid]])
        self._put(("hset", self.store.dir_key, rid, value))

    def _new(self, rid: str, owner: str, n: int = 0, since: int = 0, family: str | None = None) -> None:
        self._owner[rid], self._n[rid], self._since[rid] = owner, n, since
        self._family[rid] = family or rid

    def _copy(self, src: str, dst: str, owner: str, family: str | None = None) -> None:
        """dst := a copy of src's base and log (inside the store)."""
        self._new(dst, owner, self._n[src], self._since[src], family)
        for part in ("base", "log"):
            self._put(("copy", self._key(src, part), self._key(dst, part)))

    def _forget(self, rid: str) -> None:
        self._put(("del", self._key(rid, "base"), self._key(rid, "log")),
                  ("hdel", self.store.dir_key, rid))
        self._drop(rid)

    def _drop(self, rid: str) -> None:
        for d in (self._n, self._since, self._owner, self._family):
            d.pop(rid, None)

    def session_record(self, p: Process) -> Record:
        return record_of(p, self._n.get(p.pid, 0))

    def created(self, p: Process) -> None:
        """A new session (create, import): its whole record."""
        self._new(p.pid, p.owner)
        self._base(self.session_record(p))
        self._dir(p.pid, "s")

    def appended(self, p: Process, token_ids: list[int]) -> None:
        self._entry(p.pid, "add", t=codec.tokens_to_bytes(array("i", token_ids)))

    def constrained(self, p: Process) -> None:
        """The session's open constraint changed (a call began a new one, or none)."""
        g = p.grammar
        self._entry(p.pid, "gram", text=g.grammar if g is not None else None,
                    start=g.start if g is not None else 0)

    def reseeded(self, p: Process) -> None:
        self._entry(p.pid, "rng", state=rng_bytes(p.rng))

    def generated(self, p: Process, token: int, sampled: bool, version: int) -> None:
        self._entry(p.pid, "gen", t=codec.tokens_to_bytes(array("i", [token])), s=int(sampled),
                    w=version)
        if self._since[p.pid] >= LOG_LIMIT:
            self._base(self.session_record(p))

    def call_ended(self, p: Process, sampled: bool, undone: bool) -> None:
        """A generate call ended: undone (its tokens dropped, the RNG put back), or its
        RNG state saved when it drew (so recovery replays no more than one call)."""
        if undone:
            self._entry(p.pid, "cut", len=p.num_tokens, state=rng_bytes(p.rng),
                        num_generated=p.num_generated)
        elif sampled:
            self._entry(p.pid, "rng", state=rng_bytes(p.rng))

    def forked(self, p: Process, children: list[Process]) -> None:
        self._entry(p.pid, "who", num_forks=p.num_forks)
        for c in children:
            self._copy(p.pid, c.pid, c.owner, self._family[p.pid])
            self._entry(c.pid, "who", id=c.pid, kind="session", parent_id=p.pid,
                        created_at=c.created_at, num_generated=c.num_generated, num_forks=0,
                        state=rng_bytes(c.rng))
            self._dir(c.pid, "s")

    def closed(self, p: Process) -> None:
        self._forget(p.pid)

    def snapshotted(self, p: Process, rec: SnapshotRecord) -> None:
        self._copy(p.pid, rec.id, rec.owner, self._family[p.pid])
        self._entry(rec.id, "who", id=rec.id, kind="snapshot", session_id=p.pid, parent_id=None,
                    created_at=rec.created_at, state=rec.rng_state.numpy().tobytes())
        self._dir(rec.id, "p")

    def rolled_back(self, p: Process, rec: SnapshotRecord) -> None:
        self._copy(rec.id, p.pid, p.owner, self._family[p.pid])
        self._entry(p.pid, "who", id=p.pid, kind="session", session_id=None, parent_id=p.parent_id,
                    created_at=p.created_at, num_generated=p.num_generated, num_forks=p.num_forks)

    def restored(self, rec: SnapshotRecord, p: Process) -> None:
        self._copy(rec.id, p.pid, p.owner, self._family[rec.id])
        self._entry(p.pid, "who", id=p.pid, kind="session", session_id=None, parent_id=p.parent_id,
                    created_at=p.created_at, num_generated=p.num_generated, num_forks=0)
        self._dir(p.pid, "s")

    def deleted(self, rec: SnapshotRecord) -> None:
        self._forget(rec.id)

    def fetch_snapshot(self, snap_id: str) -> Record | None:
        """A snapshot this worker does not hold, read from the store (another worker's),
        for one rollback: its keys become known here until `release` is called. Returns
        None when the store has no such snapshot. Raises CodecError."""
        entry = self.store.lookup(snap_id)
        if entry is None or entry[2] != "p":
            return None
        (base, entries), = self.store.read_records([(self.store.key(entry[1], snap_id, "base"),
                                                     self.store.key(entry[1], snap_id, "log"))])
        if base is None:
            return None
        rec = codec.replay(base, entries)
        self._new(snap_id, rec.owner, rec.n, len(entries), entry[3])
        return rec

    def release(self, rid: str) -> None:
        """Forgets a record fetched for one use (its keys stay in the store)."""
        self._drop(rid)

    # -- recovery (loop thread) ----------------------------------------------------------

    def recover(self, kernel: Kernel, snaps: SnapshotTable) -> list[dict]:
        """Loads every record the store's directory gives this worker. Returns
        [{"id", "kind", "owner"}] of those loaded; a bad record of any kind (directory
        entry, base, log, a key of the wrong type) is refused alone: logged and kept in
        `errors` (key or id -> why)."""
        directory = self.store.directory(self.errors)
        mine = [rid for rid, entry in directory.items() if entry[0] == self.worker_id]
        loaded = self.load(kernel, snaps, mine, directory)
        log.info("recovered %d records for worker %s; %d refused", len(loaded), self.worker_id,
                 len(self.errors))
        return loaded

    def load(self, kernel: Kernel, snaps: SnapshotTable, ids: list[str],
             directory: dict | None = None) -> list[dict]:
        """Loads records (sessions and snapshots) by id from the store into the kernel,
        their KV to be recomputed from tokens when they next run, and directs them to this
        worker. Ids already here are skipped; ids the store lacks are ignored; a record
        that cannot be read or loaded (checksum, version, wrong key type, bad fields) is
        refused (logged, kept in `errors`, left in the store). Returns [{"id", "kind",
        "owner"}] of those loaded."""
        if directory is None:  # only these ids' entries: not the whole deployment's
            directory = self.store.lookups(ids, self.errors)
        wanted = [rid for rid in ids if rid in directory
                  and rid not in kernel.procs and rid not in snaps.records]
        read: list[tuple[Record, int]] = []
        for part in chunks(wanted, 512):
            keys = [(self.store.key(directory[r][1], r, "base"), self.store.key(directory[r][1], r, "log"))
                    for r in part]
            for rid, parts in zip(part, self.store.read_records(keys)):
                try:
                    read.append(_read(rid, parts))
                except CodecError as e:
                    self._refuse(rid, e.message)
        loaded: list[Record] = []
        for rec, since in sorted(read, key=lambda r: r[0].kind != "session"):
            try:
                self._install(kernel, snaps, rec)
            except Exception as e:  # noqa: BLE001 - one bad record must not stop the rest
                self._refuse(rec.id, f"{type(e).__name__}: {e}")
                continue
            self._new(rec.id, rec.owner, rec.n, since, directory[rec.id][3])
            self._dir(rec.id, "s" if rec.kind == "session" else "p")
            loaded.append(rec)
        self.commit()
        return [{"id": r.id, "kind": r.kind, "owner": r.owner} for r in loaded]

    def _refuse(self, rid: str, why: str) -> None:
        self.errors[rid] = why
        log.error("record %s refused: %s", rid, why)

    def _install(self, kernel: Kernel, snaps: SnapshotTable, rec: Record) -> None:
        cfg = kernel.config
        rng = rng_from(rec.rng_state, rec.rng_device, rec.draws, cfg.device, kernel.vocab_size)
        if rec.kind == "session":
            kernel.install(Process(
                pid=rec.id, token_ids=rec.token_ids, mask=rec.mask, table=PageTable(), rng=rng,
                parent_id=rec.parent_id, created_at=rec.created_at,
                num_generated=rec.num_generated, num_forks=rec.num_forks,
                kv_version=kernel.weight_version,
                owner=rec.owner, weight_runs=[tuple(r) for r in rec.weight_runs],
                grammar=kernel.grammars.restore(rec.grammar, rec.grammar_start)))
        else:
            snaps.install(rec, rng.get_state())


def _read(rid: str, parts: RecordParts) -> tuple[Record, int]:
    """The record stored under `rid` and its number of log entries. Raises CodecError."""
    if isinstance(parts, CodecError):
        raise parts
    base, entries = parts
    if base is None:
        raise CodecError("its base record is missing")
    rec = codec.replay(base, entries)
    if rec.id != rid:
        raise CodecError(f"the record under {rid!r} is of {rec.id!r}")
    return rec, len(entries)


def kv_layout(kernel: Kernel) -> dict:
    """What KV bytes depend on: the weights (a fingerprint), dtype, block size, shape."""
    return {"fingerprint": kernel.fingerprint(), "dtype": str(kernel.dtype).removeprefix("torch."),
            "block_size": kernel.block_size, "shape": kernel.kv_block_shape}


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def tensor_from(b: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(b), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    return raw.view(dtype).view(*shape) if dtype == torch.bfloat16 else raw.view(*shape)

