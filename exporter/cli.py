"""The ``flowship`` command: export, agent, validate, report, compact, history, demo.

It sits above the core and the agent: the only module that imports both. Each command imports what it
uses when it runs, so that ``--version``, ``--help`` and ``validate`` start without Arrow, gRPC or the
sinks' clients (tests/pipeline/test_startup.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from flowship.defaults import AGENT_DEFAULT, EXPORT_DEFAULT
from flowship.exit_codes import EXIT_CODES, EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from flowship.units import Duration

if TYPE_CHECKING:
    from flowship.config import PipelineConfig

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell shows for a program killed by SIGPIPE (`yes | head -1`)
REPORT_QUESTIONS = ("latency", "drops", "all")

DESCRIPTION = """\
flowship exports network flows into long-term storage, SIEMs and analytics.

  flowship agent   capture this node's flows with eBPF and export them (root)
  flowship export  read flows from Hubble, Hubble files, Kafka or stdin and export them
  flowship validate [--config] FILE  check a config without running it
  flowship report latency|drops|all  answer the two questions from the Parquet output
  flowship compact ARCHIVE  merge the small Parquet files of closed hours; --retention deletes old ones
  flowship history --archive PATH|s3://BUCKET/PREFIX  serve the stored flows to hubble observe
  flowship demo    build a small namespace topology, capture it, answer the two questions

