"""Prometheus metrics of the event store (collected per process, merged by serve/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter

EVENTS_APPENDED = Counter("agenthub_events_appended_total", "Events appended to the log by this process")
