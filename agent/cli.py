"""``flowship agent``: the node agent as a pipeline run (agent source → stages → sinks).

Checks first that this process can load and attach eBPF programs, so that a missing privilege is one
clear message instead of a failed pipeline; then runs :func:`flowship.pipeline.launch.run_pipeline` with the config,
adding an ``agent`` source with defaults when the config has none. SIGTERM/SIGINT (and ``--duration``)
stop the capture: programs are detached, the flow table is flushed and every sink drains.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import structlog

from flowship.config import ComponentSpec, PipelineConfig

EXIT_FAILED = 1


def with_agent_source(config: PipelineConfig) -> PipelineConfig:
    """The config itself when it has an ``agent`` source; otherwise a copy with one (defaults) added."""
    if any(spec.type == "agent" for spec in config.sources):
        return config
    from flowship.agent.source import AgentSourceConfig

    names = {spec.name for spec in config.sources}
    name = "agent" if "agent" not in names else "agent-capture"
    spec = ComponentSpec(type="agent", name=name, config=AgentSourceConfig())
    return PipelineConfig(**{**config.__dict__, "sources": [*config.sources, spec]})


def startup_problems() -> list[str]:
    """What stops the capture on this machine (privileges, kernel features), each with its remedy."""
    from flowship.agent import kernel_features, loader

    problems = []
    if not loader.DEFAULT_OBJECT.exists():
        problems.append(f"the eBPF object {loader.DEFAULT_OBJECT} is missing: build it with `make -C bpf` "
                        "(part of `bash deploy/dev/setup`)")
    try:
        problems.extend(kernel_features.check().problems())
    except OSError as exc:  # no libbpf, unreadable /proc: still a clear message
        problems.append(str(exc))
    if problems and os.geteuid() != 0:
        problems.insert(0, "flowship agent needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON "
                           "(see docs/agent.md): run it with sudo or grant them")
    return problems


def run_agent(config: PipelineConfig, args: argparse.Namespace) -> int:
    from flowship.pipeline.launch import run_pipeline

    log = structlog.get_logger()
    problems = startup_problems()
    if problems:
        sys.stderr.write("flowship agent cannot start:\n  - " + "\n  - ".join(problems) + "\n")
        return EXIT_FAILED
    config = with_agent_source(config)
    duration = getattr(args, "duration", None)
    timer = None
    if duration is not None:
        if duration <= 0:
            sys.stderr.write("--duration: expected a number of seconds > 0\n")
            return EXIT_FAILED
        # The same path as Ctrl-C: run_pipeline's handler stops the sources and drains the sinks.
        timer = threading.Timer(duration, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        log.info("agent will stop after --duration", seconds=duration)
        timer.start()
    try:
        return run_pipeline(config, getattr(args, "metrics", None), not getattr(args, "no_progress", False)
                            and sys.stderr.isatty())
    finally:
        if timer is not None:
            timer.cancel()
