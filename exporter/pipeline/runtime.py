"""The run loop: sources → shared stages → fan-out → per-sink stages → sinks.

Threads and queues, all bounded:

    source threads ──emit──► input queue ──► router thread (shared stages)
                                               │ fan-out: one envelope per sink,
                                               ▼ receipts retained per branch
                                  sink queue ► sink thread (sink stages → sink)

A full queue blocks the step before it, so a slow sink slows the source
instead of growing memory. Shutdown drains in order: sources stop, the router
drains and closes the shared stages (aggregation windows flush), each sink
thread drains, closes its stages, flushes and closes its sink. When finite
sources are exhausted the run waits for every sink without a deadline (a
batch job must not report success with flows still buffered); after
SIGTERM/SIGINT (:meth:`Pipeline.stop`) or a component failure the drain is
bounded by ``shutdown_timeout``.

Every branch counts the rows handed to its sink (or disk buffer) and the
rows the sink delivered, dead-lettered or the buffer dropped on purpose, so
the summary can say, per sink, what is left and the exit status can tell the
truth about it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import structlog

from flowship import registry
from flowship.components import Context, Sink, Source, Stage
from flowship.config import ComponentSpec, PipelineConfig
from flowship.exit_codes import (
    EXIT_DEAD_LETTERED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_UNDELIVERED,
)
from flowship.hubble_metrics import HubbleMetrics
from flowship.metrics import Metrics
from flowship.pipeline.disk_buffer import DiskBuffer
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.stages.columns import MaskStage, select_through

_STOP = object()
TICK_SECONDS = 1.0


class PipelineError(RuntimeError):
    """A component failed in a way the pipeline cannot continue from."""


class BoundedQueue:
    """queue.Queue with its depth and capacity exported as metrics."""

    def __init__(self, name: str, capacity: int, metrics: Metrics) -> None:
        self.name = name
        self._q: queue.Queue = queue.Queue(maxsize=capacity)
        self._depth = metrics.queue_depth(name)
        metrics.queue_capacity(name).set(capacity)

    def put(self, item: Any, give_up: Callable[[], bool] | None = None) -> bool:
        """Block until there is room; return False only if ``give_up()`` turns true meanwhile."""
        while True:
            try:
                self._q.put(item, timeout=0.2)
                self._depth.set(self._q.qsize())
                return True
            except queue.Full:
                if give_up is not None and give_up():
                    return False

    def put_final(self, item: Any) -> None:
        self._q.put(item)

    def get(self, timeout: float) -> Any:
        """The next item, or None when nothing came within ``timeout`` seconds."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        self._depth.set(self._q.qsize())
        return item


class _Ticker:
    """Says when a loop's once-a-second tick is due."""

    def __init__(self) -> None:
        self._next = time.monotonic() + TICK_SECONDS

    def due(self) -> bool:
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + TICK_SECONDS
        return True


@dataclass
class Branch:
    """One sink with its own stages, queue and thread."""

    name: str
    sink: Sink
    stages: list[Stage]
    queue: BoundedQueue
    thread: threading.Thread | None = None
    error: BaseException | None = None
    buffer: DiskBuffer | None = None
    drain_thread: threading.Thread | None = None
    intake_done: threading.Event = field(default_factory=threading.Event)
    handed: int = 0  # rows given to the sink or its disk buffer (sink thread only)
    replayed_rows: int = 0  # rows of batches replayed from the disk buffer (drain thread only)
    replay_left: int = 0  # batches of an earlier run still to be read from the buffer


@dataclass
class SinkOutcome:
    """What became of the rows one sink was given in a run."""

    delivered: int = 0
    dead_lettered: int = 0
    dropped: int = 0  # by a full disk buffer (when_full: drop_newest), counted on purpose
    undelivered: int = 0  # handed to the sink and neither delivered, dead-lettered nor dropped
    buffered_batches: int = 0  # still in the disk buffer, delivered at the next start
    unfinished: bool = False  # the sink was still busy when the shutdown deadline passed


