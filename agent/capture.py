"""KernelCapture: load the BPF object, attach it, and turn its ring buffers into numpy batches.

Kernel output goes through one hop per module: loader (libbpf) -> attach (interfaces) -> ringbuf
(records) -> events (dtypes). What comes out of poll() is a CaptureBatch of structured arrays whose
fields are those of bpf/flowship_abi.h; flow assembly and enrichment work on those columns.

Time: every *_ns field is bpf_ktime_get_ns(), i.e. CLOCK_MONOTONIC. Each batch carries
wall_offset_ns = CLOCK_REALTIME - CLOCK_MONOTONIC measured when the batch was read (re-measured every
poll, so NTP steps are followed); wall-clock time = field + wall_offset_ns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from flowship.agent import events as ev
from flowship.agent import kernel_features, loader
from flowship.agent.attach import Attacher, Attachment, AttachMode, netns_path
from flowship.agent.ringbuf import READERS, RingReader, RingWaiter

DEFAULT_HTTP_PORTS = (80, 8080, 8000, 3000, 5000, 9090)

LOSS_STATS = {
    "flow_ring": ev.Stat.LOST_FLOW_RING,
    "drop_ring": ev.Stat.LOST_DROP_RING,
    "l7_ring": ev.Stat.LOST_L7_RING,
    "flow_table_full": ev.Stat.LOST_FLOW_MAP,
    "untracked": ev.Stat.LOST_UNTRACKED,
}
"""Loss counters by name. flow_ring: an event was postponed (counters stay in the entry, nothing is
lost unless the entry is evicted in a later ring-full sweep); drop_ring/l7_ring: events lost;
flow_table_full: packets reported as untracked events; untracked: packets counted nowhere."""


@dataclass
class KernelOptions:
    """Kernel-side settings that CaptureConfig and the agent's config (``type: agent``) share by name."""

    netns: str | None = None  # attach inside this network namespace (name under /run/netns or a path)
    aggregation: Literal["flow", "packet"] = "flow"
    http: bool = True
    http_all_ports: bool = False
    dns: bool = True
    dns_port: int = 53
    l7_snap_len: int = 256  # payload bytes per L7 record, multiple of 8, <= 1024
    drops: bool = True
    drop_netns: str | None = None  # report drops of this netns only (name or path); None: all namespaces
    flow_table_entries: int = 65536
    attach_mode: AttachMode = "auto"


@dataclass
class CaptureConfig(KernelOptions):
    """Everything the kernel side can be told; defaults are the agent's defaults."""

    report_interval_s: float = 5.0  # periodic event per active flow
    idle_timeout_s: float = 30.0  # sweep evicts entries without packets for this long
    ended_timeout_s: float = 2.0  # ... and ended (FIN/FIN, RST) entries this long after their last packet
    sweep_interval_s: float | None = 1.0  # poll() sweeps this often; None: only explicit sweep()
    http_ports: tuple[int, ...] = DEFAULT_HTTP_PORTS
    flow_ring_bytes: int = 8 << 20
    l7_ring_bytes: int = 2 << 20
    reader: Literal["mmap", "libbpf"] = "mmap"
    object_path: Path = loader.DEFAULT_OBJECT

    def problems(self, key: Callable[[str], str] = str) -> list[str]:
        """What is wrong, in the order of the checks; ``key`` turns a field name into the setting's name."""
        out = []
        if self.report_interval_s <= 0:
            out.append(f"{key('report_interval_s')} must be > 0")
        if self.l7_snap_len <= 0 or self.l7_snap_len % 8 or self.l7_snap_len > ev.L7_SNAP_MAX:
            out.append(f"{key('l7_snap_len')} must be a multiple of 8 between 8 and {ev.L7_SNAP_MAX}")
        for name in ("flow_ring_bytes", "l7_ring_bytes"):
            v = getattr(self, name)
            if v < os.sysconf("SC_PAGE_SIZE") or v & (v - 1):
                out.append(f"{key(name)} must be a power of two of at least one page, got {v}")
        out += [f"port {p} out of range" for p in (*self.http_ports, self.dns_port) if not 0 < p < 65536][:1]
        if self.aggregation not in ("flow", "packet"):
            out.append(f"{key('aggregation')} must be 'flow' or 'packet'")
        if self.reader not in READERS:
            out.append(f"{key('reader')} must be one of {sorted(READERS)}")
        return out

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        problems = self.problems()
        if problems:
            raise ValueError(problems[0])

    def kernel_config(self) -> np.ndarray:
        """struct fs_config for .rodata."""
        cfg = np.zeros((), dtype=ev.CONFIG_DTYPE)
        cfg["report_interval_ns"] = int(self.report_interval_s * 1e9)
        cfg["aggregation"] = ev.Aggregation.PACKET if self.aggregation == "packet" else ev.Aggregation.FLOW
        cfg["l7_snap_len"] = self.l7_snap_len
        flags = 0
        if self.http:
            flags |= ev.L7Flags.HTTP
            if self.http_all_ports:
                flags |= ev.L7Flags.ALL_PORTS
        if self.dns:
            flags |= ev.L7Flags.DNS
        cfg["l7_flags"] = flags
        cfg["dns_port"] = self.dns_port
        if self.drop_netns:
            cfg["drop_netns_ino"] = os.stat(netns_path(self.drop_netns)).st_ino
        ports = np.zeros(ev.L7_PORT_WORDS, dtype=np.uint64)
        for p in self.http_ports:
            ports[p >> 6] |= np.uint64(1 << (p & 63))
        cfg["l7_ports"] = ports
        return cfg


