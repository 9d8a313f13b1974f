"""The sampling options RL frameworks and OpenAI clients send: repetition, presence and
frequency penalties, min-p, top_k=-1. Checked against transformers' own logits
processors and generate, against OpenAI's formula, and for exact replay."""

from __future__ import annotations

import json
from array import array

import pytest
import torch
from fastapi.testclient import TestClient

from agentos import Engine, SamplingParams
from agentos.api.app import ServerSettings, create_app
from agentos.engine import AsyncEngine
from agentos.kernel.errors import InvalidRequestError
from agentos.kernel.runner.sampler import _min_p, _penalize, sample
from hf_models import PAD, hf_model, make_hf_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("m"), "llama", seed=3)


def test_greedy_with_repetition_penalty_matches_hf_generate(folder):
    prompt = [5, 9, 17, 33, 9, 5, 60, 61]
    model = hf_model(str(folder))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), do_sample=False, max_new_tokens=24,
                             repetition_penalty=1.7, eos_token_id=None, pad_token_id=PAD)
    theirs = out[0, len(prompt):].tolist()
    with Engine(model=str(folder)) as engine:
        s = engine.create_session(tokens=prompt)
        ours = s.generate(max_tokens=24, temperature=0.0, ignore_eos=True,
                          repetition_penalty=1.7).tokens
        plain = engine.create_session(tokens=prompt).generate(
            max_tokens=24, temperature=0.0, ignore_eos=True).tokens
    assert ours == theirs
    assert ours != plain  # the penalty changed the answer: the check means something


def test_repetition_penalty_and_min_p_equal_transformers_processors():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    history = [array("i", [1, 2, 3, 2]), array("i", [7, 7]), array("i", [40, 0, 49])]
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 0.7, 2.0)]
    ours = _penalize(logits, params, [(h, len(h)) for h in history])
    for i, (h, p) in enumerate(zip(history, params)):
        ids = torch.tensor([list(h)])
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], ref[0])
    for m in (0.05, 0.3, 1.0):
        ref = MinPLogitsWarper(m)(None, logits.clone())
        ours = _min_p(logits.clone(), [m] * 3)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), m


def test_presence_and_frequency_count_this_calls_output_only():
    logits = torch.zeros(1, 10)
    tokens = array("i", [4, 4, 4, 5, 6, 6, 5])  # the call began at 3: it made 5, 6, 6, 5
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = _penalize(logits, [p], [(tokens, 3)])[0]
    expected = torch.zeros(10)
    expected[5] = expected[6] = -(0.5 + 2 * 0.25)  # the prompt's 4 is not penalized
    torch.testing.assert_close(out, expected)
    # the logprobs stay the model's: penalties only decide which token is chosen
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    chosen, lps, _ = sample(logits, [SamplingParams(temperature=0.0, frequency_penalty=2.0)],
                         [torch.Generator()], [(array("i", [0, 0]), 1)])
    assert chosen == [1]
    assert lps[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


def test_penalized_sampling_replays_exactly_after_rollback():
    params = SamplingParams(max_tokens=12, temperature=0.9, min_p=0.05, repetition_penalty=1.2,
                            presence_penalty=0.4, frequency_penalty=0.3, top_k=-1)
    with Engine() as engine:
        s = engine.create_session(tokens=[10, 11, 12, 13], seed=5)
        snap = s.snapshot()
        first = s.generate(params=params).tokens
        s.rollback(snap)
        assert s.generate(params=params).tokens == first


def test_bad_values_are_refused():
    for bad in ({"repetition_penalty": 0.0}, {"presence_penalty": 2.5},
                {"frequency_penalty": float("nan")}, {"min_p": 1.5}, {"top_k": -2}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    assert SamplingParams(top_k=-1).top_k == 0


def test_the_routes_take_them():
    engine = AsyncEngine("tiny", kv_blocks=1024)
    try:
        with TestClient(create_app(ServerSettings(), engine=engine)) as client:
            sid = client.post("/v1/sessions", json={"tokens": [1, 2, 3]}).json()["id"]
            r = client.post(f"/v1/sessions/{sid}/generate", json={
                "max_tokens": 4, "repetition_penalty": 1.2, "presence_penalty": 0.5,
                "frequency_penalty": 0.5, "min_p": 0.1, "top_k": -1})
            assert r.status_code == 200 and len(r.json()["tokens"]) == 4, r.text
            r = client.post(f"/v1/sessions/{sid}/generate", json={"presence_penalty": 3})
            assert r.status_code == 422, r.text
            r = client.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 4, "presence_penalty": 0.6,
                "frequency_penalty": 0.6, "repetition_penalty": 1.1, "min_p": 0.2, "top_k": -1})
            assert r.status_code == 200, r.text
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "frequency_penalty": -3})
            assert r.status_code == 422, r.text  # a validation error, as everywhere
    finally:
        engine.kernel.shutdown()