@dataclass
class RunSummary:
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    sinks: dict[str, int] = field(default_factory=dict)  # rows delivered per sink
    outcomes: dict[str, SinkOutcome] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    rejected: int = 0
    seconds: float = 0.0
    clean_shutdown: bool = True
    stopped: bool = False  # by SIGTERM/SIGINT (Pipeline.stop), not by the end of the input

    def undelivered(self, name: str) -> bool:
        """True when the sink holds flows it did not deliver in a way the exit status must report.

        After a stop by signal, batches kept in a disk buffer are what stopping means (they
        are durable and go out at the next start); at the end of a finite input they are not.
        """
        o = self.outcomes[name]
        if o.unfinished:
            return True
        if o.buffered_batches:
            return not self.stopped
        return o.undelivered > 0

    @property
    def exit_code(self) -> int:
        """The most serious outcome: failure, undelivered, dead-lettered, rejected input, ok."""
        if self.errors:
            return EXIT_FAILED
        if not self.clean_shutdown or any(self.undelivered(name) for name in self.outcomes):
            return EXIT_UNDELIVERED
        if any(o.dead_lettered for o in self.outcomes.values()):
            return EXIT_DEAD_LETTERED
        return EXIT_REJECTED if self.rejected else EXIT_OK


def _context(pc: PipelineConfig, metrics: Metrics, name: str, config_key: str) -> Context:
    return Context(name=name, metrics=metrics, node_name=pc.node_name, data_dir=pc.data_dir,
                   config_file=pc.filename, config_key=config_key)


def _build_stages(specs: list[ComponentSpec], metrics: Metrics, pc: PipelineConfig, prefix: str,
                  key_prefix: str = "") -> list[Stage]:
    stages = []
    for i, spec in enumerate(specs):
        name = spec.name if spec.name != spec.type else f"{prefix}{spec.type}[{i}]"
        ctx = _context(pc, metrics, name, f"{key_prefix}stages[{i}]")
        stages.append(registry.build("stages", spec.type, spec.config, ctx))
    return stages


def _run_stages(stages: list[Stage], envs: list[Envelope]) -> list[Envelope]:
    """Each stage in order; a run of mask stages copies the rows of a flow batch once, at its end."""
    i = 0
    while i < len(stages):
        if isinstance(stages[i], MaskStage):
            j = i + 1
            while j < len(stages) and isinstance(stages[j], MaskStage):
                j += 1
            masks = [stage for stage in stages[i:j] if isinstance(stage, MaskStage)]
            envs = [env.with_batch(select_through(masks, env.batch)) if env.kind == "flows" else env
                    for env in envs]
            i = j
            continue
        out: list[Envelope] = []
        for env in envs:
            out.extend(stages[i].process(env))
        envs = out
        i += 1
    return envs


def _tick_stages(stages: list[Stage], now_ns: int) -> list[Envelope]:
    """Tick each stage; what a stage emits passes through the stages after it."""
    out: list[Envelope] = []
    for i, stage in enumerate(stages):
        emitted = stage.tick(now_ns)
        if emitted:
            out.extend(_run_stages(stages[i + 1:], emitted))
    return out


def _close_stages(stages: list[Stage]) -> list[Envelope]:
    out: list[Envelope] = []
    for i, stage in enumerate(stages):
        emitted = stage.close()
        if emitted:
            out.extend(_run_stages(stages[i + 1:], emitted))
    return out


