"""Structured output: JSON schemas, Lark grammars and regexes on the engine (the session
keeps its constraint across calls, forks and rollbacks), and on the OpenAI routes
(response_format, tools with every tool_choice) through the official `openai` client."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

import agentos
from agentos import Engine, SamplingParams
from agentos.bench.api import run_server

# bounded strings: the tiny model's weights are random, and an unbounded string of random
# characters rarely closes within a test's token budget
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet", "pst"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]


@pytest.fixture(scope="module")
def engine():
    with Engine("tiny", kv_blocks=4096) as e:
        yield e


def _json(params: dict) -> SamplingParams:
    return SamplingParams(max_tokens=256, temperature=1.0, **params)


def test_json_schema_outputs_validate_batched(engine):
    sessions = [engine.create_session(prompt=f"Person {i}: ", seed=i) for i in range(20)]
    with ThreadPoolExecutor(len(sessions)) as pool:
        gens = list(pool.map(lambda s: s.generate(params=_json({"json_schema": PERSON})), sessions))
    assert engine.stats()["steps"] < 20 * 40  # they ran batched
    for g in gens:
        assert g.finish_reason == "stop", g
        jsonschema.validate(json.loads(g.text), PERSON)
    assert len({g.text for g in gens}) > 10  # sampled, not one forced string
    # keys in the schema's order, compact separators
    assert all(g.text.startswith('{"name":') for g in gens)


def test_any_json_object_lark_grammar_and_regex(engine):
    s = engine.create_session(prompt="x", seed=3)
    g = s.generate(max_tokens=400, temperature=0.0, json_schema=True)
    if g.finish_reason == "stop":
        assert isinstance(json.loads(g.text), dict)
    else:  # greedy on random weights may nest forever: what exists is a JSON prefix
        assert g.text.startswith("{")
    g = s.generate(max_tokens=50, temperature=1.0, grammar='start: ("yes" | "no") "!"')
    assert g.text in ("yes!", "no!") and g.finish_reason == "stop"
    g = s.generate(max_tokens=50, temperature=1.0, regex=r"[0-9]{3}-[a-z]{2}")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", g.text) and g.finish_reason == "stop"


def test_forked_mid_json_and_rolled_back_every_branch_ends_valid(engine):
    s = engine.create_session(prompt="Record: ", seed=11)
    head = s.generate(params=SamplingParams(max_tokens=6, temperature=1.0, json_schema=PERSON))
    assert head.finish_reason == "length"  # cut mid-JSON: the constraint stays open
    snap = s.snapshot()
    kids = s.fork(n=4)
    with ThreadPoolExecutor(4) as pool:
        tails = list(pool.map(lambda k: k.generate(params=_json({"json_schema": PERSON})), kids))
    for t in tails:
        jsonschema.validate(json.loads(head.text + t.text), PERSON)
    assert len({t.text for t in tails}) > 1  # distinct branches
    first = s.generate(params=_json({"json_schema": PERSON}))
    s.rollback(snap)
    again = s.generate(params=_json({"json_schema": PERSON}))
    assert again.tokens == first.tokens  # the matcher is replayed: the same draws, exactly
    jsonschema.validate(json.loads(head.text + again.text), PERSON)
    # a restored copy of the snapshot continues the JSON too
    t = engine.restore(snap).generate(params=_json({"json_schema": PERSON}))
    jsonschema.validate(json.loads(head.text + t.text), PERSON)
    # a call with another constraint (or none) starts afresh at the session's end
    g = s.generate(max_tokens=20, temperature=1.0, regex="[ab]{4}")
    assert re.fullmatch("[ab]{4}", g.text)


def test_bad_constraints_are_refused_and_change_nothing(engine):
    s = engine.create_session(prompt="x")
    n = len(s.tokens)
    for kwargs, match in [({"grammar": "start: ("}, "does not compile"),
                          ({"json_schema": PERSON, "regex": "a"}, "at most one"),
                          ({"json_schema": [1]}, "JSON schema object"),
                          ({"regex": "a" * 70000}, "at most")]:
        with pytest.raises(agentos.InvalidRequestError, match=match):
            s.generate(max_tokens=4, **kwargs)
    assert len(s.tokens) == n
    # text appended into an open constraint must follow it
    s.generate(max_tokens=3, temperature=1.0, json_schema=PERSON)
    s.append(text="nope")
    with pytest.raises(agentos.InvalidRequestError, match="do not match"):
        s.generate(max_tokens=4, json_schema=PERSON)


@pytest.fixture(scope="module")
def url():
    with run_server(["--kv-blocks", "4096", "--log-level", "warning"]) as u:
        yield u


@pytest.fixture(scope="module")
def oai(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _validate_calls(calls, names=("get_weather", "get_time")):
    assert calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for c in calls:
        assert c.type == "function" and c.id and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])


def _twenty(fn):
    """fn(0..19), concurrently: the server batches them."""
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(fn, range(20)))


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_calls_parse_and_validate(oai, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    def one(i: int) -> None:
        # NOTE: one call per answer: with parallel calls allowed, the random weights rarely
        # choose to end after a call (parallel calls are checked below)
        kw = dict(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                  temperature=1.0, seed=i, max_tokens=300, parallel_tool_calls=False)
        if not stream:
            choice = oai.chat.completions.create(**kw).choices[0]
            assert choice.finish_reason == "tool_calls", choice
            _validate_calls(choice.message.tool_calls)
            return
        calls: dict[int, dict] = {}
        finish = None
        for chunk in oai.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": "",
                                                       "pieces": 0})
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
                    entry["pieces"] += bool(d.function.arguments)
                finish = c.finish_reason or finish
        assert finish == "tool_calls" and calls
        assert all(e["pieces"] > 1 for e in calls.values())  # the arguments stream as they grow
        for entry in calls.values():
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[entry["name"]]
            jsonschema.validate(json.loads(entry["arguments"]), schema)

    _twenty(one)


def test_parallel_tool_calls_cut_by_max_tokens_keep_the_complete_ones(oai):
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    tools=TOOLS, tool_choice="required", max_tokens=120, seed=0)
    choice = r.choices[0]
    _validate_calls(choice.message.tool_calls)
    assert choice.finish_reason in ("tool_calls", "length")


def test_named_none_and_auto_tool_choice(oai):
    messages = [{"role": "user", "content": "Time?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    r = oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                    tool_choice=named, max_tokens=200, seed=1,
                                    parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    _validate_calls(calls, names=("get_time",))
    r = oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                    tool_choice="none", max_tokens=8, seed=1)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None
    r = oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                    tool_choice="auto", max_tokens=8, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the conversation goes on with the call and its result in the history
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0].id, "type": "function",
             "function": {"name": "get_time", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "12:00"}]
    r = oai.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_validates(oai, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def one(i: int) -> None:
        kw = dict(model="tiny", messages=[{"role": "user", "content": f"Person {i}"}],
                  response_format=fmt, temperature=1.0, seed=i, max_tokens=300)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in
                           oai.chat.completions.create(stream=True, **kw) if c.choices)
        else:
            text = oai.chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)

    _twenty(one)


def test_unsupported_fields_are_400s_naming_them(oai):
    import openai

    base = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    cases = [
        (dict(functions=[{"name": "f"}]), "functions"),
        (dict(response_format={"type": "xml"}), "response_format"),
        (dict(tool_choice="required"), "tool_choice needs tools"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
         "response_format"),
    ]
    for extra, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            oai.chat.completions.create(**base, **extra)
    with pytest.raises(openai.BadRequestError, match="does not compile"):
        oai.chat.completions.create(**base, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})


def test_json_schema_with_a_bpe_tokenizer(tmp_path):
    """A HF checkpoint's byte-level BPE tokenizer (multi-byte tokens, llguidance reading its
    tokenizer.json): the outputs still validate."""
    from hf_models import make_hf_checkpoint

    path = make_hf_checkpoint(tmp_path / "m", "llama", with_tokenizer=True)
    with Engine(str(path), kv_blocks=512) as e:
        sessions = [e.create_session(prompt="data", seed=i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            gens = list(pool.map(lambda s: s.generate(params=_json({"json_schema": PERSON})),
                                 sessions))
    for g in gens:
        assert g.finish_reason == "stop", g
        jsonschema.validate(json.loads(g.text), PERSON)
    assert any(len(g.text) > len(g.tokens) for g in gens)  # tokens of several bytes were used


@pytest.mark.parametrize("fmt,text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P\\"a}ris", '
               '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
               '{"zone": "utc"}}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": [1, {"y": "]}"}]}}, '
                '{"arguments": {"a": 1}, "name": "g"}]'),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}}'),
])
def test_tool_call_stream_sends_names_then_growing_arguments(fmt, text):
    """However the text is cut, the deltas add up to the calls the whole text parses to:
    brackets and quotes inside strings do not confuse it; a call whose arguments come
    before its name is sent once the name is known."""
    from agentos.chat import FORMATS, ToolCallStream

    for step in (1, 3, 7, len(text)):
        stream = ToolCallStream(FORMATS[fmt])
        deltas = [d for i in range(0, len(text), step) for d in stream.push(text[i : i + step])]
        deltas += stream.end()
        got: dict[int, dict] = {}
        for d in deltas:
            entry = got.setdefault(d["index"], {"name": "", "arguments": ""})
            if "id" in d:
                assert d["type"] == "function" and d["id"].startswith("call_")
                entry["name"] += d["function"]["name"]
            entry["arguments"] += d["function"]["arguments"]
        _, want = FORMATS[fmt].parse(text)
        assert [(e["name"], json.loads(e["arguments"])) for e in got.values()] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want]


def test_vllm_structured_outputs_and_guided_fields_on_the_openai_routes(oai):
    import openai

    msgs = [{"role": "user", "content": "yes or no?"}]
    choices = ["yes", "no", 'say "hi"']
    r = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, extra_body={
        "structured_outputs": {"choice": choices}})
    assert r.choices[0].message.content in choices
    r = oai.completions.create(model="tiny", prompt="id:", max_tokens=20,
                               extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)
    r = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=200, extra_body={
        "guided_json": WEATHER})
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    with pytest.raises(openai.BadRequestError, match="not JSON"):
        oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                    extra_body={"guided_json": "latin-1"})
    with pytest.raises(openai.BadRequestError, match="each constrain the output"):
        oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                    response_format={"type": "json_object"},
                                    extra_body={"guided_regex": "a"})