@dataclass
class SweepResult:
    """Outcome of one flow-table sweep."""

    visited: int
    reported: int
    evicted: int
    ring_full: int


@dataclass
class CaptureBatch:
    """Everything read in one poll, as columns.

    flows: FLOW_EVENT_DTYPE rows with kind == FLOW (counters since the previous event of the entry);
    drops: FLOW_EVENT_DTYPE rows with kind == DROP; l7: l7_event_dtype(snap) rows;
    lost / stats: deltas of the kernel's counters since the previous batch.
    """

    flows: np.ndarray
    drops: np.ndarray
    l7: np.ndarray
    lost: dict[str, int]
    stats: dict[str, int]
    wall_offset_ns: int

    def __len__(self) -> int:
        return len(self.flows) + len(self.drops) + len(self.l7)

    def wall_ns(self, mono_ns: np.ndarray) -> np.ndarray:
        """CLOCK_MONOTONIC nanoseconds (any *_ns column) to wall-clock nanoseconds since the epoch."""
        return mono_ns.astype(np.int64) + np.int64(self.wall_offset_ns)

    @staticmethod
    def concat(batches: Sequence[CaptureBatch]) -> CaptureBatch:
        """One batch from several (the latest wall offset wins)."""
        if not batches:
            raise ValueError("no batches")
        keys = batches[0].stats.keys()
        return CaptureBatch(
            flows=np.concatenate([b.flows for b in batches]),
            drops=np.concatenate([b.drops for b in batches]),
            l7=np.concatenate([b.l7 for b in batches]),
            lost={k: sum(b.lost[k] for b in batches) for k in batches[0].lost},
            stats={k: sum(b.stats[k] for b in batches) for k in keys},
            wall_offset_ns=batches[-1].wall_offset_ns,
        )


