"""Prometheus metrics of one server: requests, tokens in and out, queue depth, batch size, latencies.

Each app has its own registry (two servers in one process, as in the tests, do not share counters). Names
follow Prometheus conventions (`_total` counters, `_seconds` histograms) under the `gemmakit_` prefix.

The prefix cache and speculative decoding are counted where the engine loop sees them: prompt tokens a request
took from the prefix cache when its first token is sent, and the drafter's counters (engine.drafter_stats,
cumulative in the engine) as they grow after each step, with their ratio as a gauge for dashboards.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gemmakit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("gemmakit_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("gemmakit_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("gemmakit_queue_depth", "sequences waiting for a batch row", registry=r)
        self.batch_size = Gauge("gemmakit_running_batch_size", "sequences in the running batch", registry=r)
        self.ttft = Histogram("gemmakit_time_to_first_token_seconds", "from submission to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("gemmakit_time_per_output_token_seconds", "between consecutive tokens",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.prefix_hit_tokens = Counter("gemmakit_prefix_cache_hit_tokens", "prompt tokens taken from the prefix "
                                         "cache instead of computed", registry=r)
        self.drafted = Counter("gemmakit_speculative_drafted_tokens", "tokens proposed by the draft model",
                               registry=r)
        self.accepted = Counter("gemmakit_speculative_accepted_tokens", "drafted tokens the model accepted",
                                registry=r)
        self.acceptance = Gauge("gemmakit_speculative_acceptance_rate", "accepted / drafted tokens since start",
                                registry=r)
        self._seen = (0, 0)  # the drafter's (drafted, accepted) already counted

    def observe_batch(self, running: int, waiting: int) -> None:
        self.batch_size.set(running)
        self.queue_depth.set(waiting)

    def observe_tokens(self, seconds: float, first: bool, count: int) -> None:
        (self.ttft if first else self.token_latency).observe(seconds)
        self.generated_tokens.inc(count)

    def observe_speculation(self, drafted: int, accepted: int) -> None:
        """The drafter's cumulative counters: what grew since the last call is counted."""
        seen_d, seen_a = self._seen
        if drafted > seen_d:
            self.drafted.inc(drafted - seen_d)
            self.accepted.inc(accepted - seen_a)
            self._seen = (drafted, accepted)
            self.acceptance.set(accepted / drafted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
