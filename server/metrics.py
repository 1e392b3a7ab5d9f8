"""Prometheus metrics, one ``CollectorRegistry`` per app (several apps share a process in tests).

Names follow vLLM / TGI conventions; a dashboard and an autoscaler depend on them, so
treat them as an API. The engine reports its steps through ``on_step`` (it is the
engine's observer); the serving layer reports each request's timings.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .protocol.fit import FitState

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """All the server's metrics; ``render()`` gives the text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mpo_requests", "HTTP requests by route template and status code.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.running = Gauge("mpo_num_requests_running", "Sequences being decoded.", registry=r)
        self.waiting = Gauge(
            "mpo_num_requests_waiting", "Sequences queued for a decoding slot.", registry=r
        )
        self.ttft = Histogram(
            "mpo_time_to_first_token_seconds", "Time from submission to the first token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "mpo_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "mpo_e2e_request_latency_seconds", "Time from submission to the last token.",
            buckets=_E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("mpo_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("mpo_generation_tokens", "Tokens generated.", registry=r)
        self.drafted_tokens = Counter(
            "mpo_speculative_drafted_tokens", "Tokens drafted by speculative decoding.", registry=r
        )
        self.accepted_tokens = Counter(
            "mpo_speculative_accepted_tokens",
            "Drafted tokens the mixture accepted (speculative decoding).", registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mpo_batch_size", "Sequences per decoding step.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.policy_forward = Histogram(
            "mpo_policy_forward_seconds", "Forward time of one model in one decoding step.",
            ["policy"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests_by_profile = Counter(
            "mpo_requests_by_profile", "Generation requests by the profile of their weights.",
            ["profile"], registry=r,
        )  # fmt: skip
        self.fit_jobs = Gauge("mpo_fit_jobs", "Fit jobs by state.", ["state"], registry=r)
        self.in_flight = Gauge(
            "mpo_http_requests_in_flight",
            "HTTP requests being answered (a drain on SIGTERM waits for them).",
            registry=r,
        )
        for state in FitState:
            self.fit_jobs.labels(state=state.value).set(0)

    def track_engine(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the engine's queue sizes at scrape time."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def track_personas(self, read: Callable[[], dict[str, int] | None]) -> None:
        """Read the request personas' cache look-ups at scrape time (persona families)."""
        self.registry.register(_PersonaCaches(read))

    def track_in_flight(self, in_flight: Callable[[], float]) -> None:
        self.in_flight.set_function(in_flight)

    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
        """Engine observer hook, called after each decoding step (on the engine thread)."""
        self.batch_size.observe(batch_size)
        for policy, seconds in forward_seconds.items():
            self.policy_forward.labels(policy=policy).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PersonaCaches(Collector):
    """``mpo_request_persona_openings_total`` and ``mpo_request_persona_rules_total`` by
    ``result`` (hit, miss): an opening's KV and a prompt rule are computed on a miss only."""

    def __init__(self, read: Callable[[], dict[str, int] | None]) -> None:
        self.read = read

    def collect(self):  # type: ignore[no-untyped-def]
        stats = self.read()
        if stats is None:
            return
        for kind, what in (("openings", "KV of an opening"), ("rules", "prompt rules")):
            family = CounterMetricFamily(
                f"mpo_request_persona_{kind}",
                f"Look-ups of request personas' cached {what}, by result.",
                labels=["result"],
            )
            family.add_metric(["hit"], stats[f"{kind[:-1]}_hits"])
            family.add_metric(["miss"], stats[f"{kind[:-1]}_misses"])
            yield family
