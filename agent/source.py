"""``agent`` source: this node's flows, captured in the kernel with eBPF.

The source polls :class:`flowship.agent.capture.KernelCapture`, gathers about a second of kernel events (or
``batch_events`` of them, whichever comes first), assembles them into one flow batch
(:mod:`flowship.agent.assemble`: L3/L4, drops, L7, enrichment, ids) and emits it with a receipt. With ``observer``
enabled the source also brings a companion sink, the Hubble Observer server, which the pipeline feeds after
the shared stages like every other sink.

Nothing to checkpoint: the kernel keeps no history to read again. What an abrupt death loses is the
counters the flow table accumulated since each flow's last event (at most ``report_interval`` of
traffic per flow), the records waiting in the rings (under a second) and the batches emitted but not yet
acknowledged by every sink (the ``flowship_agent_unacked_rows`` gauge). A clean stop (SIGTERM, Ctrl-C)
detaches, flushes every flow-table entry and emits it before the pipeline drains.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flowship.agent import drop_reasons
from flowship.agent.assemble import AssembleConfig, Assembler
from flowship.agent.capture import DEFAULT_HTTP_PORTS, CaptureBatch, CaptureConfig, KernelCapture, KernelOptions
from flowship.agent.enrich import EnrichConfig, Enricher, detect_local_ips
from flowship.agent.l7_http import DEFAULT_HEADER_ALLOW
from flowship.components import Context, Emit, Sink, Source
from flowship.config import ByteSize, Duration
from flowship.pipeline.envelope import Receipt

try:
    from flowship.agent.observer import DEFAULT_ADDRESS, ObserverConfig
except ImportError:  # an installation without the Observer server: same keys, the server is skipped
    DEFAULT_ADDRESS = "unix:///run/flowship/hubble.sock"

    @dataclass
    class ObserverConfig:  # type: ignore[no-redef]
        """``observer:`` — the Hubble Observer gRPC server (not part of this installation)."""

        enabled: bool = True
        address: str = DEFAULT_ADDRESS
        max_flows: int = 4095
        tls: Any = None


class AgentStartupError(RuntimeError):
    """The capture cannot start here; the message names what is missing and what to do."""


# CaptureConfig fields that the agent's config spells differently (in seconds and bytes there, with units here)
_CAPTURE_KEYS = {"report_interval_s": "report_interval", "idle_timeout_s": "idle_timeout",
                 "flow_ring_bytes": "flow_ring_size", "l7_ring_bytes": "l7_ring_size"}


@dataclass
class AgentSourceConfig(KernelOptions):
    """``type: agent`` — every key is optional; see docs/agent.md.

    The kernel-side keys shared with :class:`CaptureConfig` are declared in :class:`KernelOptions`.
    """

    interfaces: list[str] | None = None  # glob patterns; default: every non-loopback interface that is up
    report_interval: Duration = Duration(CaptureConfig.report_interval_s)  # an event per active flow this often
    idle_timeout: Duration = Duration(CaptureConfig.idle_timeout_s)  # flows without packets this long are evicted
    http_ports: list[int] = field(default_factory=lambda: list(DEFAULT_HTTP_PORTS))
    http_headers: list[str] = field(default_factory=lambda: list(DEFAULT_HEADER_ALLOW))
    drop_export_benign: list[str] = field(default_factory=list)  # benign drop reasons to export (TRACED); ALL
    flow_ring_size: ByteSize = ByteSize(CaptureConfig.flow_ring_bytes)
    l7_ring_size: ByteSize = ByteSize(CaptureConfig.l7_ring_bytes)
    batch_interval: Duration = Duration(1.0)  # emit at least this often
    batch_events: int = 16384  # ... or when this many kernel events are waiting
    buffer_events: int = 262144  # events read from the rings and held while the pipeline is slow (~34 MB)
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)

    def capture_config(self) -> CaptureConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(KernelOptions)}
        return CaptureConfig(
            **shared,
            report_interval_s=float(self.report_interval),
            idle_timeout_s=float(self.idle_timeout),
            http_ports=tuple(self.http_ports),
            flow_ring_bytes=int(self.flow_ring_size),
            l7_ring_bytes=int(self.l7_ring_size),
        )

    def validate(self) -> list[str]:
        problems = []
        try:
            problems += self.capture_config().problems(lambda name: _CAPTURE_KEYS.get(name, name))[:1]
        except (ValueError, TypeError) as exc:
            problems.append(str(exc))
        problems += drop_reasons.export_problems(self.drop_export_benign)
        if self.buffer_events < 1:
            problems.append(f"buffer_events: expected an integer >= 1, got {self.buffer_events}")
        if self.batch_events < 1:
            problems.append(f"batch_events: expected an integer >= 1, got {self.batch_events}")
        if self.flow_table_entries < 1:
            problems.append(f"flow_table_entries: expected an integer >= 1, got {self.flow_table_entries}")
        return problems


def _netns_ips(netns: str) -> list[str]:
    """Addresses of the interfaces of another network namespace (its 'host' IPs)."""
    from flowship.agent.attach import call_in_netns

    return call_in_netns(netns, detect_local_ips)


class AgentSource(Source):
    config: AgentSourceConfig

    def __init__(self, config: AgentSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.capture: KernelCapture | None = None
        self.assembler: Assembler | None = None
        self.observer: Any = None
        self.started = threading.Event()  # set once attached (tests and the demo wait on it)
        self._lock = threading.Lock()
        self.counts = {"events": 0, "rows": 0, "batches": 0, "emitted_packets": 0, "acked_packets": 0,
                       "acked_rows": 0}
        m = ctx.metrics
        self._unacked = m.gauge("flowship_agent_unacked_rows",
                                "Rows emitted by the agent and not yet acknowledged by every sink "
                                "(what an abrupt stop would lose besides in-kernel counters).", ["source"]
                                ).labels(ctx.name)
        self._interfaces = m.gauge("flowship_agent_interfaces", "Interfaces the agent is attached to.",
                                   ["source"]).labels(ctx.name)
        self._assembly = m.histogram("flowship_agent_assembly_seconds", "Time to assemble one flow batch.",
                                     ["source"]).labels(ctx.name)
        self._names: dict[int, str] = {}
        self._ring_seen: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def _enricher(self) -> Enricher:
        cfg = self.config.enrich
        if self.config.netns and cfg.detect_host_ips:
            # The "node" is the namespace the capture attaches in: its addresses are reserved:host.
            cfg = dataclasses.replace(cfg, detect_host_ips=False,
                                      host_ips=[*cfg.host_ips, *_netns_ips(self.config.netns)])
        return Enricher(cfg, self.ctx.node_name, self.ctx.metrics, self.ctx.log)

    def start_capture(self) -> KernelCapture:
        from flowship.agent import kernel_features

        problems = kernel_features.check().problems()
        if problems:
            raise AgentStartupError("the eBPF capture cannot start on this machine:\n  - " + "\n  - ".join(problems))
        cap = KernelCapture(log=self.ctx.log)
        cap.start(self.config.interfaces, self.config.capture_config())
        kernel_features.publish(self.ctx.metrics, self.ctx.name, cap.feature_states)
        for name, st in cap.feature_states.items():
            if not st.enabled:
                self.ctx.log.warning("capture feature off", feature=name, reason=st.detail)
        return cap

    def run(self, emit: Emit, stop: threading.Event) -> None:
        cfg = self.config
        enricher = self._enricher()
        self.assembler = Assembler(
            AssembleConfig(node_name=self.ctx.node_name, http_headers=tuple(cfg.http_headers),
                           drop_export_benign=drop_reasons.export_set(cfg.drop_export_benign)),
            metrics=self.ctx.metrics, source=self.ctx.name, enricher=enricher)
        enricher.start()
        cap = self.capture = self.start_capture()
        try:
            for error in cap.attach_errors():
                self.ctx.log.warning("interface not attached", error=error)
            self.ctx.log.info("agent capturing", interfaces=sorted(cap.interface_names().values()),
                              netns=cfg.netns or "(own)", aggregation=cfg.aggregation)
            self.started.set()
            reader = RingDrain(cap, max_events=max(cfg.buffer_events, cfg.batch_events))
            thread = threading.Thread(target=reader.run, args=(stop,), name=f"{self.ctx.name}:rings", daemon=True)
            thread.start()
            try:
                done = False
                while not done:
                    # Emit every batch_interval, or as soon as batch_events are waiting; a clean stop
                    # ends with the reader's final flush of the flow table (RingDrain.run).
                    pending, names, done = reader.take(float(cfg.batch_interval), cfg.batch_events)
                    self._names.update(names)
                    self._flush(pending, emit)
            finally:
                reader.abandon()  # no-op after a clean finish; on a failure here, stop without the final flush
                thread.join(timeout=30)
            if reader.error is not None:
                raise reader.error
        finally:
            cap.close()
            self.capture = None
            enricher.stop()

    def companion_sinks(self, config_key: str) -> list[tuple[str, Sink]]:
        """The Observer as a sink of its own, which the pipeline feeds after the shared stages.

        So the Hubble API serves what every other output receives (redacted, filtered), not the raw
        capture. ``config_key`` (``sources[0]``) lets a bind failure name the key to change.
        """
        ocfg = self.config.observer
        if not ocfg.enabled:
            return []
        try:
            from flowship.agent.observer import ObserverSink
        except ImportError:
            self.ctx.log.warning("observer.enabled is set but this installation has no Observer server "
                                 "(agent/observer.py): flows are exported without the Hubble API")
            return []
        name = f"{self.ctx.name}.observer"
        ctx = Context(name=name, metrics=self.ctx.metrics, node_name=self.ctx.node_name,
                      data_dir=self.ctx.data_dir, log=self.ctx.log.bind(component=name),
                      config_file=self.ctx.config_file, config_key=f"{config_key}.observer")
        sink = ObserverSink(ocfg, ctx)
        self.observer = sink.server
        return [(name, sink)]

    # -- batches -----------------------------------------------------------------------------

    def _flush(self, pending: list[CaptureBatch], emit: Emit) -> None:
        cap, asm = self.capture, self.assembler
        assert cap is not None and asm is not None
        self._interfaces.set(len(cap.attached()))
        ring = cap.ring_stats()
        asm.record_reader_losses({k: v - self._ring_seen.get(k, 0) for k, v in ring.items()})
        self._ring_seen = ring
        if not pending:
            return
        started = time.perf_counter()
        batch = asm.assemble(CaptureBatch.concat(pending), self._names)
        self._assembly.observe(time.perf_counter() - started)
        self.counts["events"] += sum(len(b) for b in pending)
        if batch.num_rows == 0:
            return
        self.emit_batch(batch, emit)

    def emit_batch(self, batch: pa.RecordBatch, emit: Emit) -> None:
        rows = batch.num_rows
        packets = _sum_l34_packets(batch)
        with self._lock:
            self.counts["rows"] += rows
            self.counts["batches"] += 1
            self.counts["emitted_packets"] += packets
            self._unacked.inc(rows)

        def done(receipt: Receipt) -> None:
            with self._lock:
                self.counts["acked_rows"] += rows
                self.counts["acked_packets"] += packets
            self._unacked.dec(rows)

        emit(batch, Receipt(on_done=done, rows=rows))

    def summary(self) -> dict[str, Any]:
        asm = self.assembler
        out: dict[str, Any] = {"kernel_events": self.counts["events"], "batches": self.counts["batches"]}
        if asm is not None:
            lost = {k: v for k, v in asm.lost_totals.items() if v}
            out["lost"] = sum(v for k, v in lost.items() if k in ("drop_ring", "l7_ring", "untracked"))
            out["postponed_flow_events"] = asm.lost_totals.get("flow_ring", 0)
        return out


class RingDrain:
    """Reads the capture's rings on a thread of its own, so that assembling and emitting a batch (and a
    pipeline slowed by a sink) never stops the rings from being drained.

    Holds at most ``max_events`` events; beyond that it stops reading and the kernel counts what it
    cannot write (nothing is dropped silently). On stop it detaches and flushes the flow table
    (``KernelCapture.finish``) and hands that over as the last batch.
    """

    def __init__(self, cap: KernelCapture, max_events: int) -> None:
        self.cap = cap
        self.max_events = max_events
        self.cond = threading.Condition()
        self.pending: list[CaptureBatch] = []
        self.events = 0
        self.names: dict[int, str] = {}
        self.done = False
        self.abandoned = False
        self.error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        cap = self.cap
        try:
            while not stop.is_set() and not self.abandoned:
                with self.cond:
                    while self.events >= self.max_events and not (stop.is_set() or self.abandoned):
                        self.cond.wait(0.2)  # the consumer is behind: leave the rest in the rings
                batch = cap.poll(0.2)
                names = cap.interface_names()  # before an interface vanishes with its name
                self._put(batch, names)
            if not self.abandoned:
                names = cap.interface_names()
                self._put(cap.finish(), names)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self.error = exc
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def _put(self, batch: CaptureBatch, names: dict[int, str]) -> None:
        with self.cond:
            self.names.update(names)
            if len(batch) or any(batch.lost.values()):
                self.pending.append(batch)
                self.events += len(batch)
                self.cond.notify_all()

    def take(self, interval: float, min_events: int) -> tuple[list[CaptureBatch], dict[int, str], bool]:
        """Wait up to ``interval`` (less once ``min_events`` wait); returns (batches, names, reader finished)."""
        deadline = time.monotonic() + interval
        with self.cond:
            while not self.done and self.events < min_events:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            pending, self.pending, self.events = self.pending, [], 0
            self.cond.notify_all()
            return pending, dict(self.names), self.done and not self.pending

    def abandon(self) -> None:
        """The consumer is leaving (failure): stop without the final flush."""
        with self.cond:
            self.abandoned = True
            self.cond.notify_all()


def _sum_l34_packets(batch: pa.RecordBatch) -> int:
    """Packets counted by the L3/L4 rows of a batch (drops and L7 rows excluded)."""
    mask = pc.and_(pc.equal(batch.column("flow_type"), "L3_L4"), pc.equal(batch.column("verdict"), "FORWARDED"))
    total = pc.sum(pc.filter(batch.column("packets"), mask.fill_null(False))).as_py()
    return int(total or 0)
