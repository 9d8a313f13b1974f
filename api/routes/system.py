"""The machine: liveness, state, invariants, Prometheus metrics, tokenizer.

NOTE: counters over all tenants reveal what others do (a prefix-cache hit says that
someone sent those tokens before), so only an admin (or the single tenant of a server
without keys) sees the engine's counters and /metrics; another tenant sees the engine's
state and its own counters.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agentos.api import deps
from agentos.api.schemas import ERRORS, Detokenize, Text, Tokenize, TokenList
from agentos.api.tenants import Tenant

router = APIRouter(tags=["system"], responses=ERRORS)


@router.get("/health")
async def health(engine=Depends(deps.engine)) -> dict:
    await engine.stats()  # answers only if the kernel loop is alive
    return {"status": "ok"}


# what any tenant may see of the engine's stats: its state and its sizes, no one's activity
TENANT_STATS = ("scheduler", "weight_version", "paused", "asleep")
TENANT_KV = ("device_blocks_total", "host_blocks_total", "block_size", "block_bytes")


@router.get("/v1/system")
async def system(request: Request, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine),
                 settings=Depends(deps.settings)) -> dict:
    """Engine stats (KV blocks, sessions by state, steps, tokens), the model and the
    server's limits. A tenant that is not an admin gets only the engine's state and its
    own prefix-cache hits: the engine's counters move with other tenants' work."""
    usage = await engine.usage(t.name)
    stats = await engine.stats()
    if not (t.admin or request.app.state.tenants.open):
        stats = tenant_stats(stats, t.name)
    return {"model": settings.model_name, "config": _public(settings.engine_options()),
            "limits": {"max_tokens_cap": settings.max_tokens_cap,
                       "max_body_bytes": settings.max_body_bytes,
                       "max_sessions": t.max_sessions, "max_tokens": t.max_tokens,
                       "max_snapshots": t.max_snapshots},
            "tenant": {"name": t.name, "sessions": usage["sessions"], "snapshots": usage["snapshots"]},
            "stats": stats}


def tenant_stats(stats: dict, name: str) -> dict:
    """What tenant `name` may see of the engine's stats: its state and sizes (TENANT_STATS,
    TENANT_KV) and the prefix-cache hits of its own sessions."""
    kv = stats.get("kv", {})
    return {**{k: stats[k] for k in TENANT_STATS if k in stats},
            "kv": {k: kv[k] for k in TENANT_KV if k in kv},
            "prefix_hit_tokens": stats.get("prefix_hit_tokens_by_owner", {}).get(name, 0)}


@router.post("/v1/system/check")
async def check(t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)) -> dict:
    """Asserts the memory invariants (refcounts equal page-table entries plus snapshot
    holds); a failure is a 500."""
    await engine.check()
    return {"ok": True}


@router.post("/v1/tokenize", response_model=TokenList)
async def tokenize(body: Tokenize, t: Tenant = Depends(deps.tenant), engine=Depends(deps.engine)):
    return {"tokens": await engine.encode_async(body.text, body.add_special_tokens)}


@router.post("/v1/detokenize", response_model=Text)
async def detokenize(body: Detokenize, t: Tenant = Depends(deps.tenant),
                     engine=Depends(deps.engine)):
    return {"text": engine.decode(body.tokens)}


@router.get("/metrics", responses={200: {"content": {"text/plain": {}},
                                         "description": "Prometheus text format"}})
async def metrics(request: Request, engine=Depends(deps.engine)) -> PlainTextResponse:
    """The engine's and the app's metrics; with keys configured, for an admin key only
    (a scraper sends it as `Authorization: Bearer KEY`)."""
    tenants = request.app.state.tenants
    if not tenants.open:
        tenants.authenticate(request.headers.get("authorization", ""),
                             request.headers.get("x-api-key", "")).require_admin()
    registry = CollectorRegistry()
    registry.register(_StatsCollector(await engine.stats()))
    body = generate_latest(registry)
    # the engine's histograms (steps, queue wait, operations) and the app's HTTP metrics
    for extra in (getattr(engine, "metrics", None), getattr(request.app.state, "http_metrics", None)):
        if extra is not None:
            body += generate_latest(extra.registry)
    return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")


class _StatsCollector:
    """One scrape's worth of engine stats as Prometheus metrics."""

    def __init__(self, stats: dict):
        self.stats = stats

    def collect(self):
        st = self.stats
        for name, value in st["kv"].items():
            yield GaugeMetricFamily(f"agentos_kv_{name}", f"KV cache: {name}", value=value)
        g = GaugeMetricFamily("agentos_sessions", "live sessions by state", labels=["state"])
        for state, n in st["sessions"]["by_state"].items():
            g.add_metric([state], n)
        yield g
        lv = GaugeMetricFamily("agentos_sessions_by_level", "live sessions by MLFQ level",
                               labels=["level"])
        for level, n in st["sessions"].get("by_level", {}).items():
            lv.add_metric([level], n)
        yield lv
        yield GaugeMetricFamily("agentos_snapshots", "live snapshots", value=st["snapshots"])
        block_bytes = st["kv"]["block_bytes"]
        for way in ("out", "in"):
            yield CounterMetricFamily(f"agentos_swap_{way}_bytes", f"KV bytes swapped {way}",
                                      value=st[f"swap_{way}_blocks"] * block_bytes)
        store = st.get("store")
        if store is not None:
            yield GaugeMetricFamily("agentos_store_up", "1 while the durable store answers",
                                    value=int(store["up"]))
            yield GaugeMetricFamily("agentos_store_queued_writes", "journal writes not yet durable",
                                    value=store["queued_writes"])
            yield CounterMetricFamily("agentos_journal_writes", "writes made durable",
                                      value=store["journal_writes"])
        for name in ("steps", "tokens_generated", "tokens_prefilled", "forks", "cow_copies",
                     "swap_out_blocks", "swap_in_blocks", "dropped_blocks", "prefix_hit_tokens",
                     "tokens_scored"):
            yield CounterMetricFamily(f"agentos_{name}", f"engine {name}", value=st[name])
        hits = CounterMetricFamily("agentos_prefix_hit_tokens_by_tenant",
                                   "prompt tokens taken from the prefix cache, by tenant",
                                   labels=["tenant"])
        for tenant, n in st.get("prefix_hit_tokens_by_owner", {}).items():
            hits.add_metric([tenant], n)
        yield hits
        q = GaugeMetricFamily("agentos_queue_sessions", "queued sessions by MLFQ level",
                              labels=["level"])
        for level, n in st["queue"]["by_level"].items():
            q.add_metric([level], n)
        yield q
        yield GaugeMetricFamily("agentos_weight_version", "version of the loaded weights",
                                value=st["weight_version"])
        yield CounterMetricFamily("agentos_step_time_seconds", "time spent in steps",
                                  value=st["step_time_s"])
        # paging and scheduling history, summed over sessions (never one series per session);
        # the scheduler's cost per step is rate(agentos_sched_seconds) / rate(agentos_steps)
        yield CounterMetricFamily("agentos_preemptions", "times a session's pages were taken off "
                                  "the device (swapped out or dropped)", value=st["preemptions"])
        yield CounterMetricFamily("agentos_swapped_seconds", "seconds sessions spent with their "
                                  "KV off the device, closed ones included", value=st["swapped_s"])
        yield CounterMetricFamily("agentos_sched_seconds", "time spent forming batches "
                                  "(scheduling decisions)", value=st["sched_s"])


def _public(options: dict) -> dict:
    """The engine's options as any tenant may see them: a store URL without its password."""
    store = options.get("store")
    if isinstance(store, str) and "@" in store:
        scheme, _, rest = store.partition("://")
        userinfo, _, host = rest.rpartition("@")
        user = userinfo.partition(":")[0]
        options = {**options, "store": f"{scheme}://{user + ':***@' if user else '***@'}{host}"}
    elif store is not None and not isinstance(store, str):
        options = {**options, "store": type(store).__name__}  # a Store object: its kind only
    return options
