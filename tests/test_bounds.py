"""Bounds on every input that costs engine time or memory: crafted import records, stop
lists, text sizes, lone surrogates, bodies cut short, idle connections and model configs.
Each gets a clear 4xx (or ValueError) before the engine thread sees it, and the server
keeps serving."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from agentos.api.app import ServerSettings, create_app, import_limit
from agentos.bench.api import run_server
from agentos.engine import MAX_CHARS_PER_TOKEN, AsyncEngine
from agentos.kernel.runner.loader import load_model
from agentos.snapshot import codec
from hf_models import make_hf_checkpoint

MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.fixture(scope="module")
def engine():
    e = AsyncEngine("tiny", kv_blocks=1024)
    yield e
    e.kernel.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(ServerSettings(max_tokens_cap=64), engine=engine)
    with TestClient(app) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]["message"]


def still_serving(c: TestClient) -> None:
    r = c.post("/v1/sessions", json={"prompt": "bystander"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    g = c.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "temperature": 0,
                                                     "ignore_eos": True})
    assert g.status_code == 200 and len(g.json()["tokens"]) == 4, g.text
    assert c.delete(f"/v1/sessions/{sid}").status_code == 200


# -- import records -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(client) -> dict:
    """The body of a record exported with its KV, after a sampled generate."""
    sid = client.post("/v1/sessions", json={"prompt": "an agent"}).json()["id"]
    client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 20, "ignore_eos": True})
    r = client.get(f"/v1/sessions/{sid}/export", params={"kv": "true"})
    assert r.status_code == 200
    client.delete(f"/v1/sessions/{sid}")
    return codec.unpack(r.content, "record")


def crafted(body: dict, **changes) -> bytes:
    return codec.pack("record", {**body, **changes})


def test_an_exported_record_imports(client, exported):
    r = client.post("/v1/sessions/import", content=crafted(exported), headers=MSGPACK)
    assert r.status_code == 201 and r.json()["num_cached"] > 0, r.text
    client.delete(f"/v1/sessions/{r.json()['id']}")


@pytest.mark.parametrize("change, needle", [
    (lambda b: {"rng": {**b["rng"], "draws": 10**6}}, "draws"),
    (lambda b: {"rng": {**b["rng"], "draws": 2**63}}, "draws"),
    (lambda b: {"rng": {**b["rng"], "state": b""}}, "RNG state"),
    (lambda b: {"rng": {**b["rng"], "state": b"\0" * (1 << 20)}}, "RNG state"),
    (lambda b: {"rng": {**b["rng"], "state": "text"}}, "rng.state"),
    (lambda b: {"mask": b["mask"][:-1] + b"\xc8"}, "mask"),
    (lambda b: {"mask": b["mask"][:-1] + b"\x02"}, "mask"),
    (lambda b: {"mask": list(b["mask"][:-1]) + [200]}, "mask"),
    (lambda b: {"kv": "garbage"}, "kv"),
    (lambda b: {"kv": {**b["kv"], "data": b["kv"]["data"][:-1]}}, "kv data"),
    (lambda b: {"kv": {**b["kv"], "num_tokens": 10**9}}, "num_tokens"),
    (lambda b: {"kv": {**b["kv"], "layout": {**b["kv"]["layout"], "dtype": "int8"}}}, "dtype"),
    (lambda b: {"kv": {**b["kv"], "layout": {**b["kv"]["layout"], "shape": [0, -1]}}}, "shape"),
    (lambda b: {"weight_runs": [[0]]}, "weight run"),
    (lambda b: {"weight_runs": [[5, 0], [3, 1]]}, "out of order"),
    (lambda b: {"weight_runs": [[10**6, 0]]}, "past"),
    (lambda b: {"weight_runs": [[0, 2**64 - 1]]}, "weight version"),
    (lambda b: {"num_forks": -1}, "num_forks"),
    (lambda b: {"created_at": math.nan}, "created_at"),
])
def test_crafted_records_are_refused_before_the_engine(client, exported, change, needle):
    t0 = time.perf_counter()
    r = client.post("/v1/sessions/import", content=crafted(exported, **change(exported)),
                    headers=MSGPACK)
    assert needle in error_of(r, 400)
    assert time.perf_counter() - t0 < 2
    still_serving(client)


def test_import_bodies_have_their_own_limit(engine, exported):
    limit = import_limit(engine, 16 << 20)
    full = math.prod(engine.kernel.kv_block_shape) * 4 * engine.max_model_len // engine.kernel.block_size
    assert full < limit < 2 * full + (16 << 20) and limit < 64 << 30
    app = create_app(ServerSettings(max_import_bytes=4096), engine=engine)
    with TestClient(app) as c:
        assert "limit of 4096" in error_of(
            c.post("/v1/sessions/import", content=crafted(exported), headers=MSGPACK), 413)
        still_serving(c)


# -- generate, text and surrogates ------------------------------------------------------------


def test_stop_lists_are_bounded(client):
    sid = client.post("/v1/sessions", json={"prompt": "x"}).json()["id"]
    for stop in (["s"] * 17, ["s" * 257], "s" * 257, [""]):
        error_of(client.post(f"/v1/sessions/{sid}/generate", json={"stop": stop}), 422)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stop": ["s"] * 17})
    assert "stop" in error_of(r, 400)
    r = client.post(f"/v1/sessions/{sid}/generate", json={
        "stop": ["\x00" * 256] * 16, "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["tokens"]) == 8
    client.delete(f"/v1/sessions/{sid}")


def test_text_longer_than_any_context_is_refused_untokenized(client, engine):
    n = MAX_CHARS_PER_TOKEN * engine.max_model_len + 1
    t0 = time.perf_counter()
    for path, body in (("/v1/tokenize", {"text": "a" * n}), ("/v1/sessions", {"prompt": "a" * n})):
        assert "characters" in error_of(client.post(path, json=body), 400)
    assert time.perf_counter() - t0 < 2
    assert client.post("/v1/tokenize", json={"text": "ab"}).json()["tokens"] == engine.encode("ab")


async def test_token_lists_longer_than_the_context_never_reach_the_loop(engine, monkeypatch):
    """Create, append, score and generate's append refuse a list of ids longer than the
    context in the caller's thread, and next_token_logprobs more candidates than the
    vocabulary: the loop thread, which checks every id, never sees them (a list of
    millions held every session's steps up for a fifth of a second)."""
    from agentos.kernel.errors import ContextLengthError, InvalidRequestError

    s = await engine.create_session(tokens=[1, 2, 3])
    big = [5] * (engine.max_model_len + 1)

    def loop_call(*args, **kwargs):
        raise AssertionError("the loop thread was asked")

    monkeypatch.setattr(engine.kernel, "call", loop_call)
    monkeypatch.setattr(engine.kernel, "call_now", loop_call)
    calls = (engine.create_session(tokens=big), s.append(tokens=big), s.score(tokens=big),
             s.generate(max_tokens=1, append=big))
    for call in calls:
        with pytest.raises(ContextLengthError, match="context limit"):
            await call
    with pytest.raises(InvalidRequestError, match="candidates"):
        await s.next_token_logprobs(candidates=[5] * (engine.kernel.vocab_size + 1))
    monkeypatch.undo()
    assert len(await s.tokens) == 3
    await s.close()


async def test_encode_async_tokenizes_long_text_off_the_event_loop(engine, monkeypatch):
    text = "tool output " * 1000
    threads = []
    encode = engine.tokenizer.encode

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", spy)
    assert await engine.encode_async(text) == encode(text, add_special_tokens=False)
    assert await engine.encode_async("hi", True) == encode("hi", add_special_tokens=True)
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()


def test_lone_surrogates_are_400(client):
    lone = '"\\ud800"'
    for path, body in (("/v1/sessions", f'{{"prompt": {lone}}}'),
                       ("/v1/tokenize", f'{{"text": {lone}}}'),
                       ("/v1/completions", f'{{"prompt": {lone}, "max_tokens": 1}}'),
                       ("/v1/chat/completions",
                        f'{{"messages": [{{"role": "user", "content": {lone}}}]}}')):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert "surrogate" in error_of(r, 400), path
    raw = b'{"text": "\xed\xa0\x80"}'  # the surrogate as (invalid) UTF-8 bytes
    error_of(client.post("/v1/tokenize", content=raw,
                         headers={"Content-Type": "application/json"}), 400)
    pair = json.dumps({"text": "fox \U0001f98a"})  # ensure_ascii: an escaped pair, one character
    assert client.post("/v1/tokenize", content=pair,
                       headers={"Content-Type": "application/json"}).status_code == 200
    still_serving(client)


# -- against a real server --------------------------------------------------------------------


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    """A real server on each HTTP parser: the guards hold on both."""
    with run_server(["--max-connections", "64", "--header-timeout-s", "1",
                     "--body-timeout-s", "1", "--http", request.param,
                     "--log-level", "warning"]) as url:
        yield url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_a_body_cut_short_is_never_run(server):
    with httpx.Client(base_url=server) as http:
        before = len(http.get("/v1/sessions").json()["data"])
        s = _connect(server)
        body = b'{"prompt": "hi"}'  # valid JSON, but not the whole declared body
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (len(body) + 20) + body)
        time.sleep(0.3)
        s.close()
        time.sleep(0.5)
        assert len(http.get("/v1/sessions").json()["data"]) == before


