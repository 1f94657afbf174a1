"""Run one pipeline as a command: signals, the metrics server, progress, the summary and the exit code.

Shared by ``flowship export`` and ``flowship agent`` (which adds its capture source first), so both stop,
report and exit the same way.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, TextIO

import structlog

from flowship.config import ConfigError, PipelineConfig, secret_problems

if TYPE_CHECKING:
    from flowship.pipeline.runtime import RunSummary

from flowship.exit_codes import EXIT_CODES, EXIT_CONFIG, EXIT_FAILED, EXIT_USAGE

__all__ = ["EXIT_CODES", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_USAGE", "run_pipeline"]


def _headline(summary: RunSummary) -> str:
    code = summary.exit_code
    how = "stopped" if summary.stopped else "finished"
    what = {0: "every flow delivered", 1: "failed", 3: "some input lines were rejected",
            4: "some flows were not delivered", 5: "some flows were dead-lettered"}.get(code, "")
    return f"flowship: {how} in {summary.seconds:.1f}s: {what} (exit {code})"


def _print_summary(summary: RunSummary, stream: TextIO = sys.stderr) -> None:
    """The run summary: per source what was read, per sink what became of its rows."""
    lines = [_headline(summary)]
    for name, info in summary.sources.items():
        detail = ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(v, dict))
        lines.append(f"  source {name}: {detail}")
        for reason, count in (info.get("rejected_by_reason") or {}).items():
            lines.append(f"    rejected ({reason}): {count}")
    for name, count in summary.sinks.items():
        lines.append(f"  sink {name}: {count} rows delivered")
        outcome = summary.outcomes.get(name)
        if outcome is None:
            continue
        if outcome.dead_lettered:
            lines.append(f"    dead-lettered: {outcome.dead_lettered} rows (see the sink's dead-letter file)")
        if outcome.dropped:
            lines.append(f"    dropped by the full disk buffer (when_full: drop_newest): {outcome.dropped} rows")
        if outcome.buffered_batches:
            lines.append(f"    left in the disk buffer: {outcome.buffered_batches} batches"
                         + (f" ({outcome.undelivered} rows)" if outcome.undelivered else "")
                         + ", delivered at the next start")
        elif outcome.undelivered:
            lines.append(f"    not delivered: {outcome.undelivered} rows (unacknowledged: a checkpointing "
                         "source reads them again at the next start)")
        if outcome.unfinished:
            lines.append("    the sink was still busy at the shutdown deadline (shutdown_timeout)")
    for name, count in summary.dropped.items():
        lines.append(f"  dropped by {name}: {count:.0f}")
    for error in summary.errors:
        lines.append(f"  error: {error}")
    stream.write("\n".join(lines) + "\n")


def run_pipeline(config: PipelineConfig, metrics_address: str | None, progress: bool,
                 extra_sources=None, metrics=None) -> int:  # noqa: ANN001
    from flowship.metrics import Metrics
    from flowship.pipeline.runtime import Pipeline
    from flowship.progress import Progress

    metrics = metrics or Metrics()
    problems = secret_problems(config)
    if problems:
        raise ConfigError(problems)
    try:
        pipeline = Pipeline(config, metrics, sources=extra_sources)
    except (OSError, ValueError, RuntimeError) as exc:
        structlog.get_logger().error("cannot start", error=str(exc))
        sys.stderr.write(f"flowship: cannot start: {exc}\n")
        return EXIT_FAILED
    address = metrics_address or config.metrics_address
    try:
        server = metrics.serve(address) if address else None
    except ValueError as exc:  # the command line's --metrics is checked by the parser: this is the config's
        raise ConfigError([f"{config.filename}: metrics: {exc}"]) from None
    except OSError as exc:
        sys.stderr.write(f"flowship: cannot start: {exc.strerror or exc}\n")
        return EXIT_FAILED

    def on_signal(signum: int, _frame: object) -> None:
        structlog.get_logger().info("stopping: flushing sinks", signal=signal.Signals(signum).name,
                                    deadline_s=config.shutdown_timeout)
        pipeline.stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    display = Progress(metrics, [b.name for b in pipeline.branches], pending=pipeline.pending) if progress else None
    if display:
        display.start()
    try:
        summary = pipeline.run()
    except (OSError, ValueError, RuntimeError) as exc:
        # A sink or source could not start (unreachable server, unusable path...): say what, exit 1.
        structlog.get_logger().error("cannot start", error=str(exc))
        sys.stderr.write(f"flowship: cannot start: {exc}\n")
        return EXIT_FAILED
    finally:
        if display:
            display.stop()
        if server:
            server.shutdown()
    _print_summary(summary)
    structlog.get_logger().info("run summary", sources=summary.sources, sinks=summary.sinks,
                                outcomes={k: vars(v) for k, v in summary.outcomes.items()},
                                dropped=summary.dropped, errors=summary.errors, seconds=round(summary.seconds, 3),
                                stopped=summary.stopped, exit_code=summary.exit_code)
    return summary.exit_code
