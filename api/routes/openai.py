"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each request runs on a session: a fresh one (closed afterwards unless `keep_session`), or
the one named by the extra field `session`, which the prompt / messages are appended to
so an agent continues its conversation without re-sending it. With n > 1 the prompt is
prefilled once and forked n ways. Extra fields: session, keep_session, top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids. Chat takes tools, tool_choice,
parallel_tool_calls and response_format (see chat_completions). Logprobs are the model's (before
penalties, bias and temperature): the chosen token's and, with chat's top_logprobs or
completions' logprobs number, the k likeliest tokens at each position.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from agentos.api import deps
from agentos.api.routes.sessions import sampling_params, structured_fields, until_disconnected
from agentos.api.schemas import ERRORS, LogitBias, TokenId
from agentos.api.tenants import Tenant
from agentos.api.wire import EventStream, error_body, sse
from agentos.chat import MAX_TOOLS, ToolCallStream, ToolFormat, render_chat, tool_format
from agentos.kernel.errors import AgentOSError, APIStatusError, InvalidRequestError, NotFoundError
from agentos.session import Session

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)


# OpenAI fields this server does not implement: a 400 naming the field, never ignored
_UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options")


class _Sampling(BaseModel):
    # NOTE: other fields are kept (not validated) so that _check_model can refuse the
    # unsupported ones by name with a 400
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    user: str | None = None
    # extra fields
    session: str | None = None  # continue this session (appending the new prompt)
    keep_session: bool = False  # keep the new session open and return its id
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    logit_bias: LogitBias | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}
    response_format: dict[str, Any] | None = None
    # vLLM's: {"json" | "json_object" | "regex" | "grammar" | "choice": ...}, and its
    # older guided_* fields
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls

    def flat(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else "".join(
            p.text for p in self.content)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: Function


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "agentos"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models", response_model=ModelList)
async def models(t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine),
                 settings=Depends(deps.settings)):
    return {"data": [{"id": settings.model_name, "created": settings.started_at,
                      "max_model_len": engine.max_model_len}]}


_STREAMS = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                  "description": "the completion, or with stream: server-sent events"}}


@router.post("/completions", responses=_STREAMS)
async def completions(body: CompletionRequest, request: Request, t: Tenant = Depends(deps.tenant),
                      engine=Depends(deps.engine), settings=Depends(deps.settings)):
    _check_model(body, settings)
    if isinstance(body.prompt, str):
        ids = await engine.encode_async(body.prompt, body.session is None)
    else:
        ids = list(body.prompt)
    run = _Run(engine, t, settings, body, ids, "cmpl-", "text_completion", request)
    return await run.respond(chat=False)


@router.post("/chat/completions", responses=_STREAMS)
async def chat_completions(body: ChatRequest, request: Request, t: Tenant = Depends(deps.tenant),
                           engine=Depends(deps.engine), settings=Depends(deps.settings)):
    """OpenAI's chat completions. `tools` are rendered by the model's chat template;
    `tool_choice` "auto" (the default with tools) parses the calls the model writes,
    "required" or a named function constrain the output to calls whose arguments follow
    the function's parameter schema (one call, or several with `parallel_tool_calls`),
    "none" parses nothing. Calls come back as `tool_calls` with finish_reason "tool_calls"
    (streamed as OpenAI does: each call's name once written, then its arguments as they
    grow; content before the calls streams as it comes). The
    formats: `<tool_call>` JSON (Qwen, Hermes and the default template), Mistral's
    `[TOOL_CALLS]`, Llama 3's JSON with "parameters". `response_format` json_object /
    json_schema constrains the content to JSON (to the schema). Unsupported fields
    (functions, function_call, audio, prediction, web_search_options, modalities other
    than text) are a 400 naming them."""
    _check_model(body, settings)
    tools, calls = _tool_plan(body, engine.tokenizer)
    text = render_chat([m.flat() for m in body.messages], engine.tokenizer,
                       tools=[t.model_dump(exclude_none=True) for t in body.tools or []])
    # a model's own template writes its BOS text; the default template needs one added
    fresh = body.session is None and engine.tokenizer.chat_template is None
    ids = await engine.encode_async(text, fresh)
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    run = _Run(engine, t, settings, body, ids, "chatcmpl-", "chat.completion", request,
               tools=tools, tool_grammar=calls)
    return await run.respond(chat=True)


