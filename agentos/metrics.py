"""The engine's histograms for Prometheus (prometheus-client): step time and size, queue
wait, and the latency of each public operation. Counters and gauges (tokens, blocks,
sessions by state) are read from `Engine.stats()` at scrape time instead."""

from __future__ import annotations

_FAST = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, .01, .025, .05, .1, .25, .5, 1,
         2.5, 5, 10, 30, 60, 300)


class EngineMetrics:
    """Histograms in their own registry. The kernel's loop thread calls `step` and
    `queue_wait` (as its observer); the engine times operations with `op`."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("agentos_step_seconds", "time of one engine step",
                                      registry=self.registry, buckets=_FAST)
        self.step_sessions = Histogram("agentos_step_sessions", "sessions (chunks) in a step",
                                       registry=self.registry,
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.step_tokens = Histogram("agentos_step_tokens", "tokens computed in a step",
                                     registry=self.registry,
                                     buckets=(1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384))
        self.queue_wait_seconds = Histogram("agentos_queue_wait_seconds",
                                            "time from becoming runnable to running",
                                            registry=self.registry, buckets=_FAST)
        self.op_seconds = Histogram("agentos_op_seconds", "latency of an engine operation, "
                                    "from the call to its (durable) result", ["op"],
                                    registry=self.registry, buckets=_FAST)

    def step(self, seconds: float, num_sessions: int, num_tokens: int) -> None:
        self.step_seconds.observe(seconds)
        self.step_sessions.observe(num_sessions)
        self.step_tokens.observe(num_tokens)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)
