"""verl 0.9 drives AgentOS: its own LLMServerManager launches AgentOS replicas (Ray actors)
under `ray.init(num_cpus=2)`, its LLMServerClient and GlobalRequestLoadBalancer send
multi-turn token-id generates, its plugin entry point finds the "agentos" rollout, and
its trainer-side adapter pushes weights.

verl pins transformers below 5.11, so these tests run in an environment of their own
(README: "verl"); where verl is not installed the module is skipped as a whole."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest

pytest.importorskip("verl", reason="verl runs in its own environment (README: verl)")
ray = pytest.importorskip("ray")

from omegaconf import OmegaConf  # noqa: E402
from verl.workers.config import RolloutConfig  # noqa: E402
from verl.workers.rollout.llm_server import LLMServerManager  # noqa: E402

from agentos import Engine, SamplingParams  # noqa: E402
from agentos.integrations.verl import AgentOSReplica, ServerAdapter, config_section  # noqa: E402
from hf_models import make_hf_checkpoint  # noqa: E402

GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
          "logprobs": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("verl") / "model", seed=3,
                                with_tokenizer=True)
    # verl's HFModelConfig loads the tokenizer with transformers < 5.11, which takes
    # special tokens as strings only
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = config["eos_token"]["content"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def manager(checkpoint):
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rollout = config_section(RolloutConfig(
        name="agentos", nnodes=1, n_gpus_per_node=2, tensor_model_parallel_size=1,
        prompt_length=64, response_length=12, max_model_len=256, max_num_seqs=16,
        max_num_batched_tokens=512, engine_kwargs={"agentos": {"kv_blocks": 256}}))
    model = OmegaConf.create({"_target_": "verl.workers.config.HFModelConfig", "path": checkpoint})
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": rollout, "model": model}})
    m = LLMServerManager.create(config)  # verl's own: replicas, load balancer
    yield m
    ray.shutdown()


def run(coro):
    return asyncio.run(coro)


def local_greedy(checkpoint, prompt, n, weights=None):
    with Engine(checkpoint, kv_blocks=64) as e:
        if weights is not None:
            e.update_weights(weights)
        return e.create_session(tokens=prompt).generate(
            params=SamplingParams(max_tokens=n, temperature=0.0)).tokens


def prefilled(handle) -> int:
    return ray.get(handle.stats.remote())["tokens_prefilled"]


def test_bench_rl_through_verls_client(checkpoint):
    """`agentos bench rl --client verl` (first: it names its replicas as the manager
    fixture does, and ends them): without the prefix cache every turn recomputes its
    whole history; with it, a follow-up computes only its suffix."""
    from agentos.bench import rl

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    b = rl.RLBench(model=checkpoint, client="verl", replicas=2, groups=2, samples=2, turns=2,
                   prompt_len=32, max_tokens=4, tool_tokens=4, tool_pause_ms=0, steps=1,
                   kv_blocks=128)
    out = rl.run(b)
    ours, peer = out["results"]["agentos"]["computed"], out["results"]["no prefix cache"]["computed"]
    assert peer == 4 * (32 + (32 + 4 + 4))  # 4 trajectories, two whole histories each
    # each group's prompt once per replica its samples went to, then 4 + 1 per follow-up
    assert 2 * 32 + 4 * 5 <= ours <= 4 * 32 + 4 * 5
    assert out["results"]["agentos"]["tokens"] == 4 * 2 * 4


def test_verl_launches_agentos_replicas(manager):
    replicas = manager.get_replicas()
    assert len(replicas) == 2 and all(isinstance(r, AgentOSReplica) for r in replicas)
    assert len(set(manager.get_addresses())) == 2


def test_multi_turn_through_verls_client_continues_the_session(manager, checkpoint):
    """8 three-turn trajectories, each turn the whole history re-sent under a fresh
    request id (what verl's client does): a follow-up turn computes only its suffix."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    client = manager.get_client()
    handles = manager.server_handles
    prompts = [[0, 11 + i, 42, 99, 5, 230 - i, 41, 8, 3 * i + 1] for i in range(8)]
    tool = [77, 78, 79]

    async def turn(i, history, sampling):
        return await client.generate(f"traj-{i}", prompt_ids=history, sampling_params=sampling)

    async def rollouts():
        histories = [list(p) for p in prompts]
        masks = [[] for _ in prompts]
        logprobs = [[] for _ in prompts]
        suffix_prefills = []
        outs = None
        for t in range(3):
            before = sum(prefilled(h) for h in handles)
            # the last turn leaves max_tokens to verl's rule (the configured response length)
            sampling = dict(GREEDY) if t == 2 else dict(GREEDY, max_tokens=4)
            outs = await asyncio.gather(*(turn(i, h, sampling) for i, h in enumerate(histories)))
            if t:
                suffix_prefills.append(sum(prefilled(h) for h in handles) - before)
            for i, out in enumerate(outs):
                tail = [] if t == 2 else tool
                histories[i] += out.token_ids + tail
                masks[i] += [1] * len(out.token_ids) + [0] * len(tail)
                logprobs[i] += out.log_probs + [0.0] * len(tail)
        return histories, masks, logprobs, suffix_prefills, outs

    histories, masks, logprobs, suffix_prefills, last = run(rollouts())
    # each follow-up computed the last sampled token (never written to KV) and the tool's
    # answer, nothing of what came before: 0 tokens re-prefilled beyond the new suffix
    assert suffix_prefills == [8 * (len(tool) + 1)] * 2
    for i, p in enumerate(prompts):
        out = AgentLoopOutput(prompt_ids=p, response_ids=histories[i][len(p):],
                              response_mask=masks[i], response_logprobs=logprobs[i],
                              num_turns=5, metrics=AgentLoopMetrics(),
                              extra_fields=last[i].extra_fields)
        batch = out.as_dict()
        assert batch["responses"].shape == batch["response_mask"].shape
        assert len(out.response_ids) == 4 + 3 + 4 + 3 + len(last[i].token_ids)
        # verl's default length: min(response_length, prompt + response - len(history))
        assert len(last[i].token_ids) == min(12, 64 + 12 - (len(histories[i]) - len(last[i].token_ids)))
    # greedy through verl and AgentOS's continuation equals one fresh run of the history
    assert histories[0][-len(last[0].token_ids):] == local_greedy(
        checkpoint, histories[0][:-len(last[0].token_ids)], len(last[0].token_ids))
    # both replicas served: the load balancer spread the trajectories
    assert all(prefilled(h) > 0 for h in handles)


def test_unsupported_inputs_are_refused_by_name(manager):
    client = manager.get_client()
    with pytest.raises(ValueError, match="best_of"):
        run(client.generate("bad-1", prompt_ids=[0, 5], sampling_params={"best_of": 2}))
    with pytest.raises(ValueError, match="image_data"):
        run(client.generate("bad-2", prompt_ids=[0, 5], sampling_params={},
                            image_data=["a picture"]))
    with pytest.raises(ValueError, match="no room"):
        run(client.generate("bad-3", prompt_ids=[3] * 256, sampling_params={}))


def test_weights_pushed_by_the_trainer_side_adapter(manager, checkpoint):
    from agentos.kernel.runner.loader import load_model

    model, _, _ = load_model(checkpoint, "cpu")
    weights = {k: v * 1.3 if k.endswith("norm.weight") else v
               for k, v in model.hf_named_tensors().items()}
    rollout = manager.get_replicas()[0].config
    os.environ.setdefault("RANK", "0")
    for rank in range(2):  # one trainer-side adapter per replica, as in hybrid mode
        adapter = ServerAdapter(rollout, manager.get_replicas()[rank].model_config, None,
                                replica_rank=rank)
        run(adapter.update_weights(iter(weights.items()), global_steps=7))
    prompt = [0, 9, 10, 11, 12]
    out = run(manager.get_client().generate("after-push", prompt_ids=prompt,
                                            sampling_params=dict(GREEDY, max_tokens=5)))
    assert out.extra_fields["global_steps"] == 7
    assert out.token_ids == local_greedy(checkpoint, prompt, 5, weights)
    assert out.token_ids != local_greedy(checkpoint, prompt, 5)


def test_abort_all_requests_then_resume(manager):
    client = manager.get_client()
    replicas = manager.get_replicas()
    result = {}

    def long_call():
        result["out"] = run(client.generate("long", prompt_ids=[0, 1, 2], sampling_params={
            "temperature": 1.0, "max_tokens": 200, "ignore_eos": True}))

    t = threading.Thread(target=long_call)
    t.start()
    deadline = 60
    while deadline and not any(
            ray.get(h.stats.remote())["queue"]["runnable"] for h in manager.server_handles):
        threading.Event().wait(0.05)
        deadline -= 0.05
    aborted = sum(run(r.abort_all_requests())["aborted_count"] for r in replicas)
    t.join(60)
    assert aborted == 1 and result["out"].stop_reason == "aborted"
    assert len(result["out"].token_ids) < 200
    for r in replicas:
        run(r.resume_generation())
    out = run(client.generate("after", prompt_ids=[0, 4], sampling_params={"max_tokens": 3}))
    assert out.stop_reason == "completed" and len(out.token_ids) == 3


def test_sleep_and_wake_up_keep_serving(manager):
    for r in manager.get_replicas():
        run(r.sleep())
        run(r.wake_up())
        run(r.clear_kv_cache())
    out = run(manager.get_client().generate("woken", prompt_ids=[0, 6, 7],
                                            sampling_params={"max_tokens": 2}))
    assert len(out.token_ids) == 2


def test_the_plugin_entry_point_registers_agentos():
    code = ("import verl; from verl.workers.rollout.replica import get_rollout_replica_class; "
            "from verl.workers.rollout.base import get_rollout_class; "
            "print(get_rollout_replica_class('agentos').__name__, "
            "get_rollout_class('agentos').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split() == ["AgentOSReplica", "ServerAdapter"], out.stderr[-3000:]
