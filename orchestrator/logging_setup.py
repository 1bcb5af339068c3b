"""structlog configuration: key=value on a terminal, JSON in services (PDO_LOG_FORMAT=json)."""
from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    level_name = (level or os.environ.get("PDO_LOG_LEVEL", "WARNING")).upper()
    if json is None:
        json = os.environ.get("PDO_LOG_FORMAT", "") == "json" or not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.processors.KeyValueRenderer(
        key_order=["event", "request_id"], drop_missing=True)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
