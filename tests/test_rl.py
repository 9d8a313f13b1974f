"""Scoring, RL rollouts, weight updates, engine lifecycle and deterministic mode.

The references: transformers on the same weights (logits), the engine's own dense
forward (the trainer's view), and a fresh engine loaded with the new weights."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest
import torch

from agentos import AsyncEngine, Client, Engine, SamplingParams
from agentos.bench.api import run_server
from agentos.rl import RolloutWorker, Trajectory, group_advantages, to_trl

pytest.importorskip("transformers")
from hf_models import hf_logits, make_hf_checkpoint  # noqa: E402

PROMPT = list(range(3, 90))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("rl") / "m", "qwen2", seed=3)


def token_logprobs(logits: torch.Tensor, ids: list[int], start: int) -> list[float]:
    """logprob of ids[i] given ids[:i] for i >= start, from logits [T, V] of ids."""
    lp = torch.log_softmax(logits.float(), -1)[start - 1 : len(ids) - 1]
    return lp.gather(1, torch.tensor(ids[start:])[:, None]).squeeze(1).tolist()


def maxdiff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# -- scoring ------------------------------------------------------------------------------


def test_score_equals_rollout_logprobs_and_transformers(ckpt):
    with Engine(str(ckpt), kv_blocks=256) as e:
        s = e.create_session(tokens=PROMPT)
        g = s.generate(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
        ids = PROMPT + g.tokens
        ref = token_logprobs(hf_logits(ckpt, ids), ids, len(PROMPT))
        assert maxdiff(g.logprobs, ref) < 1e-5  # the rollout's own logprobs
        c = e.create_session(tokens=PROMPT)
        used = e.stats()["kv"]["device_blocks_used"]
        scored = c.score(tokens=g.tokens)
        assert maxdiff(scored, ref) < 1e-5
        # the session is unchanged and the scratch fork's pages are gone
        assert c.tokens == PROMPT and e.stats()["kv"]["device_blocks_used"] == used
        with torch.no_grad():  # the trainer's view: a dense forward of the same weights
            dense = token_logprobs(e.kernel.model.dense_logits(torch.tensor(ids)), ids, len(PROMPT))
        assert maxdiff(dense, ref) < 1e-5
        # a generated (not yet cached) last token is scored from the session's end too
        more = s.score(tokens=[5, 6, 7])
        ref2 = token_logprobs(hf_logits(ckpt, ids + [5, 6, 7]), ids + [5, 6, 7], len(ids))
        assert maxdiff(more, ref2) < 1e-5 and s.tokens == ids
        d = s.next_token_logprobs(top_k=5, candidates=[5, 9])
        last = torch.log_softmax(hf_logits(ckpt, ids)[-1], -1)
        assert d.top_ids == last.topk(5).indices.tolist()
        assert maxdiff(d.top_logprobs, last.topk(5).values.tolist()) < 1e-5
        assert maxdiff(d.candidate_logprobs, [last[5].item(), last[9].item()]) < 1e-5
        # the same position computed in chunks of different shapes: equal to fp32 rounding
        assert abs(d.candidate_logprobs[0] - s.score(tokens=[5])[0]) < 1e-5
        e.check()


def test_score_bad_input_and_busy(tiny_engine):
    s = tiny_engine.create_session(tokens=PROMPT)
    for bad in (lambda: s.score(tokens=[10**6]), lambda: s.score(tokens=[]),
                lambda: s.next_token_logprobs(top_k=-1),
                lambda: s.next_token_logprobs(top_k=0, candidates=[-1]),
                lambda: s.score(tokens=[1] * (tiny_engine.max_model_len + 1))):
        with pytest.raises(ValueError):
            bad()
    assert s.tokens == PROMPT
    s.close()
    tiny_engine.check()


@pytest.fixture(scope="module")
def tiny_engine():
    with Engine("tiny", kv_blocks=1024) as e:
        yield e


# -- deterministic mode -------------------------------------------------------------------


async def _alone_and_in_batch(deterministic: bool, params: SamplingParams):
    """The target session's Generation alone, then inside a batch of 31 others."""
    out = []
    for others in (0, 31):
        async with AsyncEngine("tiny", kv_blocks=2048, deterministic=deterministic,
                               max_batch_tokens=256) as e:
            rnd = random.Random(others)
            crowd = [await e.create_session(tokens=[rnd.randrange(3, 250)
                                                    for _ in range(rnd.randrange(5, 300))])
                     for _ in range(others)]
            s = await e.create_session(tokens=PROMPT)
            calls = [o.generate(max_tokens=rnd.randrange(8, 40), ignore_eos=True) for o in crowd]
            g, *_ = await asyncio.gather(s.generate(params=params), *calls)
            steps = (await e.stats())["steps"]
            if deterministic:  # a replay by score (a prefill) and the dense forward agree
                c = await e.create_session(tokens=PROMPT)
                assert await c.score(tokens=g.tokens) == g.logprobs
                ids = torch.tensor(PROMPT + g.tokens)
                with torch.no_grad():
                    dense = token_logprobs(e.kernel.model.dense_logits(ids), ids.tolist(), len(PROMPT))
                assert dense == g.logprobs
            out.append((g, steps))
    return out


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1234)])
async def test_deterministic_mode_is_batch_invariant(temperature, seed):
    params = SamplingParams(max_tokens=32, temperature=temperature, seed=seed, ignore_eos=True)
    (alone, s1), (crowded, s2) = await _alone_and_in_batch(True, params)
    assert s2 > s1  # the batch really shared steps with others (and chunked prefills)
    assert crowded.tokens == alone.tokens
    assert crowded.logprobs == alone.logprobs  # bit for bit


