"""Token sampling: penalties, greedy, temperature, top-k, top-p, min-p, with one RNG per
session.

Each session owns a `torch.Generator`; a sampled row draws exactly one vector of
exponential noise from its own generator per token, so a session's draws do not depend
on what else is in the batch, and saving the generator's state is enough to replay it.
"""

from __future__ import annotations

from array import array

import numpy as np
import torch

from agentos.kernel.process import NextTokenLogprobs, ScoreCall
from agentos.kernel.sampling_params import SamplingParams


def new_rng(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(
    logits: torch.Tensor, params: list[SamplingParams], rngs: list[torch.Generator],
    histories: list[tuple[array, int]] | None = None,
    allowed: tuple[list[int], torch.Tensor] | None = None,
) -> tuple[list[int], list[float], list[list[tuple[int, float]] | None]]:
    """Picks one token per row of logits [S, V] (fp32). `histories` (needed when a row's
    call has penalties): each row's session tokens and the position its call began at.
    `allowed`: the rows under a grammar and the tokens each may pick ([n, V] bool, from
    grammar.grammar_masks); the others are never chosen.

    Returns (token ids, logprobs, tops): the logprob of each chosen token under the
    model's distribution (log-softmax of the raw logits, before penalties, bias,
    temperature and filters), and for rows whose call asks for top_logprobs the k
    likeliest tokens under that same distribution, (id, logprob) most likely first (None
    for the others). Advances the RNG of sampled rows only.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    adjusted = _constrain(_bias(_penalize(logits, params, histories), logits, params), logits,
                          allowed)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows and logits.device.type == "cpu" and logits.dtype == torch.float32:
        # NOTE: every row greedy on the CPU: the picks and their logprobs read through numpy,
        # a few microseconds where the torch operations below cost 20 (the same values)
        picks = adjusted.numpy().argmax(axis=1)
        lps = logprobs.numpy()[np.arange(len(picks)), picks]
        return picks.tolist(), lps.tolist(), _tops(logprobs, params)
    chosen = adjusted.argmax(dim=-1)
    if rows:
        idx = _to_device(rows, torch.long, logits.device)
        x = adjusted[idx]
        temps = _to_device([params[i].temperature for i in rows], torch.float32, x.device)
        x = x / temps[:, None]
        x = _top_k_top_p(x, [params[i].top_k for i in rows], [params[i].top_p for i in rows])
        x = _min_p(x, [params[i].min_p for i in rows])
        probs = torch.softmax(x, dim=-1)
        # exponential race: argmax(p / E) with E ~ Exp(1) samples from p
        noise = torch.stack([
            torch.empty(x.shape[1], device=x.device).exponential_(generator=rngs[i]) for i in rows
        ])
        chosen[idx] = (probs / noise).argmax(dim=-1)
    lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    # NOTE: one device-to-host read per step, both results together (float64 holds any
    # token id exactly)
    both = torch.stack((chosen.to(torch.float64), lp.to(torch.float64))).cpu()
    return [int(t) for t in both[0].tolist()], both[1].tolist(), _tops(logprobs, params)


def _tops(logprobs: torch.Tensor, params: list[SamplingParams]) -> list:
    """Each asking row's top_logprobs alternatives (one more device-to-host read, only
    when some row asks)."""
    ks = [p.top_logprobs for p in params]
    k = max(ks)
    if not k:
        return [None] * len(params)
    values, ids = logprobs.topk(k, dim=-1)
    values, ids = values.cpu().tolist(), ids.cpu().tolist()
    return [list(zip(ids[i][:n], values[i][:n])) if n else None for i, n in enumerate(ks)]


def _penalize(logits: torch.Tensor, params: list[SamplingParams],
              histories: list[tuple[array, int]] | None) -> torch.Tensor:
    """The logits of rows whose call asks for penalties, adjusted for the tokens so far
    (rows without stay as they are; the input is not changed). histories[i] is row i's
    session tokens and where its call began: the repetition penalty looks at all of them
    (prompt and output, as transformers and vLLM do), presence and frequency at the
    call's output only (as OpenAI's and vLLM's do)."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    assert histories is not None
    x = logits.clone()
    V = x.shape[1]
    for i in rows:
        p, (tokens, start) = params[i], histories[i]
        ids = torch.frombuffer(tokens, dtype=torch.int32).to(device=x.device, dtype=torch.long)
        row = x[i]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool, device=x.device)
            seen[ids] = True
            r = p.repetition_penalty
            row = torch.where(seen, torch.where(row > 0, row / r, row * r), row)
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.bincount(ids[start:], minlength=V)[:V].to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        x[i] = row
    return x


