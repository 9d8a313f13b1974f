"""SkyRL's own RemoteInferenceClient against `agentos serve`: token-id generates with
session ids, multi-turn continuation through the prefix cache, pause and resume, and
weights pushed over HTTP.

SkyRL 0.3's package `__init__` does not import on Python 3.11 (a pydantic TypedDict
error in its tinker types), and it pins transformers below the version here, so CI
installs it without its dependencies and this test loads the client's module directly:
its parent packages are stood up empty, so their `__init__` files never run."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import pathlib
import sys
import types

import httpx
import pytest
import torch

pytest.importorskip("aiohttp")
if importlib.util.find_spec("skyrl") is None:
    pytest.skip("skyrl is not installed (pip install --no-deps skyrl==0.3.0)",
                allow_module_level=True)

from agentos import Client, Engine, SamplingParams  # noqa: E402
from agentos.bench.api import run_server  # noqa: E402
from agentos.kernel.runner.loader import load_model  # noqa: E402


@functools.cache
def _client_class():
    spec = importlib.util.find_spec("skyrl")
    root = pathlib.Path(spec.submodule_search_locations[0])
    for name in ("skyrl", "skyrl.backends", "skyrl.backends.skyrl_train",
                 "skyrl.backends.skyrl_train.inference_servers"):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    from skyrl.backends.skyrl_train.inference_servers.remote_inference_client import (
        RemoteInferenceClient,
    )
    return RemoteInferenceClient


@pytest.fixture(scope="module")
def url():
    with run_server(["--allow-open-admin", "--kv-blocks", "1024"]) as u:
        yield u


def _prefilled(url: str) -> int:
    return httpx.get(f"{url}/v1/system").json()["stats"]["tokens_prefilled"]


def test_skyrl_client_drives_agentos(url):
    RemoteInferenceClient = _client_class()
    sampling = {"max_tokens": 6, "temperature": 0.0, "logprobs": 1, "ignore_eos": True}

    async def go():
        client = RemoteInferenceClient(proxy_url=url, server_urls=[url], data_parallel_size=1,
                                       model_name="tiny")
        try:
            assert await client.get_world_size() == (1, 1)
            prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
            out = await client.generate({"prompt_token_ids": prompts, "sampling_params": sampling,
                                         "session_ids": ["traj-0", "traj-1"]})
            assert [len(r) for r in out["response_ids"]] == [6, 6]
            assert all(len(lp) == 6 and all(x <= 0 for x in lp) for lp in out["response_logprobs"])
            assert out["stop_reasons"] == ["length", "length"]
            with Engine("tiny") as local:  # a fresh run gives the same tokens
                for p, r in zip(prompts, out["response_ids"]):
                    assert local.create_session(tokens=p).generate(
                        max_tokens=6, temperature=0.0, ignore_eos=True).tokens == r
            # the next turn re-sends the whole history plus a tool's answer: only the new
            # tokens are computed (and the last sampled one, never computed before)
            history = prompts[0] + out["response_ids"][0] + [9, 9, 9]
            before = _prefilled(url)
            again = await client.generate({"prompt_token_ids": [history],
                                           "sampling_params": sampling, "session_ids": ["traj-0"]})
            assert _prefilled(url) - before == 3 + 1
            assert len(again["response_ids"][0]) == 6
            # pause (keep): a generate waits, and finishes after resume
            await client.pause(mode="keep")
            pending = asyncio.ensure_future(client.generate(
                {"prompt_token_ids": [[3, 3, 3]], "sampling_params": sampling}))
            await asyncio.sleep(0.5)
            assert not pending.done()
            await client.resume()
            assert len((await pending)["response_ids"][0]) == 6
            # reset_prefix_cache: the same history is computed again in full
            await client.reset_prefix_cache()
            before = _prefilled(url)
            await client.generate({"prompt_token_ids": [history], "sampling_params": sampling})
            assert _prefilled(url) - before == len(history)
            return out
        finally:
            await client.teardown()

    asyncio.run(go())


def test_weights_pushed_over_http_reach_skyrl_generates(url):
    RemoteInferenceClient = _client_class()
    model, _, _ = load_model("tiny", "cpu", torch.float32)
    weights = {k: v * 1.25 if k.endswith("norm.weight") else v
               for k, v in model.hf_named_tensors().items()}
    with Client(url) as admin:
        assert admin.update_weights(weights, version=3) == 3
    sampling = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}

    async def go():
        client = RemoteInferenceClient(proxy_url=url, server_urls=[url], data_parallel_size=1,
                                       model_name="tiny")
        try:
            return (await client.generate({"prompt_token_ids": [[4, 5, 6]],
                                           "sampling_params": sampling}))["response_ids"][0]
        finally:
            await client.teardown()

    ours = asyncio.run(go())
    with Engine("tiny") as local:
        local.update_weights(weights)
        assert ours == local.create_session(tokens=[4, 5, 6]).generate(
            params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)).tokens


def test_the_control_plane_needs_an_admin():
    with run_server([]) as u:  # an open server without --allow-open-admin
        for path in ("/pause", "/resume", "/sleep", "/wake_up", "/reset_prefix_cache"):
            assert httpx.post(u + path).status_code == 403, path
        r = httpx.post(u + "/inference/v1/generate", json={"token_ids": [1, 2],
                                                          "sampling_params": {"max_tokens": 2}})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2
        r = httpx.post(u + "/inference/v1/generate", json={
            "token_ids": [1], "sampling_params": {"max_tokens": 2, "best_of": 3}})
        assert r.status_code == 422  # a sampling option AgentOS lacks is refused, not ignored


def test_reset_prefix_cache_options(url):
    r = httpx.post(url + "/reset_prefix_cache", json={"reset_running_requests": True})
    assert r.status_code == 400 and "reset_running_requests" in r.json()["error"]["message"]
    assert httpx.post(url + "/reset_prefix_cache", json={"nope": 1}).status_code == 422
    httpx.post(url + "/inference/v1/generate", json={"token_ids": list(range(3, 40)),
                                                     "sampling_params": {"max_tokens": 2}})
    r = httpx.post(url + "/pause", params={"mode": "keep", "clear_cache": "true"})
    assert r.status_code == 200 and r.json()["cache_dropped"] > 0
    assert httpx.post(url + "/resume").status_code == 200
