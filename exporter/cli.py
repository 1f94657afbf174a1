"""The ``flowship`` command: export, agent, validate, demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, TextIO

import structlog

from exporter import logs
from exporter.config import ConfigError, PipelineConfig, load_file, load_text, secret_problems
from exporter.defaults import AGENT_DEFAULT, EXPORT_DEFAULT

if TYPE_CHECKING:
    from exporter.pipeline.runtime import RunSummary

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

EXIT_CODES = """\
Exit codes (the most serious outcome wins):
  0  ok: every flow read was delivered to every sink, or dropped on purpose and counted
     (a stage, a full disk buffer with when_full: drop_newest); after SIGTERM/SIGINT, what
     was not delivered yet is kept in the sinks' disk buffers for the next start
  1  a component failed (could not start, a sink or source error)
  2  invalid configuration or command line
  3  finished, but some input lines were rejected (each logged with file:line)
  4  undelivered: flows read are neither delivered nor dead-lettered (still in a disk buffer
     at the end of the input, a sink flush timed out, a sink busy at the shutdown deadline)
  5  dead-lettered: every flow was settled, but some went to a sink's dead-letter file
"""

DESCRIPTION = """\
flowship exports network flows into long-term storage, SIEMs and analytics.

  flowship agent   capture this node's flows with eBPF and export them (root)
  flowship export  read flows from Hubble, Hubble files, Kafka or stdin and export them
  flowship validate --config FILE   check a config without running it
  flowship report latency|drops     answer the two questions from the Parquet output
  flowship demo    build a small namespace topology, capture it, answer the two questions

""" + EXIT_CODES


def _load(args: argparse.Namespace, default: str, what: str) -> PipelineConfig:
    log = structlog.get_logger()
    if args.config:
        return load_file(args.config)
    log.info(f"no --config given: running the embedded default {what} config", config=default.splitlines()[0])
    return load_text(default, "<embedded default>")


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
    from exporter.metrics import Metrics
    from exporter.pipeline.runtime import Pipeline
    from exporter.progress import Progress

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


def cmd_export(args: argparse.Namespace) -> int:
    config = _load(args, EXPORT_DEFAULT, "export")
    return run_pipeline(config, args.metrics, not args.no_progress)


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_file(args.config)
    problems = secret_problems(config)
    if problems:
        raise ConfigError(problems)
    report = {
        "file": args.config,
        "node_name": config.node_name,
        "sources": [f"{s.name} ({s.type})" for s in config.sources],
        "stages": [f"{s.name} ({s.type})" for s in config.stages],
        "sinks": [f"{s.name} ({s.type})" + (f" + stages {[t.type for t in s.stages]}" if s.stages else "")
                  for s in config.sinks],
    }
    print(f"{args.config}: valid")
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from agent.cli import run_agent

    config = _load(args, AGENT_DEFAULT, "agent")
    return run_agent(config, args)


def cmd_report(args: argparse.Namespace) -> int:
    from exporter import report

    flows = report.load_flows(args.parquet)
    if args.question in ("latency", "all"):
        print("Where the latency goes, per hop (client -> server:port):")
        print(report.format_latency(report.latency_by_hop(flows)))
    if args.question in ("drops", "all"):
        if args.question == "all":
            print()
        print("Dropped / denied calls:")
        print(report.format_drops(report.dropped_calls(flows)))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowship", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, needs_config: bool = False) -> None:
        p.add_argument("--config", "-c", required=needs_config, help="YAML config file (see configs/ and docs/config.md)")

    p = sub.add_parser("export", help="run the pipeline on Hubble/Kafka/file/stdin input",
                       description="Run the export pipeline. Without --config: Hubble JSON lines on stdin\n"
                                   "-> Parquet under ./flows. At the end of a finite input it waits until\n"
                                   "every sink has delivered; shutdown_timeout bounds only the drain after\n"
                                   "SIGTERM/SIGINT (or a failure).",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p)
    p.add_argument("--metrics", help="serve /metrics, /healthz, /readyz on HOST:PORT")
    p.add_argument("--no-progress", action="store_true", help="no live progress line on a terminal")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("agent", help="capture this node's flows with eBPF (root) and export them",
                       description="Run the node agent. Without --config: capture every non-loopback "
                                   "interface that is up and write Parquet under ./flows.")
    common(p)
    p.add_argument("--metrics", help="serve /metrics, /healthz, /readyz on HOST:PORT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("validate", help="check a config file without running it")
    common(p, needs_config=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("report", help="answer 'where does the latency go' and 'what was denied' from Parquet",
                       description="Read the Parquet a parquet sink wrote and print, per hop, the TCP handshake "
                                   "time and the server time; and every dropped call by source, destination, "
                                   "port and reason.")
    p.add_argument("question", choices=["latency", "drops", "all"])
    p.add_argument("--parquet", default="./flows", help="the parquet sink's path (default ./flows)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="namespace topology + traffic + capture; prints latency and drops (root)")
    common(p)
    p.add_argument("--out", default="./flowship-demo", help="where the demo writes its Parquet files")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, None if args.log_format == "auto" else args.log_format == "json")
    try:
        return args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