def _bias(x: torch.Tensor, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """x with each row's logit_bias added (a copy when x is still the model's logits)."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return x
    if x is logits:
        x = x.clone()
    for i in rows:
        bias = params[i].logit_bias
        ids = torch.tensor(list(bias), dtype=torch.long, device=x.device)
        x[i, ids] += torch.tensor(list(bias.values()), dtype=x.dtype, device=x.device)
    return x


def _constrain(x: torch.Tensor, logits: torch.Tensor,
               allowed: tuple[list[int], torch.Tensor] | None) -> torch.Tensor:
    """x with the tokens each constrained row's grammar forbids at -inf (a copy when x is
    still the model's logits)."""
    if allowed is None:
        return x
    rows, mask = allowed
    if x is logits:
        x = x.clone()
    mask = mask.to(x.device, non_blocking=True)
    if len(rows) == x.shape[0]:
        return x.masked_fill_(~mask, float("-inf"))
    idx = _to_device(rows, torch.long, x.device)
    x[idx] = x[idx].masked_fill(~mask, float("-inf"))
    return x


def _min_p(x: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    # x: [S, V] scaled (and filtered) logits; drops tokens whose probability is below
    # min_p times the likeliest token's (p / p_max = exp(x - x_max))
    if not any(min_ps):
        return x
    ps = _to_device(min_ps, x.dtype, x.device)
    rel = x - x.max(dim=-1, keepdim=True).values
    return x.masked_fill(rel < torch.log(ps)[:, None], float("-inf"))


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a blocking copy (pinned staging on
    CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _top_k_top_p(x: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    # x: [S, V] scaled logits; returns x with filtered entries at -inf
    if not any(top_ks) and all(p >= 1.0 for p in top_ps):
        return x
    sorted_x, order = x.sort(dim=-1, descending=True)
    V = x.shape[1]
    ranks = torch.arange(V, device=x.device)[None, :]
    ks = _to_device([k if 0 < k < V else V for k in top_ks], torch.long, x.device)  # k >= V: off
    drop = ranks >= ks[:, None]
    ps = _to_device(top_ps, x.dtype, x.device)
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= ps[:, None]
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def score(logits: torch.Tensor, token_ids, span: tuple[int, int], call: ScoreCall) -> tuple[
        list[float], NextTokenLogprobs | None]:
    """Logprobs at positions span = [lo, hi) of a process's tokens, from their logits
    [hi - lo, V] (fp32): of each next token that exists, and at the last position of the
    process (when the call wants it) the top-k and candidate logprobs. The same
    log-softmax of the raw logits as `sample` reports."""
    lo, hi = span
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(token_ids)
    num_next = min(hi, n - 1) - lo
    lps: list[float] = []
    if num_next > 0:
        nxt = torch.tensor(token_ids[lo + 1 : lo + 1 + num_next], device=logits.device)
        lps = logprobs[:num_next].gather(1, nxt[:, None]).squeeze(1).tolist()
    dist = None
    if hi == n and call.wants_dist:
        last = logprobs[-1]
        k = min(call.top_k, last.shape[0])
        top = last.topk(k) if k else None
        cands = None
        if call.candidates is not None:
            cands = last[torch.tensor(call.candidates, dtype=torch.long, device=last.device)].tolist()
        dist = NextTokenLogprobs(top.indices.tolist() if top is not None else [],
                                 top.values.tolist() if top is not None else [], cands)
    return lps, dist