# -- rollouts -----------------------------------------------------------------------------


async def test_group_prefills_once_and_shares_prompt_blocks():
    async with AsyncEngine("tiny", kv_blocks=1024) as e:
        worker = RolloutWorker(e)
        prompt = list(range(3, 203))  # 200 tokens: 13 blocks of 16
        seen = []
        gate = asyncio.Event()
        arrived = 0

        async def agent(rs):
            nonlocal arrived
            arrived += 1
            if arrived == 16:
                seen.append(await e.stats())
                gate.set()
            await gate.wait()
            await rs.generate()

        before = (await e.stats())["tokens_prefilled"]
        group = await worker.generate_group(
            prompt, 16, SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True),
            agent_fn=agent, reward_fn=lambda t: float(t.response_ids.count(100)))
        st = await e.stats()
        assert st["tokens_prefilled"] - before == len(prompt)  # once, not 16 times
        assert seen[0]["kv"]["device_blocks_used"] == 13  # all 16 map the prompt's pages
        assert [t.repetition_id for t in group] == list(range(16))
        assert len({t.group_id for t in group}) == 1
        for t in group:
            assert t.prompt_ids == prompt and len(t.response_ids) == 8
            assert t.response_mask == [1] * 8 and t.weight_versions == [0] * 8
            assert t.stop_reason == "length" and t.num_turns == 1 and t.session_id is None
        assert len({tuple(t.response_ids) for t in group}) > 1  # seeds differ per repetition
        assert st["sessions"]["total"] == 0 and st["kv"]["device_blocks_used"] == 0
        await e.check()