def test_a_trickled_body_times_out(server):
    s = _connect(server)
    s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{")
    t0 = time.perf_counter()
    head = s.recv(4096)
    s.close()
    assert head.startswith(b"HTTP/1.1 408"), head[:100]
    assert time.perf_counter() - t0 < 3
    assert httpx.get(server + "/health", timeout=5).status_code == 200


def test_a_huge_import_is_refused_before_it_is_read(server):
    s = _connect(server)
    s.sendall(b"POST /v1/sessions/import HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack"
              b"\r\nContent-Length: %d\r\n\r\n" % (3 << 29) + b"\0" * 1024)
    head = s.recv(4096)
    s.close()
    assert head.startswith(b"HTTP/1.1 413"), head[:100]


def test_idle_connections_are_closed_and_health_answers(server):
    socks = []
    for _ in range(300):  # far past --max-connections 64
        s = _connect(server)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(s)
    t0 = time.perf_counter()
    assert httpx.get(server + "/health", timeout=5).status_code == 200
    assert time.perf_counter() - t0 < 2
    time.sleep(1.5)  # past --header-timeout-s: every idle one is closed
    closed = 0
    for s in socks:
        s.settimeout(1)
        try:
            closed += s.recv(1) == b""
        except ConnectionError:
            closed += 1
        s.close()
    assert closed == len(socks)
    assert httpx.get(server + "/health", timeout=5).status_code == 200


# -- model configs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("m"), "llama")


def load_with(tmp_path, checkpoint, edit):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    cfg = json.loads((checkpoint / "config.json").read_text())
    edited = edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg if edited is None else edited))
    return load_model(str(folder))


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(rms_norm_eps=math.nan), "rms_norm_eps"),
    (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
     "rope_theta"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": -4.0, "rope_theta": 1e4,
                                         "original_max_position_embeddings": 256}), "rope"),
    (lambda c: c.update(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
    (lambda c: c.update(num_hidden_layers=10**6), "num_hidden_layers"),
    (lambda c: c.update(num_hidden_layers=4), "num_hidden_layers"),
    (lambda c: c.update(intermediate_size=10**5), "gate_proj.*config.json says"),
    (lambda c: c.update(max_position_embeddings=10**12), "max_position_embeddings"),
    (lambda c: c.__delitem__("hidden_size"), "lacks .hidden_size"),
    (lambda c: c.update(num_attention_heads="4"), "malformed"),
    (lambda c: c.update(num_key_value_heads=-2), "num_key_value_heads"),
    (lambda c: c.update(eos_token_id="</s>"), "eos_token_id"),
    (lambda c: [c], "JSON object"),
])
def test_bad_model_configs_are_clear_value_errors(tmp_path, checkpoint, edit, needle):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=needle):
        load_with(tmp_path, checkpoint, edit)
    assert time.perf_counter() - t0 < 10


def test_shard_paths_stay_in_the_model_folder(tmp_path):
    outside = make_hf_checkpoint(tmp_path / "other", "llama", shards=2)
    folder = tmp_path / "m" / "inner"
    folder.mkdir(parents=True)
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"../../other/{v}" for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text((outside / "config.json").read_text())
    with pytest.raises(ValueError, match="outside the model folder"):
        load_model(str(folder))
    index["weight_map"] = {k: str(outside / v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the model folder"):
        load_model(str(folder))


def test_record_replay_is_checked_too():
    """A journal entry can make a record invalid; replay refuses it as a whole."""
    rec = codec.Record(id="sess_x", kind="session", owner="a", token_ids=codec.array("i", [1, 2]),
                       mask=codec.array("b", [0, 1]), rng_state=bytes(5056), rng_device="cpu",
                       created_at=0.0)
    bad = codec.entry(1, "who", num_forks=-5)
    with pytest.raises(codec.CodecError, match="num_forks"):
        codec.replay(rec.pack(), [bad])
