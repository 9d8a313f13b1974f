"""vLLM's own HTTP endpoints, the ones remote-engine RL clients speak (SkyRL's
`RemoteInferenceClient`, vLLM routers): token ids in, token ids out, and the control
plane's pause/resume/sleep/wake_up.

- `POST /inference/v1/generate` `{"token_ids", "sampling_params", "model"}` answers
  `{"choices": [{"token_ids", "finish_reason", "logprobs": {"content": [{"logprob"}]}}]}`
  (with `logprobs: k > 0`, each entry also lists the k likeliest tokens as
  `top_logprobs: [{"token_id", "logprob"}]`; `structured_outputs` constrains the output to
  a JSON schema, any JSON object, a regex or a Lark grammar).
  Each call runs on a session of its own that closes when it ends; a later call whose
  tokens continue the same history (an agent's next turn, re-sent in full) maps the KV
  the last one left in the prefix cache and computes only what is new, so the
  `X-Session-ID` header a router uses to keep a conversation on one replica needs no
  state here.
- `POST /tokenize`, `POST /detokenize`, `GET /get_world_size`, `POST /finish_session`.
- `POST /pause?mode=keep|abort|wait`, `/resume`, `/sleep?level=`, `/wake_up`,
  `/reset_prefix_cache`: the engine as a whole, so admin only (on a server without keys:
  --allow-open-admin).

Every path here is authenticated like those under /v1/ (AuthMiddleware.PATHS).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from agentos.api import deps
from agentos.api.routes.engine import admin
from agentos.api.routes.sessions import sampling_params, structured_fields, until_disconnected
from agentos.api.schemas import ERRORS, LogitBias, TokenId
from agentos.api.tenants import Tenant
from agentos.kernel.errors import InvalidRequestError

router = APIRouter(tags=["vllm"], responses=ERRORS)


class VLLMSampling(BaseModel):
    """The sampling_params vLLM takes that AgentOS has; others are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    logit_bias: LogitBias | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # any number: the chosen token's
    n: Literal[1] = 1
    skip_special_tokens: bool = True  # token ids out: nothing to skip
    include_stop_str_in_output: bool = False
    # {"json": schema} | {"json_object": true} | {"regex": ...} | {"grammar": Lark} |
    # {"choice": [strings]}
    structured_outputs: dict[str, Any] | None = None


class InferenceGenerate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    token_ids: Annotated[list[TokenId], Field(min_length=1)]
    sampling_params: VLLMSampling = VLLMSampling()
    model: str | None = None


@router.post("/inference/v1/generate")
async def inference_generate(body: InferenceGenerate, request: Request,
                             t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine),
                             settings=Depends(deps.settings)) -> dict[str, Any]:
    """Continues token_ids; see the module docstring."""
    sp = body.sampling_params
    fields = sp.model_dump(exclude={"n", "skip_special_tokens", "include_stop_str_in_output",
                                    "structured_outputs"})
    fields["logprobs"] = sp.logprobs is not None
    fields["top_logprobs"] = sp.logprobs or 0
    fields.update(structured_fields(sp.structured_outputs))
    params = sampling_params(fields, settings.max_tokens_cap)
    release = await t.reserve(engine, sessions=1, tokens=len(body.token_ids) + params.max_tokens)
    try:
        s = await engine.create_session(tokens=body.token_ids, owner=t.name)
        try:
            g = await until_disconnected(request, s.generate(params=params))
        finally:
            await engine.close_session(s.id)
    finally:
        release()
    logprobs = None
    if g.logprobs is not None:
        tops = g.top_logprobs or [None] * len(g.logprobs)
        logprobs = {"content": [
            {"logprob": x, **({"top_logprobs": [{"token_id": t, "logprob": v} for t, v in top]}
                              if top is not None else {})}
            for x, top in zip(g.logprobs, tops)]}
    return {"choices": [{"index": 0, "token_ids": g.tokens, "text": g.text,
                         "finish_reason": g.finish_reason, "logprobs": logprobs}]}


class Tokenize(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = True


@router.post("/tokenize")
async def tokenize(body: Tokenize, t: Tenant = Depends(deps.tenant),
                   engine=Depends(deps.engine)) -> dict[str, Any]:
    tokens = await engine.encode_async(body.prompt, body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[TokenId]


@router.post("/detokenize")
async def detokenize(body: Detokenize, t: Tenant = Depends(deps.tenant),
                     engine=Depends(deps.engine)) -> dict[str, Any]:
    return {"prompt": engine.decode(body.tokens)}


@router.get("/get_world_size")
async def get_world_size(t: Tenant = Depends(deps.tenant)) -> dict[str, Any]:
    return {"world_size": 1}  # one engine process, whatever its device


@router.post("/finish_session")
async def finish_session(t: Tenant = Depends(deps.tenant)) -> dict[str, Any]:
    return {}  # nothing is held per X-Session-ID (see the module docstring)


@router.post("/pause")
async def pause(mode: Literal["keep", "abort", "wait"] = "keep",
                clear_cache: bool = Query(False), t: Tenant = Depends(admin),
                engine=Depends(deps.engine)) -> dict[str, Any]:
    """keep: calls in flight wait, KV kept, until /resume; abort: they end now with the
    tokens they made (finish_reason "abort"), then the engine pauses; wait: they run to
    their end (new generates wait for /resume), then the engine pauses. clear_cache also
    empties the prefix cache."""
    aborted = await engine.abort() if mode == "abort" else 0
    await engine.pause(wait=mode == "wait")
    dropped = await engine.reset_prefix_cache() if clear_cache else 0
    return {"mode": mode, "aborted": aborted, "cache_dropped": dropped}


@router.post("/resume")
async def resume(t: Tenant = Depends(admin), engine=Depends(deps.engine)) -> dict[str, Any]:
    await engine.resume()
    return {}


@router.post("/sleep")
async def sleep(level: int = Query(1, ge=1, le=2), t: Tenant = Depends(admin),
                engine=Depends(deps.engine)) -> dict[str, Any]:
    await engine.sleep(level)
    return {"level": level}


class ResetPrefixCache(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reset_running_requests: bool = False


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(body: ResetPrefixCache | None = None, t: Tenant = Depends(admin),
                             engine=Depends(deps.engine)) -> dict[str, Any]:
    """Empties the prefix cache; the KV running sessions map stays theirs."""
    if body is not None and body.reset_running_requests:
        raise InvalidRequestError("reset_running_requests is not supported: running sessions "
                                  "keep their KV (tokens are never lost; update_weights "
                                  "recomputes stale KV)")
    return {"dropped": await engine.reset_prefix_cache()}


@router.post("/wake_up")
async def wake_up(t: Tenant = Depends(admin), engine=Depends(deps.engine)) -> dict[str, Any]:
    await engine.wake_up()
    return {}