class Pipeline:
    """A configured pipeline, ready to :meth:`run`."""

    def __init__(self, config: PipelineConfig, metrics: Metrics | None = None,
                 sources: list[Source] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.log = structlog.get_logger().bind(component="pipeline")
        self.stop_event = threading.Event()  # asks sources to stop
        self._stop_requested: float | None = None
        self._shutdown_from: float | None = None  # when shutdown_timeout started counting
        self._failed = threading.Event()
        self._errors: list[str] = []
        # Checkpoints, buffers and dead letters hold flow data: readable by this user only.
        Path(config.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)

        self.sources: list[Source] = list(sources or [])
        for i, spec in enumerate(config.sources):
            ctx = _context(config, self.metrics, spec.name, f"sources[{i}]")
            self.sources.append(registry.build("sources", spec.type, spec.config, ctx))
        self.stages = _build_stages(config.stages, self.metrics, config, "", "")
        self.branches: list[Branch] = []
        for i, spec in enumerate(config.sinks):
            ctx = _context(config, self.metrics, spec.name, f"sinks[{i}]")
            sink = registry.build("sinks", spec.type, spec.config, ctx)
            branch = self._branch(spec.name, sink, _build_stages(spec.stages, self.metrics, config,
                                                                 f"{spec.name}.", f"sinks[{i}]."))
            if spec.buffer is not None and spec.buffer.type == "disk":
                directory = Path(spec.buffer.path) if spec.buffer.path else Path(config.data_dir) / "buffers" / spec.name
                branch.buffer = DiskBuffer(directory, spec.buffer, self.metrics, spec.name, ctx.log)
        # Sinks a source brings along (the agent's Observer) get a branch of their own like the configured
        # sinks: fed after the shared stages.
        extra = len(sources or [])
        for i, source in enumerate(self.sources):
            key = f"sources[{i - extra}]" if i >= extra else source.ctx.name
            for name, sink in source.companion_sinks(key):
                self._branch(name, sink, [])
        self.input = BoundedQueue("input", config.queue_batches, self.metrics)
        self._source_threads: list[threading.Thread] = []
        self._flows_in = {s.ctx.name: self.metrics.flows_in(s.ctx.name) for s in self.sources}
        self.metrics.ready = lambda: not self._failed.is_set()
        # hubble_* series of what enters the pipeline, before the shared stages (``hubble_metrics:``)
        self.hubble_metrics = HubbleMetrics(self.metrics, config.hubble_metrics) if config.hubble_metrics.enabled else None

    def _branch(self, name: str, sink: Sink, stages: list[Stage]) -> Branch:
        branch = Branch(name, sink, stages, BoundedQueue(f"sink:{name}", self.config.queue_batches, self.metrics))
        self.branches.append(branch)
        return branch

    # -- sources ------------------------------------------------------------------------------
    def _emit_for(self, source: Source) -> Callable[[pa.RecordBatch, Receipt], None]:
        counter = self._flows_in[source.ctx.name]

        def emit(batch: pa.RecordBatch, receipt: Receipt) -> None:
            counter.inc(batch.num_rows)
            # A stopping pipeline still takes what sources emit while they wind down (the agent's
            # final flow-table flush): the router drains the queue until every source has returned.
            # Only a failed pipeline, or a stop that outlived shutdown_timeout, refuses a batch; its
            # receipt then never completes, so a checkpointing source reads it again next time.
            if not self.input.put(Envelope(batch, [receipt]), self._give_up):
                self.log.warning("batch not accepted: the pipeline is failing or its shutdown deadline "
                                 "passed", source=source.ctx.name, rows=batch.num_rows)

        return emit

    def _run_source(self, source: Source) -> None:
        try:
            source.run(self._emit_for(source), self.stop_event)
        except Exception as exc:  # noqa: BLE001 - reported, then the pipeline stops
            self._fail(f"source {source.ctx.name}: {exc}", exc)

    # -- router -------------------------------------------------------------------------------
    def _fan_out(self, envs: list[Envelope]) -> None:
        for env in envs:
            if env.batch.num_rows == 0 or not self.branches:
                env.ack()
                continue
            for _ in self.branches[1:]:
                env.retain()
            for branch in self.branches:
                branch.queue.put(Envelope(env.batch, list(env.receipts), env.kind), self._failed.is_set)

    def _router(self, sources_done: threading.Event) -> None:
        ticker = _Ticker()
        while True:
            item = self.input.get(timeout=0.2)
            if item is _STOP:
                break
            try:
                if item is not None:
                    if item.kind == "flows" and self.hubble_metrics is not None:
                        self.hubble_metrics.observe(item.batch)
                    self._fan_out(_run_stages(self.stages, [item]))
                if ticker.due():
                    self._fan_out(_tick_stages(self.stages, time.time_ns()))
            except Exception as exc:  # noqa: BLE001
                self._fail(f"stage: {exc}", exc)
                break
        try:
            self._fan_out(_close_stages(self.stages))
        except Exception as exc:  # noqa: BLE001
            self._fail(f"stage close: {exc}", exc)
        for branch in self.branches:
            branch.queue.put_final(_STOP)

    # -- sinks --------------------------------------------------------------------------------
    def _sink_worker(self, branch: Branch) -> None:
        """Sink stages, then the sink itself — or the disk buffer, which a drain thread empties."""
        sink = branch.sink
        counter = self.metrics.flows_out(branch.name)
        buffer = branch.buffer
        ticker = _Ticker()

        def deliver(envs: list[Envelope]) -> None:
            for env in envs:
                if env.batch.num_rows == 0:
                    env.ack()
                    continue
                branch.handed += env.batch.num_rows
                if buffer is not None:
                    buffer.append(env, self.stop_event)
                    continue
                env.on_ack = counter.inc
                sink.write(env)

        try:
            while True:
                item = branch.queue.get(timeout=0.2)
                if item is _STOP:
                    break
                if item is not None:
                    deliver(_run_stages(branch.stages, [item]))
                if buffer is not None:
                    buffer.maybe_sync()
                if ticker.due():
                    now = time.time_ns()
                    deliver(_tick_stages(branch.stages, now))
                    if buffer is None:
                        sink.tick(now)
            deliver(_close_stages(branch.stages))
            if buffer is not None:
                buffer.sync()
                branch.intake_done.set()
                return  # the drain thread flushes and closes the sink
            sink.flush()
        except Exception as exc:  # noqa: BLE001
            branch.error = exc
            self._fail(f"sink {branch.name}: {exc}", exc)
            branch.intake_done.set()
        if buffer is None:
            self._close_sink(branch)

    def _drain(self, branch: Branch) -> None:
        """Deliver a disk buffer's batches to its sink, in order, until intake ends and it is empty."""
        sink, buffer = branch.sink, branch.buffer
        assert buffer is not None
        counter = self.metrics.flows_out(branch.name)
        ticker = _Ticker()
        try:
            while True:
                env = buffer.read(timeout=0.2)
                if env is not None:
                    if branch.replay_left > 0:  # the buffer replays its oldest batches first
                        branch.replay_left -= 1
                        branch.replayed_rows += env.batch.num_rows
                    env.on_ack = counter.inc
                    sink.write(env)
                elif branch.intake_done.is_set() and buffer.empty:
                    break
                if ticker.due():
                    sink.tick(time.time_ns())
            sink.flush()
        except Exception as exc:  # noqa: BLE001
            branch.error = exc
            self._fail(f"sink {branch.name}: {exc}", exc)
        finally:
            self._close_sink(branch)
            buffer.close()

    def _close_sink(self, branch: Branch) -> None:
        try:
            branch.sink.close()
        except Exception as exc:  # noqa: BLE001
            self.log.error("sink close failed", sink=branch.name, error=str(exc))

    def _give_up(self) -> bool:
        if self._failed.is_set():
            return True
        return self._stop_requested is not None and \
            time.monotonic() - self._stop_requested > self.config.shutdown_timeout

    def _fail(self, message: str, exc: BaseException) -> None:
        self.log.error("pipeline component failed", error=message, exc_type=type(exc).__name__)
        self._errors.append(message)
        self._failed.set()
        if self._shutdown_from is None:
            self._shutdown_from = time.monotonic()  # a failing run drains within shutdown_timeout too
        self.stop_event.set()

    def _join(self, thread: threading.Thread) -> None:
        """Wait for a thread: without a deadline, until a signal or a failure starts one."""
        while thread.is_alive():
            started = self._shutdown_from
            if started is not None:
                remaining = started + self.config.shutdown_timeout - time.monotonic()
                if remaining <= 0:
                    return
                thread.join(timeout=min(0.5, remaining))
            else:
                thread.join(timeout=0.5)

    def left(self, branch: Branch) -> int:
        """Rows handed to a branch's sink not yet delivered, dead-lettered or dropped (for progress)."""
        name = branch.name
        settled = (self.metrics.value("flowship_sink_flows_total", sink=name)
                   + self.metrics.value("flowship_sink_dead_letter_total", sink=name)
                   + self.metrics.value("flowship_buffer_dropped_total", sink=name))
        return max(0, branch.handed + branch.replayed_rows - int(settled))

    def pending(self) -> dict[str, int]:
        """``left`` for every sink: what the progress line shows while the sinks drain."""
        return {branch.name: self.left(branch) for branch in self.branches}

    # -- run ----------------------------------------------------------------------------------
    def start_sinks(self) -> None:
        for branch in self.branches:
            branch.sink.start()
            if branch.buffer is not None:
                branch.replay_left = branch.buffer.open()

    def run(self, on_started: Callable[[Pipeline], None] | None = None) -> RunSummary:
        """Run until the sources finish or :meth:`stop` is called; return the summary."""
        started = time.monotonic()
        summary = RunSummary()
        self.start_sinks()
        for branch in self.branches:
            branch.thread = threading.Thread(target=self._sink_worker, args=(branch,),
                                             name=f"sink:{branch.name}", daemon=True)
            branch.thread.start()
            if branch.buffer is not None:
                branch.drain_thread = threading.Thread(target=self._drain, args=(branch,),
                                                       name=f"drain:{branch.name}", daemon=True)
                branch.drain_thread.start()
        sources_done = threading.Event()
        router = threading.Thread(target=self._router, args=(sources_done,), name="router", daemon=True)
        router.start()
        for source in self.sources:
            t = threading.Thread(target=self._run_source, args=(source,), name=f"source:{source.ctx.name}",
                                 daemon=True)
            t.start()
            self._source_threads.append(t)
        if on_started:
            on_started(self)
        for t in self._source_threads:
            while t.is_alive():
                t.join(timeout=0.5)
        sources_done.set()
        self.input.put_final(_STOP)
        self._join(router)
        for branch in self.branches:
            if branch.thread:
                self._join(branch.thread)
            if branch.drain_thread:
                self._join(branch.drain_thread)
                if branch.drain_thread.is_alive() and not branch.thread.is_alive():
                    # The sink did not take everything in time; the rest waits on disk for the next start.
                    self.log.warning("sink did not drain its disk buffer before the shutdown deadline; "
                                     "the remaining batches are kept for the next start", sink=branch.name,
                                     batches=branch.buffer.unacknowledged)
                    continue
            if branch.thread and branch.thread.is_alive():
                summary.clean_shutdown = False
                self.log.error("sink did not finish within shutdown_timeout; its undelivered flows are not "
                               "acknowledged (a checkpointing source reads them again at the next start)",
                               sink=branch.name, shutdown_timeout=self.config.shutdown_timeout)
        if router.is_alive():
            summary.clean_shutdown = False
        for source in self.sources:
            try:
                source.close()
            except Exception as exc:  # noqa: BLE001
                self.log.error("source close failed", source=source.ctx.name, error=str(exc))
        summary.seconds = time.monotonic() - started
        for source in self.sources:
            info = dict(source.summary())
            info["flows"] = int(self.metrics.value("flowship_flows_in_total", source=source.ctx.name))
            summary.sources[source.ctx.name] = info
            summary.rejected += int(info.get("rejected", 0))
        summary.stopped = self._stop_requested is not None
        for branch in self.branches:
            summary.outcomes[branch.name] = outcome = self._outcome(branch)
            summary.sinks[branch.name] = outcome.delivered
            if branch.buffer is not None and branch.buffer.damaged_records:
                summary.dropped[f"disk buffer of {branch.name}/damaged records"] = branch.buffer.damaged_records
                summary.dropped[f"disk buffer of {branch.name}/rows of damaged records"] = branch.buffer.damaged_rows
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == "flowship_stage_dropped_total" and sample.value:
                    summary.dropped[f"{sample.labels['stage']}/{sample.labels['reason']}"] = sample.value
        summary.errors = list(self._errors)
        return summary

    def _outcome(self, branch: Branch) -> SinkOutcome:
        name, value = branch.name, self.metrics.value
        outcome = SinkOutcome(delivered=int(value("flowship_sink_flows_total", sink=name)),
                              dead_lettered=int(value("flowship_sink_dead_letter_total", sink=name)),
                              dropped=int(value("flowship_buffer_dropped_total", sink=name)))
        outcome.undelivered = self.left(branch)
        if branch.buffer is not None:
            outcome.buffered_batches = branch.buffer.unacknowledged
        # A drain thread still running only means batches wait on disk; a sink thread still running
        # means flows that are in no buffer at all.
        outcome.unfinished = branch.thread is not None and branch.thread.is_alive()
        return outcome

    def stop(self) -> None:
        """Ask sources to stop; the run loop then drains and flushes within ``shutdown_timeout``."""
        if self._stop_requested is None:
            self._stop_requested = time.monotonic()
        if self._shutdown_from is None:
            self._shutdown_from = self._stop_requested
        self.stop_event.set()