def _tool_plan(body: ChatRequest, tokenizer) -> tuple[ToolFormat | None, str | None]:
    """(the format to parse tool calls in, or None: no parsing; the grammar the output
    must follow, or None) from tools and tool_choice: "none" parses nothing, "auto"
    parses what the model writes, "required" and a named function constrain the output
    to calls (of that function) whose arguments follow its parameters' schema."""
    choice = body.tool_choice
    if body.tools is None:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools")
        return None, None
    if choice is None:
        choice = "auto"
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: function names must be unique")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InvalidRequestError(f"tool_choice names no function of tools: {choice!r}")
        functions = [f for f in functions if f["name"] == name]
    elif choice not in ("none", "auto", "required"):
        raise InvalidRequestError(f"tool_choice must be none, auto, required or a function, "
                                  f"not {choice!r}")
    if choice == "none":
        return None, None
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise InvalidRequestError("response_format with tools is supported only with "
                                  "tool_choice none")
    fmt = tool_format(tokenizer)
    if choice == "auto":
        return fmt, None
    return fmt, fmt.grammar(functions, body.parallel_tool_calls and not isinstance(choice, dict))


def _constraint(body, tool_grammar: str | None) -> dict[str, Any]:
    """The SamplingParams constraint of a request: tool calls, response_format, or vLLM's
    structured_outputs / guided_* fields; more than one is a 400."""
    given = {}
    if tool_grammar is not None:
        given["tools"] = {"grammar": tool_grammar}
    if (schema := _response_format(body)) is not None:
        given["response_format"] = {"json_schema": schema}
    legacy = {"json": body.guided_json, "regex": body.guided_regex,
              "grammar": body.guided_grammar, "choice": body.guided_choice}
    if any(v is not None for v in legacy.values()):
        given["guided_*"] = structured_fields(legacy)
    if body.structured_outputs:
        given["structured_outputs"] = structured_fields(body.structured_outputs)
    if len(given) > 1:
        raise InvalidRequestError(f"{' and '.join(given)} each constrain the output: give one")
    return next(iter(given.values()), {})


def _response_format(body) -> dict | bool | None:
    """The json_schema constraint of response_format (True: any JSON object), or None."""
    rf = body.response_format
    if rf is None or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return True
    if rf.get("type") == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("response_format json_schema needs a json_schema object")
        schema = spec.get("schema", True)
        if schema is not True and not isinstance(schema, dict):
            raise InvalidRequestError("response_format json_schema.schema must be an object")
        return schema
    raise InvalidRequestError(f"response_format type must be text, json_object or json_schema, "
                              f"not {rf.get('type')!r}")


def _check_model(body: _Sampling, settings) -> None:
    extra = body.model_extra or {}
    given = [f for f in _UNSUPPORTED if extra.get(f) is not None]
    if extra.get("modalities") not in (None, ["text"]):
        given.append("modalities")
    if given:
        raise InvalidRequestError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} "
                                  "not supported by this server")
    if body.model is not None and body.model not in (settings.model_name, settings.model):
        raise NotFoundError(f"the model {body.model!r} does not exist; this server serves "
                            f"{settings.model_name!r}")
    if body.session is not None and body.n > 1:
        raise InvalidRequestError("n > 1 cannot continue a session: fork it first")