async def test_multi_turn_rollout_masks_tool_output_and_converters():
    async with AsyncEngine("tiny", kv_blocks=1024) as e:
        worker = RolloutWorker(e)
        kept = []

        async def agent(rs):
            await rs.generate(max_tokens=4)
            await rs.append(text="<tool>42</tool>")
            g = await rs.generate(max_tokens=5)
            kept.append(await rs.session.get_tokens_and_mask())
            return g

        sampling = SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True)
        (t,) = await worker.generate_group("Q: 6*7?", 1, sampling, agent_fn=agent,
                                           reward_fn=_async_reward)
        tool = e.encode("<tool>42</tool>")
        assert t.response_mask == [1] * 4 + [0] * len(tool) + [1] * 5
        assert t.response_ids[4 : 4 + len(tool)] == tool
        assert t.num_turns == 2 and t.reward == 1.0
        assert t.weight_versions[4] is None and t.rollout_logprobs[4] == 0.0
        tokens, mask = kept[0]  # the session itself agrees with the trajectory
        assert tokens == t.prompt_ids + t.response_ids and mask[len(t.prompt_ids):] == t.response_mask
        v = t.to_verl()
        assert v["response_ids"] == t.response_ids and v["response_logprobs"] == t.rollout_logprobs
        assert v["reward_score"] == 1.0 and v["num_turns"] == 2
        trl = to_trl([t, t])
        assert trl["completion_ids"] == [t.response_ids] * 2
        assert len(trl["logprobs"][0]) == len(t.response_ids)
        assert group_advantages([1.0, 0.0, 1.0, 0.0]) == pytest.approx([1, -1, 1, -1], abs=1e-5)


async def _async_reward(t: Trajectory) -> float:
    return 1.0 if 0 in t.response_mask else 0.0


async def test_abort_keeps_kv_and_rollouts_continue_to_the_same_tokens():
    sampling = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    async with AsyncEngine("tiny", kv_blocks=1024) as e:
        ref = await RolloutWorker(e).generate_group(PROMPT, 2, sampling)
    async with AsyncEngine("tiny", kv_blocks=1024) as e:
        worker = RolloutWorker(e)
        task = asyncio.create_task(worker.generate_group(PROMPT, 2, sampling))
        while (await e.stats())["tokens_generated"] < 6:
            await asyncio.sleep(0.005)
        assert await worker.abort() == 2
        group = await task
        for t in group:
            assert t.stop_reason == "aborted" and t.session_id is not None
            assert 0 < len(t.response_ids) < 48
            assert (await (await e.session(t.session_id)).info())["state"] == "sleeping"
        prefilled = (await e.stats())["tokens_prefilled"]
        for t, r in zip(group, ref):
            await worker.continue_rollout(t, sampling)
            assert t.stop_reason == "length" and t.session_id is None
            assert t.response_ids == r.response_ids
        # the kept KV was used: only each session's last sampled token was computed again
        assert (await e.stats())["tokens_prefilled"] == prefilled
        await e.check()


def test_invariants_hold_with_a_score_in_flight(tiny_engine):
    s = tiny_engine.create_session(tokens=PROMPT)
    s.generate(max_tokens=2, temperature=0)
    tiny_engine.pause()
    box = {}
    th = threading.Thread(target=lambda: box.update(lp=s.score(tokens=list(range(5, 60)))))
    th.start()
    time.sleep(0.2)
    tiny_engine.check()  # the scratch fork's references are counted
    tiny_engine.resume()
    th.join(10)
    assert len(box["lp"]) == 55
    s.close()
    tiny_engine.check()
    assert tiny_engine.stats()["kv"]["device_blocks_used"] == 0


def test_pause_holds_calls_and_resume_releases_them(tiny_engine):
    s = tiny_engine.create_session(tokens=PROMPT)
    tiny_engine.pause()
    box = {}
    th = threading.Thread(target=lambda: box.update(g=s.generate(max_tokens=4, temperature=0)))
    th.start()
    time.sleep(0.3)
    assert "g" not in box and s.info()["state"] in ("runnable", "embryo")
    tiny_engine.resume()
    th.join(10)
    assert len(box["g"].tokens) == 4
    s.close()


