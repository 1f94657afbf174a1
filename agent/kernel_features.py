"""Checks that the kernel and the process can run the capture, each failure named with what to do."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agent import btf, loader

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

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
    syscall_prog: bool = False
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
        return out

    def warnings(self) -> list[str]:
        """Features that are missing but only reduce what is captured."""
        if self.tp_btf_kfree_skb:
            return []
        return ["tp_btf/kfree_skb with drop reasons not available (kernel 5.17+): kernel drops are not reported"]


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
        f.tp_btf_kfree_skb = info.has(8, "btf_trace_kfree_skb") and "skb_drop_reason" in info.enums
    try:
        f.ringbuf = loader.probe_map_type(loader.BPF_MAP_TYPE_RINGBUF)
        f.syscall_prog = loader.probe_prog_type(loader.BPF_PROG_TYPE_SYSCALL)
    except loader.BpfUnavailableError:
        pass
    return f


def _module_available() -> bool:
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}/kernel/net/sched").glob("sch_ingress.ko*"))