def test_logit_bias_matches_transformers_sequence_bias(folder):
    prompt = [5, 9, 17, 33, 9, 5, 60, 61]
    bias = {11: 6.0, 12: 4.5, 40: -3.0}
    model = hf_model(str(folder))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), do_sample=False, max_new_tokens=16,
                             sequence_bias={(t,): b for t, b in bias.items()}, eos_token_id=None,
                             pad_token_id=PAD)
    theirs = out[0, len(prompt):].tolist()
    with Engine(model=str(folder)) as engine:
        ours = engine.create_session(tokens=prompt).generate(
            max_tokens=16, temperature=0.0, ignore_eos=True, logit_bias=bias)
        plain = engine.create_session(tokens=prompt).generate(
            max_tokens=16, temperature=0.0, ignore_eos=True)
    assert ours.tokens == theirs
    assert ours.tokens != plain.tokens  # the bias changed the answer
    # the logprobs stay the model's: the bias only decides which token is chosen
    first = hf_model(str(folder))(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    assert ours.logprobs[0] == pytest.approx(first[ours.tokens[0]].item(), abs=1e-4)


def test_logit_bias_replays_exactly_after_rollback():
    with Engine("tiny") as engine:
        s = engine.create_session(tokens=[1, 2, 3], seed=4)
        snap = s.snapshot()
        params = SamplingParams(max_tokens=12, temperature=1.0, logit_bias={7: 3.0, 8: -100})
        first = s.generate(params=params).tokens
        s.rollback(snap)
        assert s.generate(params=params).tokens == first
        assert 8 not in first


def test_logit_bias_on_the_routes():
    engine = AsyncEngine("tiny", kv_blocks=1024)
    try:
        with TestClient(create_app(ServerSettings(), engine=engine)) as client:
            r = client.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 5, "temperature": 0, "logit_bias": {"77": 100}})
            assert r.status_code == 200, r.text
            sid = client.post("/v1/sessions", json={"tokens": [1, 2, 3]}).json()["id"]
            r = client.post(f"/v1/sessions/{sid}/generate", json={
                "max_tokens": 5, "temperature": 0.7, "logit_bias": {"77": 100}})
            assert r.json()["tokens"] == [77] * 5
            r = client.post("/inference/v1/generate", json={
                "token_ids": [1, 2], "sampling_params": {"max_tokens": 3, "logit_bias": {"9": 100}}})
            assert r.json()["choices"][0]["token_ids"] == [9, 9, 9]
            for bad, status in (({"77": 101}, 422), ({"x": 1}, 400), ({"-3": 1}, 400),
                                ({str(i): 1 for i in range(1025)}, 422),
                                ({"1000000": 5}, 400)):
                r = client.post(f"/v1/sessions/{sid}/generate", json={"logit_bias": bad})
                assert r.status_code == status, (bad if len(bad) < 5 else len(bad), r.text)
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "logit_bias": {"1000000": 5}})
            assert r.status_code == 400 and "logit_bias" in r.text
    finally:
        engine.kernel.shutdown()


def test_top_logprobs_are_the_models_likeliest_tokens(folder):
    from hf_models import hf_logits

    prompt = [5, 9, 17, 33, 9, 5, 60, 61]
    with Engine(model=str(folder)) as engine:
        g = engine.create_session(tokens=prompt).generate(params=SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True, top_logprobs=4))
        chunks = list(engine.create_session(tokens=prompt).generate(params=SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True, top_logprobs=4), stream=True))
        plain = engine.create_session(tokens=prompt).generate(max_tokens=6, temperature=0.0,
                                                              ignore_eos=True)
    assert plain.top_logprobs is None  # only when asked
    ref = hf_logits(folder, prompt + g.tokens[:-1])[len(prompt) - 1:].log_softmax(-1)
    assert len(g.top_logprobs) == 6
    for j, top in enumerate(g.top_logprobs):
        values, ids = ref[j].topk(4)
        assert [t for t, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([x for _, x in top]), values, atol=1e-4, rtol=0)
        assert top[0] == (g.tokens[j], g.logprobs[j])  # greedy: the likeliest is the chosen
    assert [c.top_logprobs for c in chunks[:-1]] == g.top_logprobs
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_logprobs=21)