class _Run:
    """One OpenAI-style request: its sessions, their generations, the response."""

    def __init__(self, engine, tenant: Tenant, settings, body, ids: list[int], prefix: str,
                 object_name: str, request: Request, tools: ToolFormat | None = None,
                 tool_grammar: str | None = None):
        self.engine, self.tenant, self.settings, self.body = engine, tenant, settings, body
        self.tools = tools  # parse the output for tool calls in this format
        self.request = request
        self.ids = ids
        self.id = prefix + uuid.uuid4().hex[:24]
        self.object = object_name
        self.created = int(time.time())
        max_tokens = body.max_tokens
        if max_tokens is None:  # as much as the context allows, within the server's cap
            max_tokens = settings.max_tokens_cap or engine.max_model_len
        fields = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "top_k": body.top_k, "min_p": body.min_p,
                  "repetition_penalty": body.repetition_penalty,
                  "presence_penalty": body.presence_penalty,
                  "frequency_penalty": body.frequency_penalty, "seed": body.seed, "stop": body.stop,
                  "stop_token_ids": body.stop_token_ids, "ignore_eos": body.ignore_eos,
                  "logprobs": bool(body.logprobs), "logit_bias": body.logit_bias,
                  "top_logprobs": _top_k(body), **_constraint(body, tool_grammar)}
        self.params = sampling_params(fields, settings.max_tokens_cap)
        self.sessions: list[Session] = []
        self.temporary: list[Session] = []
        self.prompt_len = 0
        self.append: list[int] | None = None  # a continued session's new tokens

    async def respond(self, chat: bool):
        n = self.body.n
        release = await self.tenant.reserve(
            self.engine, sessions=0 if self.body.session else n + (n > 1),
            tokens=(n + 1) * len(self.ids) + n * self.params.max_tokens)
        streaming = False
        try:
            await self._open()
            if not self.body.stream:
                gens = await until_disconnected(self.request, asyncio.gather(
                    *(s.generate(params=self.params, append=self.append) for s in self.sessions)))
                return self._response(gens, chat)
            streams = [await s.generate(params=self.params, stream=True, append=self.append)
                       for s in self.sessions]
            streaming = True
        finally:
            if not streaming:  # else the stream closes them when it ends
                await self._close(release)

        async def on_close():  # however the stream ends, even before it began
            for s in streams:
                await s.aclose()
            await self._close(release)

        return EventStream(self._events(streams, chat), on_close)

    async def _open(self) -> None:
        """Finds or creates the session(s); forks n ways when n > 1. Marks the sessions
        to close at the end (all new ones, unless keep_session keeps those that generate)."""
        t, engine, n = self.tenant, self.engine, self.body.n
        if self.body.session is not None:
            s = Session(engine, await t.session(engine, self.body.session))
            # the new tokens go in with the generate call: one step for both (n is 1 here)
            self.prompt_len = await engine.num_tokens([s.id]) + len(self.ids)
            self.append = self.ids or None
            self.sessions = [s]
            return
        if not self.ids:
            raise InvalidRequestError("the prompt is empty")
        s = await engine.create_session(tokens=self.ids, seed=self.body.seed, owner=t.name)
        self.prompt_len = len(self.ids)
        self.temporary = [s]
        self.sessions = [s] if n == 1 else await s.fork(n=n)
        if n > 1:
            self.temporary += self.sessions
        if self.body.keep_session:
            self.temporary = [c for c in self.temporary if c not in self.sessions]

    async def _close(self, release) -> None:
        for s in self.temporary:
            with contextlib.suppress(AgentOSError):
                await s.close()
        self.temporary = []
        release()

    def _kept(self, i: int) -> str | None:
        s = self.sessions[i]
        return None if s in self.temporary else s.id

    def _usage(self, num_generated: list[int]) -> dict:
        completion = sum(num_generated)
        return {"prompt_tokens": self.prompt_len, "completion_tokens": completion,
                "total_tokens": self.prompt_len + completion}

    def _logprobs(self, tokens: list[int], logprobs: list[float] | None, chat: bool,
                  tops: list | None = None):
        """OpenAI's logprobs object: each chosen token's logprob and, when asked, the k
        likeliest tokens at that position (chat: exactly k; completions: the k and the
        chosen one, as vLLM answers)."""
        if not self.body.logprobs or logprobs is None:
            return None
        pieces = [self.engine.decode([t]) for t in tokens]
        alts = tops or [[] for _ in tokens]
        if chat:
            return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()),
                                 "top_logprobs": [self._entry(t, x) for t, x in alt]}
                                for p, lp, alt in zip(pieces, logprobs, alts)]}
        offsets, pos = [], 0
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        top = [{**{self.engine.decode([t]): x for t, x in alt}, p: lp}
               for p, lp, alt in zip(pieces, logprobs, alts)]
        return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": top,
                "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict:
        piece = self.engine.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    def _response(self, gens, chat: bool) -> dict:
        choices = []
        for i, g in enumerate(gens):
            choice: dict[str, Any] = {"index": i, "finish_reason": g.finish_reason,
                                      "logprobs": self._logprobs(g.tokens, g.logprobs, chat,
                                                                 g.top_logprobs)}
            if chat:
                choice["message"] = {"role": "assistant", "content": g.text}
                content, calls = self.tools.parse(g.text) if self.tools else (g.text, [])
                if calls:
                    choice["message"] = {"role": "assistant", "content": content,
                                         "tool_calls": calls}
                    if g.finish_reason == "stop":
                        choice["finish_reason"] = "tool_calls"
            else:
                prefix = self.engine.decode(self.ids) if self.body.echo else ""
                choice["text"] = prefix + g.text
            if (kept := self._kept(i)) is not None:
                choice["session_id"] = kept
            choices.append(choice)
        out = {"id": self.id, "object": self.object, "created": self.created,
               "model": self.settings.model_name, "choices": choices,
               "usage": self._usage([len(g.tokens) for g in gens])}
        if len(self.sessions) == 1 and (kept := self._kept(0)) is not None:
            out["session_id"] = kept
        return out

    def _chunk(self, i: int, chat: bool, text: str | None, finish_reason: str | None,
               token: int | None = None, logprob: float | None = None, first: bool = False,
               top: list | None = None) -> str:
        choice: dict[str, Any] = {"index": i, "finish_reason": finish_reason, "logprobs": None}
        if token is not None and logprob is not None:
            choice["logprobs"] = self._logprobs([token], [logprob], chat,
                                                None if top is None else [top])
        if chat:
            choice["delta"] = ({"role": "assistant", "content": text or ""} if first
                               else {} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        if finish_reason is not None and (kept := self._kept(i)) is not None:
            choice["session_id"] = kept
        return self._event([choice], chat)

    def _calls_chunk(self, i: int, deltas: list[dict]) -> str:
        return self._event([{"index": i, "finish_reason": None, "logprobs": None,
                             "delta": {"tool_calls": deltas}}], chat=True)

    def _event(self, choices: list[dict], chat: bool, **extra) -> str:
        chunk = {"id": self.id, "object": self.object + ".chunk" if chat else self.object,
                 "created": self.created, "model": self.settings.model_name, "choices": choices,
                 **extra}
        return sse(chunk)

    async def _events(self, streams, chat: bool):
        """Interleaves the n streams' chunks as they come; ends with [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for c in stream:
                    await queue.put((i, c))
            except AgentOSError as e:
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        num_generated = [0] * len(streams)
        held = [_HeldCalls(self.tools, self.params.grammar is not None) if self.tools else None
                for _ in streams]
        try:
            if chat:
                for i in range(len(streams)):
                    yield self._chunk(i, chat, "", None, first=True)
            if not chat and self.body.echo:
                for i in range(len(streams)):
                    yield self._chunk(i, chat, self.engine.decode(self.ids), None)
            live = len(streams)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, AgentOSError):
                    err = item if isinstance(item, APIStatusError) else APIStatusError(str(item), 500)
                    yield sse(error_body(err))
                elif item.finish_reason is not None:
                    reason = item.finish_reason
                    if (h := held[i]) is not None:
                        content, deltas, called = h.end()
                        if content:
                            yield self._chunk(i, chat, content, None)
                        if deltas:
                            yield self._calls_chunk(i, deltas)
                        if called and reason == "stop":
                            reason = "tool_calls"
                    yield self._chunk(i, chat, None if chat else "", reason)
                else:
                    num_generated[i] += item.token is not None
                    text, deltas = item.text, []
                    if held[i] is not None:
                        content, deltas = held[i].push(item.text)
                        text = content or None
                    yield self._chunk(i, chat, text, None, item.token, item.logprob,
                                      top=item.top_logprobs)
                    if deltas:
                        yield self._calls_chunk(i, deltas)
            if (self.body.stream_options or {}).get("include_usage"):
                yield self._event([], chat, usage=self._usage(num_generated))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _HeldCalls:
    """A streamed choice's text when tools are on: content streams until the text could
    be tool calls (all of it is calls when the output is constrained to them); from there
    the calls stream as tool_calls deltas (ToolCallStream): a call's name once written,
    then its arguments as they grow. Text held as possible calls that turns out to hold
    none is sent as content at the end."""

    def __init__(self, fmt: ToolFormat, only_calls: bool):
        self.fmt, self.text = fmt, ""
        self.calls: ToolCallStream | None = ToolCallStream(fmt) if only_calls else None

    def push(self, delta: str) -> tuple[str, list[dict]]:
        """Takes a text delta; returns (the content, the tool_calls deltas) to send now."""
        if self.calls is not None:
            return "", self.calls.push(delta)
        self.text += delta
        at = self.text.find(self.fmt.start)
        if at >= 0:
            out, rest, self.text = self.text[:at], self.text[at:], ""
            self.calls = ToolCallStream(self.fmt)
            return out, self.calls.push(rest)
        # hold back a tail that could still grow into the start of a call
        keep = next((k for k in range(min(len(self.fmt.start) - 1, len(self.text)), 0, -1)
                     if self.fmt.start.startswith(self.text[-k:])), 0)
        out, self.text = self.text[: len(self.text) - keep], self.text[len(self.text) - keep :]
        return out, []

    def end(self) -> tuple[str, list[dict], bool]:
        """(content still held, the last tool_calls deltas, whether there were calls)."""
        if self.calls is None:
            return self.text, [], False
        deltas = self.calls.end()
        if not any(c["id"] for c in self.calls.calls):
            return self.calls.text, [], False
        return "", deltas, True


def _top_k(body) -> int:
    """Alternatives per token: chat's top_logprobs (which needs logprobs: true, as OpenAI
    requires), completions' logprobs number."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
        return body.top_logprobs or 0
    return body.logprobs or 0