@pytest.mark.parametrize("host_blocks", [4096, 0])
def test_sleep_releases_the_pool_and_sessions_survive(host_blocks):
    with Engine("tiny", kv_blocks=256, host_blocks=host_blocks) as e:
        s = e.create_session(tokens=PROMPT)
        s.generate(max_tokens=8, temperature=0)
        snap = s.snapshot()
        ref = e.restore(snap).generate(max_tokens=16, temperature=0).tokens
        e.sleep()
        st = e.stats()
        assert st["kv"]["device_blocks_used"] == 0
        assert e.kernel.runner.kv.numel() == 0
        assert s.info()["state"] == "swapped"
        e.wake_up()
        assert s.generate(max_tokens=16, temperature=0).tokens == ref
        assert e.restore(snap).generate(max_tokens=16, temperature=0).tokens == ref
        e.check()


# -- weight updates -----------------------------------------------------------------------


def _perturbed(model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen)
            for k, v in model.hf_named_tensors().items()}


def test_update_weights_recompute_equals_a_fresh_engine(ckpt, tmp_path):
    with Engine(str(ckpt), kv_blocks=256) as e:
        sessions = [e.create_session(tokens=PROMPT[: 20 + 13 * i]) for i in range(4)]
        for s in sessions:
            s.generate(max_tokens=6, temperature=1.0, seed=2, ignore_eos=True)
        snap = sessions[0].snapshot()
        new = _perturbed(e.kernel.model, 7)
        assert e.update_weights(new, version=3) == 3
        out = {s.id: s.generate(max_tokens=8, temperature=0, ignore_eos=True) for s in sessions}
        restored = e.restore(snap).generate(max_tokens=8, temperature=0, ignore_eos=True)
        tokens = {s.id: s.tokens for s in sessions}
        # the reference: a fresh engine on a checkpoint holding the new weights
        with Engine(str(ckpt), kv_blocks=256) as fresh:
            fresh.update_weights(new)
            for s in sessions:
                start = len(tokens[s.id]) - 8
                f = fresh.create_session(tokens=tokens[s.id][:start])
                g = f.generate(max_tokens=8, temperature=0, ignore_eos=True)
                assert g.tokens == out[s.id].tokens
                assert maxdiff(g.logprobs, out[s.id].logprobs) < 1e-5
            f = fresh.create_session(tokens=e.snapshots.records[snap.id].token_ids.tolist())
            assert f.generate(max_tokens=8, temperature=0, ignore_eos=True).tokens == restored.tokens
        assert all(g.weight_versions == [3] * 8 for g in out.values())
        assert sessions[0].info()["kv_version"] == 3
        e.check()


