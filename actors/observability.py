"""Per-process metrics export: each Ray actor hands its registry to the ingress, which merges them."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import REGISTRY, generate_latest


def export_metrics() -> bytes:
    return generate_latest(REGISTRY)


def configure_logging(level: int = logging.INFO) -> None:
    """Structured logs (JSON lines when not on a terminal) for every process of the system."""
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
