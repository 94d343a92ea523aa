"""Prometheus metrics of the actor runtime; each Ray actor exports its own registry (see serve/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HANDLER_LATENCY = Histogram(
    "agenthub_handler_latency_seconds",
    "Time to handle one routed event",
    ["actor_type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ROUTED = Counter("agenthub_routed_events_total", "Events delivered to subscribers", ["subscriber"])
PARKED = Counter(
    "agenthub_parked_events_total", "Events a subscriber could not apply, recorded and skipped", ["subscriber"]
)
ROUTING_LAG = Gauge("agenthub_routing_lag_seconds", "Age of the newest event at delivery", ["subscriber"])
LLM_TOKENS = Counter("agenthub_llm_tokens_total", "LLM tokens used", ["provider", "model", "kind"])
LLM_CALLS = Counter("agenthub_llm_provider_calls_total", "Calls that reached an LLM provider", ["provider"])
ACTOR_RESTARTS = Counter("agenthub_actor_restarts_total", "Actors restarted by the orchestrator", ["actor"])
ACTIVE_ENTITIES = Gauge("agenthub_active_entities", "Entities activated in memory", ["actor_type"])