def test_update_weights_keep_and_bad_updates(tiny_engine):
    s = tiny_engine.create_session(tokens=PROMPT)
    s.generate(max_tokens=4, temperature=0)
    model = tiny_engine.kernel.model
    before = {k: v.clone() for k, v in model.hf_named_tensors().items()}
    v = tiny_engine.update_weights(_perturbed(model, 1), kv_policy="keep")
    assert s.info()["kv_version"] == v - 1  # it goes on with the KV it had
    snap = s.snapshot()
    (kid,) = s.fork(1)
    old = [kid, tiny_engine.restore(snap)]
    assert [x.info()["kv_version"] for x in old] == [v - 1, v - 1]
    assert tiny_engine.create_session(tokens=PROMPT).info()["kv_version"] == v  # no old pages
    g = s.generate(max_tokens=3, temperature=0)
    assert g.weight_versions == [v] * 3
    now = {k: t.clone() for k, t in model.hf_named_tensors().items()}
    bad = [{"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)},
           {"model.nope.weight": torch.zeros(1)}]
    for weights in bad:
        with pytest.raises(ValueError):
            tiny_engine.update_weights({**_perturbed(model, 2), **weights})
    with pytest.raises(ValueError):
        tiny_engine.update_weights({}, kv_policy="sometimes")
    after = model.hf_named_tensors()
    assert all(torch.equal(now[k], after[k]) for k in now)  # a refused update changed nothing
    tiny_engine.update_weights(before)
    for x in old:
        x.close()
    snap.delete()
    s.close()
    tiny_engine.check()


# -- over REST ----------------------------------------------------------------------------


def test_rollouts_scoring_and_weight_updates_over_rest():
    with run_server(["--kv-blocks", "1024", "--log-level", "warning", "--allow-open-admin"]) as url, \
            Client(url) as c, \
            Engine("tiny", kv_blocks=1024) as local:
        sampling = SamplingParams(max_tokens=6, temperature=1.0, seed=9, ignore_eos=True)
        remote = asyncio.run(RolloutWorker(c).generate_group(PROMPT, 4, sampling))
        here = asyncio.run(RolloutWorker(local).generate_group(PROMPT, 4, sampling))
        assert [t.response_ids for t in remote] == [t.response_ids for t in here]
        s = c.create_session(tokens=PROMPT)
        here_score = local.create_session(tokens=PROMPT).score(tokens=[7, 8])
        assert maxdiff(s.score(tokens=[7, 8]), here_score) < 1e-5
        assert c.session(s.id).next_token_logprobs(top_k=3).top_ids == \
            local.create_session(tokens=PROMPT).next_token_logprobs(top_k=3).top_ids
        new = _perturbed(local.kernel.model, 4)
        assert c.update_weights(new, version=5) == 5 and local.update_weights(new, version=5) == 5
        a = s.generate(max_tokens=8, temperature=0, ignore_eos=True)
        b = local.create_session(tokens=PROMPT).generate(max_tokens=8, temperature=0, ignore_eos=True)
        assert a.tokens == b.tokens and a.weight_versions == [5] * 8
        c.pause()
        c.resume()
        assert c.abort() == 0
        c.sleep()
        c.wake_up()
        assert len(s.generate(max_tokens=2).tokens) == 2
        r = httpx.post(url + "/v1/weights", content=b"garbage")  # not a safetensors file
        assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]


def test_engine_routes_need_an_admin_tenant():
    from fastapi.testclient import TestClient

    from agentos.api.app import ServerSettings, create_app
    from agentos.api.tenants import Tenants

    tenants = Tenants({"sk-a": "alice", "sk-root": "root"}, {"root": {"admin": True}})
    app = create_app(ServerSettings(), tenants=tenants)
    with TestClient(app) as http:
        for key, status in (("sk-a", 403), ("sk-root", 200)):
            r = http.post("/v1/engine/pause", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, r.text
        http.post("/v1/engine/resume", headers={"Authorization": "Bearer sk-root"})
        r = http.post("/v1/weights", content=b"x", headers={"Authorization": "Bearer sk-a"})
        assert r.status_code == 403 and r.json()["error"]["type"]


# -- examples -----------------------------------------------------------------------------


def test_grpo_example_raises_the_mean_reward(capsys):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "grpo_rollouts.py"))
    assert example["main"](["--iterations", "6", "--group-size", "8"]) == 0
    out = capsys.readouterr().out
    drifts = [float(line.split("drift ")[1].split()[0]) for line in out.splitlines() if "drift" in line]
    assert len(drifts) == 6 and max(drifts) < 1e-5  # trainer and rollout logprobs agree


def test_sync_backend_group_runs_in_one_batch():
    """With a blocking Engine every repetition still reaches the engine at once: the
    group's decode steps are about max_tokens, not n times that."""
    sampling = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    with Engine("tiny", kv_blocks=1024) as e:
        worker = RolloutWorker(e)
        asyncio.run(worker.generate_group(PROMPT, 16, sampling))  # starts the threads
        before = e.stats()["steps"]
        group = asyncio.run(worker.generate_group(PROMPT, 16, sampling))
        assert all(len(t.response_ids) == 8 for t in group)
        assert e.stats()["steps"] - before <= 12  # a handful of threads would take ~27