def wall_offset_ns(samples: int = 5) -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, from the tightest of a few bracketed readings."""
    best_gap, best = None, 0
    for _ in range(samples):
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best_gap is None or m2 - m1 < best_gap:
            best_gap, best = m2 - m1, r - (m1 + m2) // 2
    return best


@dataclass
class _State:
    obj: loader.BpfObject
    flow_ring: RingReader
    l7_ring: RingReader
    waiter: RingWaiter
    stats_map: loader.BpfMap
    sweep_prog: loader.BpfProgram
    attacher: Attacher | None = None
    drop_link: loader.BpfLink | None = None
    last_stats: np.ndarray = field(default_factory=lambda: np.zeros(ev.STAT_COUNT, dtype=np.uint64))
    last_sweep: float = 0.0


class KernelCapture:
    """Kernel flow capture on a set of interfaces.

    with KernelCapture().start(["veth*"], CaptureConfig()) as cap:
        batch = cap.poll(1.0)      # CaptureBatch
        ...
        last = cap.finish()        # detach, flush every entry, return what is left
    """

    def __init__(self, log: Any = None) -> None:
        self.log = log or structlog.get_logger().bind(component="agent.capture")
        self.config = CaptureConfig()
        self.features: kernel_features.KernelFeatures | None = None
        self.feature_states: dict[str, kernel_features.FeatureState] = {}
        self._st: _State | None = None
        self._ncpu = 0
        self.l7_dtype = ev.l7_event_dtype(self.config.l7_snap_len)

    # ---- lifecycle ----

    def start(self, interfaces: Sequence[str] | None = None, config: CaptureConfig | None = None) -> KernelCapture:
        """Load, configure and attach. interfaces: glob patterns; None = every non-loopback interface
        that is up; [] = attach no interface (drops and test runs only)."""
        if self._st is not None:
            raise RuntimeError("capture already started")
        cfg = config or CaptureConfig()
        cfg.validate()
        self.config = cfg
        self.features = feats = kernel_features.check()
        problems = feats.problems()
        if problems:
            raise loader.BpfUnavailableError("kernel capture cannot start:\n  - " + "\n  - ".join(problems))
        for w in feats.warnings():
            self.log.warning(w)

        drops = cfg.drops and feats.tp_btf_kfree_skb
        self.feature_states = states = self._probed_states(cfg, feats)
        obj = None
        try:
            try:
                obj = loader.load_object(cfg.object_path, lambda o: self._configure(o, cfg, drops))
            except loader.BpfLoadError as exc:
                if not drops or exc.program != "fs_kfree_skb":
                    raise
                # Drops are optional: a kernel whose verifier refuses the tracepoint program still captures flows.
                self.log.warning("kernel drops are not reported: the kernel refused fs_kfree_skb", error=str(exc))
                states["drops"] = kernel_features.FeatureState(False, "refused by the verifier")
                drops = False
                obj = loader.load_object(cfg.object_path, lambda o: self._configure(o, cfg, drops))
            self._st = self._state_of(obj, cfg)
            if drops:
                try:
                    self._st.drop_link = obj.program("fs_kfree_skb").attach()
                except OSError as exc:
                    self.log.warning("kernel drops are not reported: attaching fs_kfree_skb failed", error=str(exc))
                    states["drops"] = kernel_features.FeatureState(False, "tracepoint attach failed")
            if interfaces is None or list(interfaces):
                mode = cfg.attach_mode
                if mode == "auto":
                    mode = "tcx" if feats.tcx else "tc"
                att = Attacher(
                    obj.program("fs_tc_ingress").fd,
                    obj.program("fs_tc_egress").fd,
                    patterns=interfaces,
                    mode=mode,
                    netns=cfg.netns,
                    log=self.log,
                )
                self._st.attacher = att
                att.start()
                states["attach"] = kernel_features.FeatureState(True, att.mode if att.mode != "auto" else mode)
        except BaseException:
            self.close()
            if obj is not None:
                obj.close()
            raise
        self._st.last_sweep = time.monotonic()
        return self

    @staticmethod
    def _probed_states(cfg: CaptureConfig, feats: kernel_features.KernelFeatures) -> dict[str, kernel_features.FeatureState]:
        """What each feature will be, from the probes (start() corrects it when loading or attaching says otherwise)."""
        fs = kernel_features.FeatureState
        drop_reason = feats.drops_reason()
        return {
            "btf": fs(feats.btf, "vmlinux" if feats.btf else "missing"),
            "ringbuf": fs(feats.ringbuf, "ringbuf" if feats.ringbuf else "missing"),
            "attach": fs(feats.tcx or feats.clsact, "tcx" if feats.tcx else "tc" if feats.clsact else "missing"),
            "drops": (fs(False, "disabled by config") if not cfg.drops
                      else fs(False, drop_reason) if drop_reason else fs(True, "tp_btf/kfree_skb")),
            "l7": (fs(bool(cfg.http or cfg.dns), "+".join(n for n, on in (("http", cfg.http), ("dns", cfg.dns)) if on)
                      or "disabled by config")),
            "sweep": fs(feats.syscall_prog, "syscall program" if feats.syscall_prog else "missing"),
        }

    def _configure(self, obj: loader.BpfObject, cfg: CaptureConfig, drops: bool) -> None:
        kcfg = cfg.kernel_config()
        rodata = obj.rodata().initial_value()
        if len(rodata) != ev.CONFIG_DTYPE.itemsize:
            raise loader.BpfUnavailableError(
                f".rodata of {obj.path} is {len(rodata)} bytes, expected {ev.CONFIG_DTYPE.itemsize}: "
                "the object and agent/events.py disagree, rebuild with `make -C bpf`"
            )
        rodata[:] = kcfg.tobytes()
        obj.map("fs_flows").set_max_entries(cfg.flow_table_entries)
        obj.map("fs_events").set_max_entries(cfg.flow_ring_bytes)
        obj.map("fs_l7_events").set_max_entries(cfg.l7_ring_bytes)
        if not drops:  # not loaded at all: a kernel without the tracepoint must not fail the object
            obj.program("fs_kfree_skb").set_autoload(False)

    def _state_of(self, obj: loader.BpfObject, cfg: CaptureConfig) -> _State:
        self._ncpu = loader.num_possible_cpus()
        self.l7_dtype = ev.l7_event_dtype(cfg.l7_snap_len)
        reader = READERS[cfg.reader]
        flow_map = obj.map("fs_events")
        l7_map = obj.map("fs_l7_events")
        flow_ring = reader(flow_map.fd, flow_map.max_entries, ev.FLOW_EVENT_DTYPE)
        l7_ring = reader(l7_map.fd, l7_map.max_entries, self.l7_dtype)
        return _State(
            obj=obj,
            flow_ring=flow_ring,
            l7_ring=l7_ring,
            waiter=RingWaiter([flow_ring, l7_ring]),
            stats_map=obj.map("fs_stats"),
            sweep_prog=obj.program("fs_sweep"),
        )

    def __enter__(self) -> KernelCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def detach(self) -> None:
        """Stop observing: detach from every interface and from kfree_skb (maps stay readable)."""
        st = self._st
        if st is None:
            return
        if st.attacher is not None:
            st.attacher.close()
            st.attacher = None
        if st.drop_link is not None:
            st.drop_link.destroy()
            st.drop_link = None

    def finish(self) -> CaptureBatch:
        """Detach, then evict every flow-table entry; returns all events not yet polled."""
        self.detach()
        batches = []
        for _ in range(1000):
            res = self.sweep(flush=True)
            batches.append(self._read())
            if res.ring_full == 0:
                break
        return CaptureBatch.concat(batches)

    def close(self) -> None:
        """Detach and free everything. Counters still in the flow table are discarded: finish() first."""
        st = self._st
        if st is None:
            return
        self.detach()
        st.waiter.close()
        st.flow_ring.close()
        st.l7_ring.close()
        st.obj.close()
        self._st = None

    # ---- data ----

    def _state(self) -> _State:
        if self._st is None:
            raise RuntimeError("capture is not started")
        return self._st

    def poll(self, timeout: float | None = 0.0) -> CaptureBatch:
        """Wait up to timeout seconds for events, then return everything available (maybe empty)."""
        st = self._state()
        cfg = self.config
        if cfg.sweep_interval_s is not None and time.monotonic() - st.last_sweep >= cfg.sweep_interval_s:
            self.sweep()
        if timeout is None or timeout > 0:
            st.waiter.wait(timeout)  # level-triggered: returns at once when records are waiting
        return self._read()

    def _read(self) -> CaptureBatch:
        st = self._state()
        recs = st.flow_ring.read()
        l7 = st.l7_ring.read()
        is_drop = recs["kind"] == ev.Kind.DROP
        if is_drop.any():
            flows, drops = recs[~is_drop], recs[is_drop]
        else:
            flows, drops = recs, recs[:0]
        delta = self._stats_delta()
        return CaptureBatch(
            flows=flows,
            drops=drops,
            l7=l7,
            lost={name: int(delta[idx]) for name, idx in LOSS_STATS.items()},
            stats={s.name.lower(): int(delta[s]) for s in ev.Stat},
            wall_offset_ns=wall_offset_ns(),
        )

    def sweep(self, flush: bool = False) -> SweepResult:
        """Report flows whose report is due without a new packet, evict idle and ended entries
        (flush: every entry). The events arrive with the next poll()."""
        st = self._state()
        cfg = self.config
        args = np.zeros((), dtype=ev.SWEEP_ARGS_DTYPE)
        args["idle_ns"] = int(cfg.idle_timeout_s * 1e9)
        args["ended_ns"] = int(cfg.ended_timeout_s * 1e9)
        args["flush"] = int(flush)
        _, out = st.sweep_prog.run_syscall(args.tobytes())
        res = np.frombuffer(out, dtype=ev.SWEEP_ARGS_DTYPE)[0]
        st.last_sweep = time.monotonic()
        return SweepResult(int(res["visited"]), int(res["reported"]), int(res["evicted"]), int(res["ring_full"]))

    def ring_stats(self) -> dict[str, int]:
        """User-space reader counters: records skipped as discarded or malformed, per ring."""
        st = self._state()
        return {
            "flow_discarded": st.flow_ring.discarded,
            "flow_malformed": st.flow_ring.malformed,
            "l7_discarded": st.l7_ring.discarded,
            "l7_malformed": st.l7_ring.malformed,
        }

    def stats(self) -> dict[str, int]:
        """Cumulative kernel counters (all CPUs) by name."""
        totals = self._stats_totals()
        return {s.name.lower(): int(totals[s]) for s in ev.Stat}

    def _stats_totals(self) -> np.ndarray:
        st = self._state()
        stride = (ev.STATS_DTYPE.itemsize + 7) & ~7
        raw = st.stats_map.lookup(b"\0\0\0\0", stride * self._ncpu)
        per_cpu = np.frombuffer(raw, dtype=np.uint64).reshape(self._ncpu, stride // 8)[:, : ev.STAT_COUNT]
        return per_cpu.sum(axis=0, dtype=np.uint64)

    def _stats_delta(self) -> np.ndarray:
        st = self._state()
        totals = self._stats_totals()
        delta = totals - st.last_stats
        st.last_stats = totals
        return delta

    # ---- introspection ----

    def attached(self) -> dict[str, Attachment]:
        """Interfaces currently attached, by name."""
        st = self._state()
        return st.attacher.attached() if st.attacher else {}

    def interface_names(self) -> dict[int, str]:
        """ifindex -> name of attached interfaces (in the capture's namespace)."""
        return {a.ifindex: name for name, a in self.attached().items()}

    def wait_attached(self, name: str, timeout: float = 5.0) -> bool:
        """Wait until an interface that appeared after start() is attached."""
        st = self._state()
        return bool(st.attacher and st.attacher.wait_attached(name, timeout))

    def wait_detached(self, name: str, timeout: float = 5.0) -> bool:
        """Wait until an interface is no longer attached (deleted, or renamed to a non-matching name)."""
        st = self._state()
        return st.attacher is None or st.attacher.wait_detached(name, timeout)

    def attach_errors(self) -> list[str]:
        """Interfaces that could not be attached, and why."""
        st = self._state()
        return list(st.attacher.errors) if st.attacher else []

    def map(self, name: str) -> loader.BpfMap:
        """A map of the loaded object (fs_events, fs_l7_events, fs_flows, fs_stats)."""
        return self._state().obj.map(name)

    def program(self, name: str) -> loader.BpfProgram:
        """A program of the loaded object (benchmarks run fs_tc_ingress with BPF_PROG_TEST_RUN)."""
        return self._state().obj.program(name)
