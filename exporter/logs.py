"""Logging setup: structlog to stderr, JSON lines unless a person is watching.

stdout stays free for the ``stdout`` sink; logs always go to stderr. When
stderr is a terminal the output is readable console text, otherwise one JSON
object per line (what log collectors expect from a DaemonSet).
"""

from __future__ import annotations

import logging
import sys


def configure(level: str = "info", json: bool | None = None) -> None:
    """Route structlog to stderr; structlog is imported here, so that commands that never log skip it."""
    import structlog

    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