""" + EXIT_CODES


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowship")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked (importlib.metadata costs ~0.02 CPU-s)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"flowship {_version()}")
        parser.exit()


def listen_address(text: str) -> str:
    """``--metrics``: HOST:PORT or [IPv6]:PORT, checked before anything starts."""
    from flowship.metrics import parse_listen_address

    try:
        parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _duration(text: str) -> float:
    try:
        return float(Duration.parse(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {Duration.expected} (or a number of seconds), got {text!r}") \
            from None


def positive_duration(text: str) -> float:
    """``--duration``: seconds, or text with a unit as in configs (``20s``, ``5m``, ``1h``)."""
    value = _duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return value


def point_in_time(text: str) -> datetime:
    """``--since``/``--until``: an RFC 3339 time (UTC unless it says otherwise) or a duration ago (``1h``)."""
    try:
        return datetime.now(UTC) - timedelta(seconds=Duration.parse(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time like 2026-12-02T10:00:00Z or a duration ago like 1h, "
                                         f"got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def duration_or_zero(text: str) -> float:
    """``--settle``: a duration, 0 allowed (every partition counts as closed)."""
    value = _duration(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a duration >= 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _load(args: argparse.Namespace, default: str, what: str) -> PipelineConfig:
    import structlog

    from flowship.config import load_file, load_text

    log = structlog.get_logger()
    if args.config:
        return load_file(args.config, sources_optional=what == "agent")
    log.info(f"no --config given: running the embedded default {what} config", config=default.splitlines()[0])
    return load_text(default, "<embedded default>")


def cmd_export(args: argparse.Namespace) -> int:
    from flowship.pipeline.launch import run_pipeline

    config = _load(args, EXPORT_DEFAULT, "export")
    return run_pipeline(config, args.metrics, not args.no_progress)


def cmd_validate(args: argparse.Namespace) -> int:
    from flowship.config import ConfigError, load_file, secret_problems

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
        "hubble_metrics": ("enabled (hubble_* series of the flows entering the pipeline, before the stages): "
                           + ", ".join(config.hubble_metrics.metrics)) if config.hubble_metrics.enabled else "disabled",
    }
    print(f"{args.config}: valid")
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from flowship.agent.cli import run_agent

    config = _load(args, AGENT_DEFAULT, "agent")
    return run_agent(config, args)


def cmd_report(args: argparse.Namespace) -> int:
    from flowship import report

    try:
        from flowship.sinks.parquet_store import S3Config

        s3 = S3Config(endpoint_url=args.s3_endpoint or "", region=args.s3_region or "")
        flows = report.load_flows(args.parquet, since=args.since, until=args.until, namespace=args.namespace, s3=s3)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"flowship report: {getattr(exc, 'strerror', None) or exc}\n")
        return EXIT_FAILED
    if args.question in ("latency", "all"):
        print("Where the latency goes, per hop (client -> server:port):")
        print(report.format_latency(report.latency_by_hop(flows), args.limit))
    if args.question in ("drops", "all"):
        if args.question == "all":
            print()
        print("Dropped / denied calls:")
        print(report.format_drops(report.dropped_calls(flows), args.limit))
    return EXIT_OK


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}")
    return int(text)


def cmd_compact(args: argparse.Namespace) -> int:
    from flowship import compact
    from flowship.sinks.parquet_store import S3Config

    sizes = {k: v for k, v in (("max_file_rows", args.max_file_rows), ("row_group_rows", args.row_group_rows)) if v}
    options = compact.CompactOptions(settle=args.settle, retention=args.retention, dry_run=args.dry_run, **sizes)
    try:
        store = compact.open_archive(args.archive, S3Config(endpoint_url=args.s3_endpoint or "",
                                                            region=args.s3_region or ""))
        summary = compact.run(store, options, progress=lambda line: sys.stderr.write(f"flowship compact: {line}\n"))
    except (OSError, RuntimeError, ValueError) as exc:
        sys.stderr.write(f"flowship compact: {exc}\n")
        return EXIT_FAILED
    print(json.dumps(summary.as_dict(), indent=2))
    return EXIT_FAILED if any(": no dt=" not in reason for reason in summary.skipped) else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    """Serve an archive; a wrong archive or option exits 2 (usage), a failure to listen 1."""
    # gRPC's core logs a failed bind itself, before flowship says why in one line: keep errors to that line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from flowship.history import DEFAULT_ADDRESS, ArchiveError, HistoryConfig, serve
    from flowship.history_live import DEFAULT_KAFKA_TOPIC, KafkaLiveConfig, LiveConfig, ObserverLiveConfig
    from flowship.observer_server import ObserverTLSConfig
    from flowship.sinks.parquet_store import S3Config

    def fail(code: int, message: str) -> int:
        sys.stderr.write(f"flowship history: {message}\n")
        return code

    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            return fail(EXIT_USAGE, "--tls-cert and --tls-key go together (--tls-client-ca needs both)")
        tls = ObserverTLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    live: LiveConfig | None = None
    live_tls = any((args.live_tls, args.live_tls_ca, args.live_tls_cert, args.live_tls_key,
                    args.live_tls_server_name))
    if args.live_observer and args.live_kafka:
        return fail(EXIT_USAGE, "give either --live-observer or --live-kafka, not both")
    if args.live_observer:
        live = ObserverLiveConfig(args.live_observer, tls=live_tls, ca_file=args.live_tls_ca,
                                  cert_file=args.live_tls_cert, key_file=args.live_tls_key,
                                  server_name=args.live_tls_server_name, window=args.live_window)
    elif live_tls:
        return fail(EXIT_USAGE, "--live-tls* options are for --live-observer")
    if args.live_kafka:
        live = KafkaLiveConfig(args.live_kafka, topic=args.live_kafka_topic, window=args.live_window)
    elif args.live_kafka_topic != DEFAULT_KAFKA_TOPIC:
        return fail(EXIT_USAGE, "--live-kafka-topic needs --live-kafka BROKERS")
    config = HistoryConfig(archive=args.archive, address=args.listen or DEFAULT_ADDRESS, tls=tls,
                           allow_unauthenticated=args.allow_unauthenticated,
                           s3=S3Config(endpoint_url=args.s3_endpoint or "", region=args.s3_region or ""),
                           live=live)
    problems = config.validate()
    if problems:
        return fail(EXIT_USAGE, "; ".join(_history_option(p) for p in problems))
    try:
        return serve(config)
    except ArchiveError as exc:
        return fail(EXIT_USAGE, f"--archive {exc}")
    except OSError as exc:
        return fail(EXIT_FAILED, str(exc))


def _history_option(problem: str) -> str:
    """A HistoryConfig problem named by the command-line option that sets the key."""
    for key, option in (("address: ", "--listen: "), ("live.address: ", "--live-observer: "),
                        ("live.window: ", "--live-window: "), ("live.brokers: ", "--live-kafka: "),
                        ("live.topic: ", "--live-kafka-topic: "), ("live.ca_file: ", "--live-tls-ca: "),
                        ("live.cert_file: ", "--live-tls-cert: "), ("live.key_file: ", "--live-tls-key: "),
                        ("live.cert_file and live.key_file", "--live-tls-cert and --live-tls-key")):
        if problem.startswith(key):
            return option + problem[len(key):]
    return problem


def cmd_demo(args: argparse.Namespace) -> int:
    from flowship.agent.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowship", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
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
    p.add_argument("--metrics", type=listen_address,
                   help="serve /metrics, /healthz, /readyz on HOST:PORT ([IPv6]:PORT, :PORT for every interface)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line on a terminal")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("agent", help="capture this node's flows with eBPF (root) and export them",
                       description="Run the node agent. Without --config: capture every non-loopback "
                                   "interface that is up and write Parquet under ./flows. A config "
                                   "without sources: gets the capture source added.",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p)
    p.add_argument("--metrics", type=listen_address,
                   help="serve /metrics, /healthz, /readyz on HOST:PORT ([IPv6]:PORT, :PORT for every interface)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--duration", type=positive_duration, default=None,
                   help="stop after this long: seconds, or with a unit (20s, 5m, 1h)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("validate", help="check a config file without running it",
                       description="Check a config without running it: every problem is named with the file, "
                                   "the key path and what was expected (exit 6); a valid config exits 0.")
    common(p)
    p.add_argument("file", nargs="?", metavar="FILE", help="the config file (the same as --config FILE)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("report", help="answer 'where does the latency go' and 'what was denied' from Parquet",
                       description="Read the Parquet a parquet sink wrote and print, per hop, the TCP handshake "
                                   "time and the server time; and every dropped call by source, destination, "
                                   "port and reason. Each table shows its top rows (--limit) and says how many "
                                   "more there are.")
    p.add_argument("question", choices=REPORT_QUESTIONS, help="latency, drops, or all (both)")
    p.add_argument("--parquet", default="./flows",
                   help="the parquet sink's path, a directory or s3://bucket/prefix (default ./flows)")
    p.add_argument("--s3-endpoint", help="an S3-compatible endpoint, http(s)://host:port (default: AWS)")
    p.add_argument("--s3-region", help="the bucket's region (default: AWS_REGION or the profile's)")
    p.add_argument("--since", type=point_in_time, help="only flows at or after this time "
                   "(RFC 3339, e.g. 2026-12-02T10:00:00Z, or a duration ago: 1h, 30m)")
    p.add_argument("--until", type=point_in_time, help="only flows before this time (same forms as --since)")
    p.add_argument("--namespace", help="only flows with this Kubernetes namespace on either side")
    p.add_argument("--limit", type=non_negative_int, default=20,
                   help="rows per table, the largest first (default 20; 0 = all)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compact", help="merge the small Parquet files of closed hours; delete hours past retention",
                       description="Rewrite the files of every closed hour partition of a parquet sink's "
                                   "archive (a directory or s3://bucket/prefix) into few large files sorted by "
                                   "time, safely against crashes (a journal under _flowship/compaction lets "
                                   "the next run finish an interrupted one). With --retention, hours that ended "
                                   "longer ago are deleted. Prints a JSON summary; exit 1 if a partition could "
                                   "not be compacted (its files are kept). Run one compact at a time per archive.")
    p.add_argument("archive", help="the parquet sink's path: a directory or s3://bucket/prefix")
    p.add_argument("--settle", type=duration_or_zero, default=3600.0,
                   help="an hour partition is closed this long after it ended (default 1h)")
    p.add_argument("--retention", type=positive_duration, default=None,
                   help="delete hour partitions that ended longer ago than this (e.g. 30d); default: keep all")
    p.add_argument("--max-file-rows", type=positive_int, help="rows per output file (default 4194304)")
    p.add_argument("--row-group-rows", type=positive_int,
                   help="rows per row group, held in memory until written (default 262144)")
    p.add_argument("--dry-run", action="store_true", help="say what would be compacted or deleted; change nothing")
    p.add_argument("--s3-endpoint", help="an S3-compatible endpoint, http(s)://host:port (default: AWS)")
    p.add_argument("--s3-region", help="the bucket's region (default: AWS_REGION or the profile's)")
    p.set_defaults(func=cmd_compact)
    p = sub.add_parser("history", help="serve a parquet archive over the Hubble Observer API (hubble observe)",
                       description="Serve the flows a parquet sink stored (a directory or s3://BUCKET/PREFIX) as "
                                   "a Hubble Observer: hubble observe --server ADDRESS --since 24h ... reads "
                                   "them. Runs until SIGTERM/SIGINT. See docs/history.md.",
                       epilog="Exit codes: 0 stopped by a signal; 1 cannot listen; 2 a wrong option or an archive "
                              "that cannot be read (missing directory or bucket).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", required=True, metavar="PATH|s3://BUCKET/PREFIX",
                   help="the parquet sink's path (the folder holding flows/)")
    p.add_argument("--listen", metavar="ADDRESS",
                   help="host:port, :port (every interface: needs --tls-client-ca) or unix:PATH "
                        "(default 127.0.0.1:4255; 4244/4245 are Cilium's Hubble server and Relay)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM) ...")
    p.add_argument("--tls-key", metavar="FILE", help="... and this key")
    p.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback address without client certificates")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="S3-compatible server for s3:// archives, e.g. http://127.0.0.1:7070 "
                        "(credentials: the AWS default chain)")
    p.add_argument("--s3-region", metavar="REGION",
                   help="the bucket's region (default: AWS_REGION / the profile's, else us-east-1)")
    live = p.add_argument_group("following from a live source (hubble observe -f)",
                                "Without one, a follow stream polls the archive for files the sink publishes.")
    live.add_argument("--live-observer", metavar="HOST:PORT",
                      help="continue follow streams from this Observer (a Cilium node, Hubble Relay, a flowship "
                           "agent): host:port or unix:PATH")
    live.add_argument("--live-tls", action="store_true", help="connect to --live-observer over TLS")
    live.add_argument("--live-tls-ca", metavar="FILE", help="CA of the live Observer's certificate (implies TLS)")
    live.add_argument("--live-tls-cert", metavar="FILE", help="client certificate for the live Observer (mTLS) ...")
    live.add_argument("--live-tls-key", metavar="FILE", help="... and its key")
    live.add_argument("--live-tls-server-name", metavar="NAME", help="the name in the live Observer's certificate")
    live.add_argument("--live-kafka", metavar="BROKERS",
                      help="continue follow streams from the kafka sink's topic on these brokers (host:port,...)")
    live.add_argument("--live-kafka-topic", metavar="TOPIC", default="flowship.flows",
                      help="the kafka sink's topic (default flowship.flows)")
    live.add_argument("--live-window", metavar="SECONDS", type=float, default=30.0,
                      help="how far before the newest archived flow the live stream starts; flows in it are "
                           "de-duplicated against the archive (default 30)")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("demo", help="namespace topology + traffic + capture; prints latency and drops (root)")
    common(p)
    p.add_argument("--out", default="./flowship-demo", help="where the demo writes its Parquet files")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; argparse ends a wrong command line with exit 2 and its usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        if args.config and args.file and args.config != args.file:
            parser.error("validate: give the config once, as FILE or as --config FILE")
        args.config = args.config or args.file
        if not args.config:
            parser.error("validate: the config file is required (flowship validate FILE)")
    if args.command != "validate":  # validate logs nothing (its report is on stdout): it skips structlog's ~0.07 CPU-s
        from flowship import logs

        logs.configure(args.log_level, None if args.log_format == "auto" else args.log_format == "json")
    from flowship.config import ConfigError  # after parsing: --version and --help end in parse_args

    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone away (`| head -1`) is handled below
        return code
    except ConfigError as exc:
        sys.stderr.write(f"invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    except BrokenPipeError:
        # The reader of stdout went away: stop quietly, as `cat`, `grep` or `yes` do. Point stdout at
        # /dev/null so that the interpreter's own flush at exit does not complain a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
