"""The record format: sessions and snapshots as versioned, checksummed msgpack.

Every blob is an envelope `[MAGIC, FORMAT_VERSION, kind, crc32(payload), payload]` whose
payload is the msgpack of a dict. `unpack` refuses (CodecError, loading nothing) a blob
that is not an envelope, has another format version, or fails its checksum.

A *record* (kind "record") is a whole session or snapshot: tokens (int32 little-endian
bytes), masks, the sampler's RNG state, per-token weight versions (runs), parent links,
metadata, and optionally the KV bytes of its cached tokens. The journal keeps a record as
a base record plus *entries* (kind "entry"), each numbered (`n`), that `Record.apply`
replays in order; an entry whose number is not past the record's is a duplicate (a retried
write) and is skipped. Entries:

    gen   t (tokens), s (1: sampled, each token drew one RNG vector), w (weight version)
    add   t                                       given tokens (mask 0)
    rng   state                                   the RNG state now (draws since: 0)
    cut   len, state, num_generated               an undone generate call
    who   id, kind, owner, parent_id / session_id, created_at, num_generated, num_forks,
          state (each optional)                   identity (after a copy of another record)
"""

from __future__ import annotations

import math
import sys
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack

from agentos.kernel.errors import CodecError

MAGIC = "agentos"
FORMAT_VERSION = 1
# bytes of a torch generator's state: a CPU one (mt19937) and a CUDA one (Philox seed and
# offset); a state of another device is only a seed (see journal.rng_from), bounded in size
RNG_STATE_BYTES = {"cpu": 5056, "cuda": 16}
MAX_RNG_STATE_BYTES = 1 << 16
# an open constraint's grammar (llguidance's JSON around a schema, Lark grammar or regex
# of at most grammar.MAX_GRAMMAR_CHARS characters, escaped)
MAX_GRAMMAR_BYTES = 1 << 18
MAX_INT = 2**63 - 1  # counters and versions are int64 wherever they go (msgpack, torch)
KV_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def pack(kind: str, body: dict) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([MAGIC, FORMAT_VERSION, kind, zlib.crc32(payload), payload], use_bin_type=True)


def unpack(blob: bytes, kind: str) -> dict:
    """The dict inside an envelope of `kind`. Raises CodecError for anything else."""
    try:
        env = msgpack.unpackb(blob, raw=False)
    except Exception as e:  # noqa: BLE001 - any malformed input is the same refusal
        raise CodecError(f"not an AgentOS record: malformed msgpack ({type(e).__name__})") from None
    if not (isinstance(env, list) and len(env) == 5 and env[0] == MAGIC):
        raise CodecError("not an AgentOS record (no envelope)")
    _, version, got, crc, payload = env
    if version != FORMAT_VERSION:
        raise CodecError(f"record format version {version!r} cannot be read: this build reads "
                         f"version {FORMAT_VERSION}")
    if got != kind:
        raise CodecError(f"expected a {kind}, got a {got!r}")
    if not isinstance(payload, bytes) or zlib.crc32(payload) != crc:
        raise CodecError("checksum mismatch: the record is corrupted")
    body = msgpack.unpackb(payload, raw=False)
    if not isinstance(body, dict):
        raise CodecError("record body is not a map")
    return body


def tokens_to_bytes(ids: array) -> bytes:
    if sys.byteorder == "big":
        ids = array("i", ids)
        ids.byteswap()
    return ids.tobytes()


def tokens_from_bytes(b: bytes) -> array:
    if len(b) % 4:
        raise CodecError("token bytes are not a whole number of int32")
    ids = array("i")
    ids.frombytes(b)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids


