"""The server's Prometheus metrics (prometheus_client), in a registry of the server's own (no process-wide state).
Names follow vLLM's where one exists, with the prefix `neox_jax:`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, slots: int, max_queue: int, draft_tokens: int | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "neox_jax:request_success", "requests ended, by finish reason", ["finish_reason"], registry=r
        )
        self.rejected = Counter("neox_jax:request_rejected", "requests refused because the queue was full", registry=r)
        self.errors = Counter(
            "neox_jax:request_errors", "requests answered with an error status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("neox_jax:prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("neox_jax:generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("neox_jax:num_requests_waiting", "requests waiting for a slot", registry=r)
        self.occupancy = Gauge("neox_jax:num_requests_running", "decode slots in use", registry=r)
        Gauge("neox_jax:num_slots", "decode slots (the batch)", registry=r).set(slots)
        Gauge("neox_jax:max_queue", "the waiting queue's bound", registry=r).set(max_queue)
        self.ttft = Histogram(
            "neox_jax:time_to_first_token_seconds",
            "arrival to first token (queueing included)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )

        self.spec = None  # with a draft model: (drafts, drafted tokens, accepted tokens) counters
        if draft_tokens is not None:
            self.spec = (
                Counter("neox_jax:spec_decode_num_drafts", "speculative rounds run, summed over rows", registry=r),
                Counter("neox_jax:spec_decode_num_draft_tokens", "tokens the draft proposed", registry=r),
                Counter(
                    "neox_jax:spec_decode_num_accepted_tokens",
                    "proposed tokens the target accepted (before a stop or max_tokens cut)",
                    registry=r,
                ),
            )
            Gauge("neox_jax:spec_decode_draft_tokens", "tokens the draft proposes a round (k)", registry=r).set(
                draft_tokens
            )

    def speculative(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        for counter, n in zip(self.spec, (drafts, draft_tokens, accepted)):
            counter.inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