def test_top_logprobs_on_the_openai_routes():
    engine = AsyncEngine("tiny", kv_blocks=1024)
    try:
        with TestClient(create_app(ServerSettings(), engine=engine)) as client:
            msgs = [{"role": "user", "content": "hi"}]
            r = client.post("/v1/chat/completions", json={
                "messages": msgs, "max_tokens": 3, "logprobs": True, "top_logprobs": 3})
            content = r.json()["choices"][0]["logprobs"]["content"]
            assert len(content) == 3
            for entry in content:
                tops = entry["top_logprobs"]
                assert len(tops) == 3 and tops[0]["logprob"] >= tops[1]["logprob"] >= tops[2]["logprob"]
                assert entry["logprob"] <= tops[0]["logprob"]
            r = client.post("/v1/chat/completions", json={
                "messages": msgs, "max_tokens": 3, "top_logprobs": 3})
            assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
            r = client.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": 2})
            lp = r.json()["choices"][0]["logprobs"]
            assert all(2 <= len(d) <= 3 for d in lp["top_logprobs"])
            for d, piece, x in zip(lp["top_logprobs"], lp["tokens"], lp["token_logprobs"]):
                assert d[piece] == x
            with client.stream("POST", "/v1/chat/completions", json={
                    "messages": msgs, "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
                    "stream": True}) as s:
                events = [line for line in s.iter_lines() if line.startswith("data: {")]
            tops = [e for e in events if '"top_logprobs": [{' in e or '"top_logprobs":[{' in e]
            assert len(tops) == 2
            sid = client.post("/v1/sessions", json={"tokens": [1, 2, 3]}).json()["id"]
            r = client.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 2, "top_logprobs": 5})
            assert [len(t) for t in r.json()["top_logprobs"]] == [5, 5]
            r = client.post(f"/v1/sessions/{sid}/generate", json={"top_logprobs": 21})
            assert r.status_code == 422
    finally:
        engine.kernel.shutdown()


def test_vllm_generate_route_top_logprobs_and_structured_outputs():
    engine = AsyncEngine("tiny", kv_blocks=1024)
    try:
        with TestClient(create_app(ServerSettings(), engine=engine)) as client:
            body = {"token_ids": [1, 2, 3], "sampling_params": {
                "max_tokens": 3, "temperature": 0, "logprobs": 4}}
            content = client.post("/inference/v1/generate", json=body).json()[
                "choices"][0]["logprobs"]["content"]
            ref = client.post("/v1/sessions/" + client.post(
                "/v1/sessions", json={"tokens": [1, 2, 3]}).json()["id"] + "/generate",
                json={"max_tokens": 3, "temperature": 0, "top_logprobs": 4}).json()["top_logprobs"]
            assert [[(t["token_id"], t["logprob"]) for t in c["top_logprobs"]] for c in content] \
                == [[tuple(x) for x in top] for top in ref]
            schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}},
                      "required": ["k"], "additionalProperties": False}
            r = client.post("/inference/v1/generate", json={"token_ids": [1, 2], "sampling_params": {
                "max_tokens": 40, "structured_outputs": {"json": schema}}})
            assert json.loads(r.json()["choices"][0]["text"])["k"] in ("a", "b")
            r = client.post("/inference/v1/generate", json={"token_ids": [1, 2], "sampling_params": {
                "max_tokens": 40, "structured_outputs": {"choice": ["ab", "cd"]}}})
            assert r.json()["choices"][0]["text"] in ("ab", "cd")
            r = client.post("/inference/v1/generate", json={"token_ids": [1, 2], "sampling_params": {
                "max_tokens": 40, "structured_outputs": {"structural_tag": "x"}}})
            assert r.status_code == 400 and "structured_outputs" in r.text
    finally:
        engine.kernel.shutdown()