@dataclass(slots=True)
class Record:
    """A session or snapshot as stored: tokens are the truth, RNG state plus `draws`
    (vectors drawn since that state) is the sampler's state."""

    id: str
    kind: str  # "session" or "snapshot"
    owner: str
    token_ids: array
    mask: array
    rng_state: bytes
    rng_device: str  # "cpu" or "cuda": generator states do not move between the two
    created_at: float
    parent_id: str | None = None  # a session's parent
    session_id: str | None = None  # a snapshot's session
    draws: int = 0
    num_generated: int = 0
    num_forks: int = 0
    weight_runs: list[list[int]] = field(default_factory=list)  # [first token, version] per run
    n: int = 0  # the number of the last entry applied
    kv: dict | None = None  # optional KV of the first kv["num_tokens"] tokens
    # the session's open constraint (kernel/grammar.py): its grammar and first token
    grammar: str | None = None
    grammar_start: int = 0

    def to_body(self) -> dict:
        body = {"id": self.id, "kind": self.kind, "owner": self.owner,
                "tokens": tokens_to_bytes(self.token_ids), "mask": self.mask.tobytes(),
                "rng": {"device": self.rng_device, "state": self.rng_state, "draws": self.draws},
                "created_at": self.created_at, "parent_id": self.parent_id,
                "session_id": self.session_id, "num_generated": self.num_generated,
                "num_forks": self.num_forks,
                "weight_runs": self.weight_runs, "n": self.n}
        if self.kv is not None:
            body["kv"] = self.kv
        if self.grammar is not None:
            body["grammar"] = {"text": self.grammar, "start": self.grammar_start}
        return body

    def pack(self) -> bytes:
        return pack("record", self.to_body())

    @classmethod
    def unpack(cls, blob: bytes) -> Record:
        """Decodes and validates a record blob. Raises CodecError."""
        return cls.from_body(unpack(blob, "record"))

    @classmethod
    def from_body(cls, b: dict) -> Record:
        try:
            rng = b["rng"]
            rec = cls(id=str(b["id"]), kind=b["kind"], owner=str(b["owner"]),
                      token_ids=tokens_from_bytes(_bytes(b["tokens"], "tokens")),
                      mask=array("b", _bytes(b["mask"], "mask")),
                      rng_state=_bytes(rng["state"], "rng.state"), rng_device=str(rng["device"]),
                      created_at=float(b["created_at"]), parent_id=b.get("parent_id"),
                      session_id=b.get("session_id"), draws=int(rng.get("draws", 0)),
                      num_generated=int(b.get("num_generated", 0)),
                      num_forks=int(b.get("num_forks", 0)),
                      weight_runs=[list(map(int, r)) for r in b.get("weight_runs", [])],
                      n=int(b.get("n", 0)), kv=b.get("kv"))
            if (g := b.get("grammar")) is not None:
                rec.grammar, rec.grammar_start = g["text"], int(g["start"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise CodecError(f"record is missing or has a malformed field: {e}") from None
        rec.check()
        return rec

    def check(self) -> None:
        """Raises CodecError unless every field is one a session can run with: bounded
        counters, masks of 0/1, a generator state of its device's size, draws no more than
        the sampled tokens (each replays one vector, so this bounds the work of loading it),
        weight runs in order, and KV whose bytes match the layout it claims."""
        if self.kind not in ("session", "snapshot"):
            raise CodecError(f"unknown record kind {self.kind!r}")
        if not (isinstance(self.id, str) and isinstance(self.owner, str)):
            raise CodecError("id and owner must be strings")
        n = len(self.token_ids)
        if len(self.mask) != n:
            raise CodecError(f"record has {n} tokens but {len(self.mask)} mask flags")
        if self.mask.tobytes().translate(None, b"\x00\x01"):
            raise CodecError("mask values must be 0 (given) or 1 (generated)")
        for name in ("draws", "num_generated", "num_forks", "n"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 <= v <= MAX_INT):
                raise CodecError(f"{name} must be an integer in [0, 2**63)")
        if self.draws > self.mask.count(1):
            raise CodecError(f"rng.draws ({self.draws}) exceeds the record's {self.mask.count(1)} "
                             "generated tokens")
        size = RNG_STATE_BYTES.get(self.rng_device)
        if size is not None and len(self.rng_state) != size:
            raise CodecError(f"a {self.rng_device} RNG state is {size} bytes, not "
                             f"{len(self.rng_state)}")
        if len(self.rng_state) > MAX_RNG_STATE_BYTES or len(self.rng_device) > 16:
            raise CodecError("rng state or device is too large")
        if not (isinstance(self.created_at, (int, float)) and math.isfinite(self.created_at)):
            raise CodecError("created_at must be a finite number")
        for ref in (self.parent_id, self.session_id):
            if ref is not None and not isinstance(ref, str):
                raise CodecError("parent_id and session_id must be strings")
        _check_runs(self.weight_runs, n)
        if self.kv is not None:
            _check_kv(self.kv, n)
        if self.grammar is not None and not (
                isinstance(self.grammar, str) and len(self.grammar) <= MAX_GRAMMAR_BYTES
                and isinstance(self.grammar_start, int) and 0 <= self.grammar_start <= n):
            raise CodecError(f"grammar must be a string of at most {MAX_GRAMMAR_BYTES} "
                             "characters starting within the tokens")

    def apply(self, blob: bytes) -> None:
        """Replays one journal entry (skipped when already applied). Raises CodecError."""
        e = unpack(blob, "entry")
        try:
            n, op = int(e["n"]), e["op"]
            if n <= self.n:
                return
            if op == "gen":
                ids = tokens_from_bytes(e["t"])
                w = int(e.get("w", 0))
                if not self.weight_runs or self.weight_runs[-1][1] != w:
                    self.weight_runs.append([len(self.token_ids), w])
                self.token_ids.extend(ids)
                self.mask.extend(b"\x01" * len(ids))
                self.num_generated += len(ids)
                if e.get("s"):
                    self.draws += len(ids)
            elif op == "add":
                ids = tokens_from_bytes(e["t"])
                self.token_ids.extend(ids)
                self.mask.extend(bytes(len(ids)))
            elif op == "rng":
                self.rng_state, self.draws = bytes(e["state"]), 0
            elif op == "cut":
                cut = int(e["len"])
                del self.token_ids[cut:]
                del self.mask[cut:]
                self.weight_runs = [r for r in self.weight_runs if r[0] < cut]
                self.rng_state, self.draws = bytes(e["state"]), 0
                self.num_generated = int(e["num_generated"])
            elif op == "gram":
                self.grammar, self.grammar_start = e.get("text"), int(e.get("start", 0))
            elif op == "who":
                for name in ("id", "kind", "owner", "parent_id", "session_id", "created_at",
                             "num_generated", "num_forks"):
                    if name in e:
                        setattr(self, name, e[name])
                if e.get("state") is not None:
                    self.rng_state, self.draws = bytes(e["state"]), 0
            else:
                raise CodecError(f"unknown journal entry {op!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise CodecError(f"journal entry {e.get('n')!r} is malformed: {err}") from None
        self.n = n
        self.kv = None  # KV is never journaled: only a base from an export carries it


def _bytes(v: Any, name: str) -> bytes:
    if not isinstance(v, bytes):
        raise CodecError(f"{name} must be bytes (msgpack bin)")
    return v


def _check_runs(runs: list[list[int]], num_tokens: int) -> None:
    """Weight runs: [first token, version] pairs, first tokens rising within the record."""
    last = -1
    for r in runs:
        if len(r) != 2:
            raise CodecError("each weight run is [first token, version]")
        if not last < r[0] < num_tokens:
            raise CodecError(f"weight run first token {r[0]} is out of order or past the "
                             f"{num_tokens} tokens")
        if not 0 <= r[1] <= MAX_INT:
            raise CodecError("a weight version must be in [0, 2**63)")
        last = r[0]


def _check_kv(kv: Any, num_tokens: int) -> None:
    """KV as export writes it: {"layout": {fingerprint, dtype, block_size, shape},
    "num_tokens", "data"}, data being the whole blocks of num_tokens tokens. Whether the
    layout is this engine's is the importer's to say (else the tokens are recomputed)."""
    if not isinstance(kv, dict) or not isinstance(kv.get("layout"), dict):
        raise CodecError("kv must be a map with a layout")
    layout, cached, data = kv["layout"], kv.get("num_tokens"), kv.get("data")
    shape, block_size = layout.get("shape"), layout.get("block_size")
    itemsize = KV_DTYPE_BYTES.get(layout.get("dtype"))
    if itemsize is None:
        raise CodecError(f"kv dtype {layout.get('dtype')!r} is not one of {sorted(KV_DTYPE_BYTES)}")
    if not (isinstance(block_size, int) and 0 < block_size <= 1 << 16 and isinstance(shape, list)
            and shape and all(isinstance(d, int) and 0 < d <= 1 << 24 for d in shape)):
        raise CodecError("kv layout needs a positive block_size and a shape of positive ints")
    if not (isinstance(cached, int) and 0 < cached <= num_tokens and isinstance(data, bytes)):
        raise CodecError(f"kv needs num_tokens in [1, {num_tokens}] and data as bytes")
    block_bytes = itemsize
    for d in shape:
        block_bytes *= d
    expected = -(-cached // block_size) * block_bytes
    if len(data) != expected:
        raise CodecError(f"kv data is {len(data)} bytes; {cached} tokens in that layout are "
                         f"{expected}")


def entry(n: int, op: str, **fields: Any) -> bytes:
    return pack("entry", {"n": n, "op": op, **fields})


def replay(base: bytes, entries: list[bytes]) -> Record:
    """The record a base plus its journal entries describe. Raises CodecError."""
    rec = Record.unpack(base)
    for blob in entries:
        rec.apply(blob)
    rec.check()
    return rec
