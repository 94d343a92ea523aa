"""Per-process metrics export: each Ray actor hands its registry to the ingress, which merges them."""

from __future__ import annotations

import gc
import logging
import sys

import structlog
from prometheus_client import REGISTRY, generate_latest


def export_metrics() -> bytes:
    return generate_latest(REGISTRY)


def tune_gc() -> None:
    """Every agenthub process folds streams and decodes batches of events: thousands of short-lived objects
    at a time. Python's default young-generation threshold (700) makes the cyclic GC rescan them over and
    over; a larger one trades a little memory for far fewer collections (measured: +25% on a 100k fold)."""
    gc.set_threshold(50_000, 20, 20)


def configure_logging(level: int = logging.INFO) -> None:
    """Structured logs (JSON lines when not on a terminal) and GC settings for every process of the system."""
    tune_gc()
    renderer = structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
