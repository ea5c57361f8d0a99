"""`GET /metrics`: Prometheus text format. One registry per app (never the process-global one).

Request metrics are recorded by `shoal.api.service` as requests start, see their first token and end;
cluster gauges (nodes, instances, runners by state, tasks running on each runner) are read from the
replicated state at scrape time, and the tasks running on this node's runners from its own supervisor
(the replicated record is coarse: it does not follow every request).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.types import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_TIME_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)


class ApiMetrics:
    def __init__(
        self, state: Callable[[], State], local_runners: Callable[[], Mapping[str, Mapping[str, Any]]]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("api", "model")
        self.requests = Counter(
            "shoal_requests",
            "Generation requests by API, model and outcome (stop, length, abort, error, cancelled, "
            "not_found, loading).",
            (*labels, "outcome"),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "shoal_requests_in_flight",
            "Generation requests this node holds open (queued or running).",
            labels,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "shoal_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "shoal_completion_tokens", "Generated tokens.", labels, registry=self.registry
        )
        self.ttft = Histogram(
            "shoal_time_to_first_token_seconds",
            "From accepting a request to its first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.token_time = Histogram(
            "shoal_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first (decode speed).",
            labels,
            buckets=TOKEN_TIME_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ClusterCollector(state, local_runners))

    def request_started(self, api: str, model: str) -> None:
        self.in_flight.labels(api, model).inc()

    def request_refused(self, api: str, model: str, outcome: str) -> None:
        self.requests.labels(api, model, outcome).inc()

    def first_token(self, api: str, model: str, seconds: float) -> None:
        self.ttft.labels(api, model).observe(seconds)

    def request_ended(
        self,
        api: str,
        model: str,
        outcome: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        decode_s: float | None,
    ) -> None:
        self.in_flight.labels(api, model).dec()
        self.requests.labels(api, model, outcome).inc()
        self.prompt_tokens.labels(api, model).inc(prompt_tokens)
        self.completion_tokens.labels(api, model).inc(completion_tokens)
        if decode_s is not None and completion_tokens > 1:
            self.token_time.labels(api, model).observe(decode_s / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector(Collector):
    def __init__(
        self, state: Callable[[], State], local_runners: Callable[[], Mapping[str, Mapping[str, Any]]]
    ) -> None:
        self._state = state
        self._local_runners = local_runners

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state()
        nodes = GaugeMetricFamily("shoal_nodes", "Nodes in the cluster state.")
        nodes.add_metric([], len(state.nodes))
        yield nodes
        instances = GaugeMetricFamily("shoal_instances", "Placed instances by model.", labels=["model"])
        for model, count in sorted(Tally(i.card.model_id for i in state.instances.values()).items()):
            instances.add_metric([model], count)
        yield instances
        runners = GaugeMetricFamily("shoal_runners", "Runners by state.", labels=["state"])
        for kind, count in sorted(Tally(status.kind for status in state.runners.values()).items()):
            runners.add_metric([kind], count)
        yield runners
        tasks = GaugeMetricFamily(
            "shoal_runner_tasks", "Sequences running on each of this node's runners.", labels=["runner_id"]
        )
        for runner_id, status in sorted(self._local_runners().items()):
            tasks.add_metric([runner_id], int(status.get("num_tasks", 0)))
        yield tasks
