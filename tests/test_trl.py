"""AgentOS as TRL's rollout engine: TRL's own GRPOTrainer trains with AgentOS rollouts,
in-process and against `agentos serve`, and the engine ends with the trainer's weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra: pip install 'agentos[trl]'")

from agentos import Engine  # noqa: E402
from agentos.bench.api import run_server  # noqa: E402
from agentos.integrations.trl import (  # noqa: E402
    TRLRollout,
    prompt_ids,
    repeated_runs,
    rollout_func,
    sampling_from_args,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("trl_grpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl_grpo"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(example, tmp_path_factory):
    return example.make_model(tmp_path_factory.mktemp("m"))


def _run(example, tmp_path, *argv) -> dict:
    out = tmp_path / "result.json"
    assert example.main([*argv, "--steps", "3", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _check_trained(result: dict) -> None:
    assert result["steps"] == 3
    assert len(result["mean_reward_per_step"]) == 3
    # pushed before the first rollout and after every optimizer step, versions = steps
    assert [(s, v) for s, v, _ in result["weight_pushes"]] == [(i, i) for i in range(4)]
    assert result["greedy_equal"] is True
    assert result["greedy_changed_by_training"] >= 1  # else the equality proves nothing


def test_grpo_trainer_in_process(example, tmp_path):
    _check_trained(_run(example, tmp_path))


def test_grpo_trainer_against_a_server(example, folder, tmp_path):
    with run_server(["--model", str(folder), "--allow-open-admin"]) as url:
        _check_trained(_run(example, tmp_path, "--model", str(folder), "--url", url, "--text"))


def test_a_server_without_admin_refuses_the_weights(example, folder, tmp_path):
    from agentos.kernel.errors import PermissionDeniedError

    with run_server(["--model", str(folder)]) as url, pytest.raises(PermissionDeniedError):
        example.main(["--model", str(folder), "--url", url, "--steps", "1"])


# -- the callable, with a stand-in for the trainer --------------------------------------


def _trainer(folder: Path, **args):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    config = GRPOConfig(output_dir="/tmp/unused", max_completion_length=6, temperature=1.0,
                        report_to="none", use_cpu=True, **args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return SimpleNamespace(args=config, processing_class=AutoTokenizer.from_pretrained(folder),
                           state=SimpleNamespace(global_step=0), model=model,
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                           chat_template=None, chat_template_kwargs={})


def test_each_repeated_prompt_is_prefilled_once_and_forked(folder):
    trainer = _trainer(folder)
    engine = Engine(model=str(folder))
    try:
        rollouts = rollout_func(engine)
        prompts = ["Say something."] * 4 + [[{"role": "user", "content": "Sing a song."}]] * 4
        before = engine.stats()["tokens_prefilled"]
        out = rollouts(prompts, trainer)
        prefilled = engine.stats()["tokens_prefilled"] - before
        ids = [prompt_ids(trainer, p) for p, _ in repeated_runs(prompts)]
        assert out["prompt_ids"] == [ids[0]] * 4 + [ids[1]] * 4
        assert prefilled == len(ids[0]) + len(ids[1])  # once per group, not per completion
        assert len(out["completion_ids"]) == len(out["logprobs"]) == 8
        for c, lp in zip(out["completion_ids"], out["logprobs"]):
            assert 1 <= len(c) == len(lp) <= 6 and all(x <= 0.0 for x in lp)
        assert "env_mask" not in out
        # the same step again: no second push
        rollouts(prompts[:4], trainer)
        assert [v.step for v in rollouts.versions] == [0]
    finally:
        engine.close()


def test_multi_turn_rollouts_mask_the_tool_tokens(folder):
    trainer = _trainer(folder)
    tool = [5, 6, 7]

    async def agent(rs):
        await rs.generate(max_tokens=3, ignore_eos=True)
        await rs.append(tokens=tool)  # the tool's answer
        await rs.generate(max_tokens=2, ignore_eos=True)

    engine = Engine(model=str(folder))
    try:
        out = TRLRollout(engine, agent_fn=agent)(["What is in the box?"] * 2, trainer)
    finally:
        engine.close()
    for ids, mask, lp in zip(out["completion_ids"], out["env_mask"], out["logprobs"]):
        assert mask == [1, 1, 1, 0, 0, 0, 1, 1] and ids[3:6] == tool and len(lp) == 8


def test_sampling_follows_the_trainer_and_refuses_what_it_cannot_do(folder):
    params = sampling_from_args(_trainer(folder, top_k=-1, top_p=0.9, min_p=0.1,
                                         repetition_penalty=1.2).args)
    assert (params.max_tokens, params.top_k, params.top_p, params.logprobs) == (6, 0, 0.9, True)
    assert (params.min_p, params.repetition_penalty) == (0.1, 1.2)
    with pytest.raises(ValueError, match="generation_kwargs"):
        sampling_from_args(_trainer(folder, generation_kwargs={"foo": 1}).args)


def test_repeated_runs():
    assert repeated_runs(["a", "a", "b", "b", "a"]) == [("a", 2), ("b", 2), ("a", 1)]
    chat = [{"role": "user", "content": "x"}]
    assert repeated_runs([chat, list(chat)]) == [(chat, 2)]


def test_a_peft_models_adapters_are_merged_into_the_pushed_weights(folder):
    """LoRA on the attention and a trained lm_head copy (modules_to_save): the engine gets
    the merged weights under the base names, and its greedy tokens are the merged model's
    argmax; the trainer's model keeps its adapters unmerged."""
    peft = pytest.importorskip("peft")
    trainer = _trainer(folder)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["lm_head"], init_lora_weights=False)
    names = set(dict(trainer.model.named_parameters()))
    model = peft.get_peft_model(trainer.model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
    trainer.model = model
    with Engine(model=str(folder)) as engine:
        rollouts = rollout_func(engine)
        push = rollouts.push_weights(trainer)
        assert push.tensors == len(names)
        prompt = [1, 40, 41, 42, 43]
        ours = engine.create_session(tokens=prompt).generate(
            max_tokens=6, temperature=0.0, ignore_eos=True).tokens
        with torch.no_grad():
            ids = list(prompt)
            for _ in range(6):  # the PEFT model as the trainer holds it: adapters active
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
        assert ours == ids[len(prompt):]
        assert not any(getattr(m, "merged", False) for m in model.modules())
