"""Checks that the kernel and the process can run the capture, each failure named with what to do.

Required features (BTF, ring buffers, the syscall program type, tc or tcx, the helpers the tc and
sweep programs call) stop the start with a remedy; optional ones (kernel drops) are switched off with
a reason that the agent logs and publishes as a metric, so a mixed fleet runs everywhere and says
where it sees less.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowship.agent import btf, loader

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# helper ids (uapi enum bpf_func_id, stable) that each program type calls
HELPERS_TC = {
    "bpf_ktime_get_ns": 5,
    "bpf_skb_load_bytes": 26,
    "bpf_skb_load_bytes_relative": 68,
    "bpf_ringbuf_reserve": 131,
    "bpf_ringbuf_submit": 132,
    "bpf_ringbuf_discard": 133,
}
HELPERS_SYSCALL = {"bpf_for_each_map_elem": 164}

_CAP_HELP = {
    "CAP_BPF": "load BPF programs and create maps",
    "CAP_NET_ADMIN": "attach tc/tcx programs to interfaces",
    "CAP_PERFMON": "attach the kfree_skb tracepoint and read kernel pointers",
}


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int:
    """CapEff bitmask of this process."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


@dataclass
class KernelFeatures:
    """What the running kernel offers, and which capabilities this process lacks."""

    btf: bool = False
    ringbuf: bool = False
    tcx: bool = False
    clsact: bool = False
    tp_btf_kfree_skb: bool = False
    kfree_skb_args: list[str] | None = None  # parameter types of the kfree_skb tracepoint (BTF)
    syscall_prog: bool = False
    missing_helpers: list[str] = field(default_factory=list)
    missing_caps: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Everything that stops the capture, one line each with the remedy."""
        out = []
        for cap in self.missing_caps:
            out.append(f"missing {cap} (needed to {_CAP_HELP[cap]}): run as root or grant {cap}")
        if not self.btf:
            out.append(
                f"no kernel BTF at {btf.VMLINUX_BTF}: use a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.8 or newer)"
            )
        if not self.ringbuf and not self.missing_caps:
            out.append("BPF ring buffer maps not supported: kernel 5.8 or newer is required")
        if not (self.tcx or self.clsact):
            out.append("neither tcx (kernel 6.6+) nor the clsact qdisc is available: load sch_ingress (modprobe)")
        if not self.syscall_prog and not self.missing_caps:
            out.append("BPF_PROG_TYPE_SYSCALL not supported (flow-table sweep): kernel 5.14 or newer is required")
        if self.missing_helpers and not self.missing_caps:
            out.append("BPF helpers missing: " + ", ".join(self.missing_helpers) + " (kernel 5.14 or newer)")
        return out

    def drops_reason(self) -> str | None:
        """Why kernel drops cannot be captured here, None when they can."""
        if self.tp_btf_kfree_skb:
            return None
        if not self.btf:
            return "no kernel BTF"
        if self.kfree_skb_args is None:
            return "the kernel has no kfree_skb tracepoint in its BTF"
        return (f"the kfree_skb tracepoint has no drop reason here (arguments {self.kfree_skb_args}; "
                "kernel 5.17 or newer has one)")

    def warnings(self) -> list[str]:
        """Features that are missing but only reduce what is captured."""
        reason = self.drops_reason()
        return [] if reason is None else [f"kernel drops are not reported: {reason}"]


def kfree_skb_has_reason(args: list[str] | None) -> bool:
    """Whether a kfree_skb tracepoint signature is the one fs_kfree_skb reads: (skb, location, reason, ...).

    5.17 added the reason as the third argument; 6.11 appended the receiving socket, which the
    program does not read, so any signature with that prefix works.
    """
    return bool(args) and len(args) >= 3 and args[0] == "ptr" and args[2] == "enum skb_drop_reason"


@dataclass
class FeatureState:
    """One capture feature as started: on or off, and in what way or why not (for logs and metrics)."""

    enabled: bool
    detail: str


def check(status: Path = Path("/proc/self/status"), btf_path: Path = btf.VMLINUX_BTF) -> KernelFeatures:
    """Probe capabilities, BTF and the BPF features the capture uses."""
    f = KernelFeatures()
    caps = effective_capabilities(status)
    sys_admin = bool(caps & (1 << CAP_SYS_ADMIN))
    for name, bit in (("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_PERFMON", CAP_PERFMON)):
        implied = sys_admin and name != "CAP_NET_ADMIN"  # kernels before 5.8 only know CAP_SYS_ADMIN
        if not caps & (1 << bit) and not implied:
            f.missing_caps.append(name)
    if btf_path.exists():
        f.btf = True
        info = btf.load(btf_path)
        f.tcx = "BPF_TCX_INGRESS" in info.enums.get("bpf_attach_type", {})
        f.clsact = info.has(12, "clsact_init") or Path("/sys/kernel/btf/sch_ingress").exists() or _module_available()
        f.kfree_skb_args = info.tracepoint_args("kfree_skb")
        f.tp_btf_kfree_skb = kfree_skb_has_reason(f.kfree_skb_args) and "skb_drop_reason" in info.enums
    try:
        f.ringbuf = loader.probe_map_type(loader.BPF_MAP_TYPE_RINGBUF)
        f.syscall_prog = loader.probe_prog_type(loader.BPF_PROG_TYPE_SYSCALL)
        if not f.missing_caps:  # probes load programs: without the capabilities all would fail
            for name, hid in HELPERS_TC.items():
                if not loader.probe_helper(loader.BPF_PROG_TYPE_SCHED_CLS, hid):
                    f.missing_helpers.append(f"{name} (tc)")
            if f.syscall_prog:
                for name, hid in HELPERS_SYSCALL.items():
                    if not loader.probe_helper(loader.BPF_PROG_TYPE_SYSCALL, hid):
                        f.missing_helpers.append(f"{name} (syscall)")
    except loader.BpfUnavailableError:
        pass
    return f


def publish(metrics: Any, source: str, states: dict[str, FeatureState]) -> None:
    """flowship_agent_kernel_feature{source, feature, mode}: 1 when on, 0 when off (mode says why).

    metrics is an flowship.metrics.Metrics (anything with gauge(name, doc, labels)).
    """
    g = metrics.gauge(
        "flowship_agent_kernel_feature",
        "Capture features on this kernel: 1 on, 0 off; mode is how it runs or why it is off.",
        ["source", "feature", "mode"],
    )
    for name, st in states.items():
        g.labels(source, name, st.detail).set(1 if st.enabled else 0)


def _module_available() -> bool:
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}/kernel/net/sched").glob("sch_ingress.ko*"))
