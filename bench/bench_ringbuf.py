"""Ring-buffer decode throughput: direct mmap + numpy view vs libbpf ring_buffer callbacks.

The kernel side is real: the loaded fs_tc_ingress program runs on a synthetic TCP packet through
BPF_PROG_TEST_RUN in per-packet aggregation mode, so every run writes one 128-byte flow event into
the fs_events ring. Each round fills the ring with N events, then one reader drains it; the
consumer's CPU time (time.thread_time) gives events decoded per second per core. The readers
alternate round by round in the same process, so machine noise hits both alike; the ratio is the
number to trust. A third column drains through KernelCapture.poll() (mmap reader + kind split +
stats read), i.e. what the agent pays per batch.

    sudo python3 bench/bench_ringbuf.py [--events 400000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowship.agent import events as ev  # noqa: E402
from flowship.agent.capture import CaptureConfig, KernelCapture  # noqa: E402
from flowship.agent.ringbuf import LibbpfRing, MmapRing  # noqa: E402


def tcp_packet(payload: bytes = b"x" * 64) -> bytes:
    """Ethernet + IPv4 + TCP (ACK) frame for BPF_PROG_TEST_RUN."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0,
        socket.inet_aton("10.1.0.1"), socket.inet_aton("10.1.0.2"),
    )  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


def fill(cap: KernelCapture, n: int) -> list[int]:
    """Make the kernel write n flow events; returns the program's mean ns per run of each call."""
    prog = cap.program("fs_tc_ingress")
    pkt = tcp_packet()
    left = n
    durations = []
    while left:
        step = min(left, 100_000)
        durations.append(prog.test_run(pkt, repeat=step)[1])
        left -= step
    return durations


def kernel_cost_ns(repeat: int = 1_000_000) -> int:
    """ns per packet of fs_tc_ingress in flow aggregation, on an existing entry (no event)."""
    cfg = CaptureConfig(sweep_interval_s=None, drops=False)
    with KernelCapture().start([], cfg) as cap:
        prog = cap.program("fs_tc_ingress")
        prog.test_run(tcp_packet(), repeat=1)  # creates the entry (NEW event)
        return prog.test_run(tcp_packet(), repeat=repeat)[1]


def drain(read, n: int) -> tuple[float, float, int]:
    """Read until n records arrived; returns (cpu seconds, wall seconds, records)."""
    got = 0
    c0, w0 = time.thread_time(), time.perf_counter()
    while got < n:
        arr = read()
        got += len(arr)
        if len(arr) == 0 and time.perf_counter() - w0 > 30:
            break
    return time.thread_time() - c0, time.perf_counter() - w0, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=400_000, help="events per round (ring holds ~490k)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    cfg = CaptureConfig(aggregation="packet", flow_ring_bytes=64 << 20, sweep_interval_s=None, drops=False)
    with KernelCapture().start([], cfg) as cap:
        ring_map = cap.map("fs_events")
        size = ring_map.max_entries
        mm = MmapRing(ring_map.fd, size, ev.FLOW_EVENT_DTYPE)
        lb = LibbpfRing(ring_map.fd, size, ev.FLOW_EVENT_DTYPE)
        readers = {
            "mmap+numpy": mm.read,
            "libbpf callback": lb.read,
            "KernelCapture.poll": lambda: cap.poll(0).flows,
        }
        cap.poll(0)  # settle stats baseline
        results: dict[str, list[float]] = {k: [] for k in readers}
        walls: dict[str, list[float]] = {k: [] for k in readers}
        emit_ns: list[int] = []
        for _ in range(args.rounds):
            for name, read in readers.items():
                emit_ns += fill(cap, args.events)
                cpu, wall, got = drain(read, args.events)
                if got != args.events:
                    raise SystemExit(f"{name}: read {got} of {args.events} events")
                results[name].append(got / cpu)
                walls[name].append(got / wall)
        lost = cap.stats()["lost_flow_ring"]
        mm.close()
        lb.close()

    print(f"events per round: {args.events}, rounds: {args.rounds}, record: {ev.FLOW_EVENT_DTYPE.itemsize} B")
    print(f"{'reader':<20} {'events/s/core (median)':>24} {'min':>12} {'max':>12} {'events/s wall':>14}")
    base = statistics.median(results["libbpf callback"])
    for name, vals in results.items():
        med = statistics.median(vals)
        print(
            f"{name:<20} {med:>24,.0f} {min(vals):>12,.0f} {max(vals):>12,.0f} "
            f"{statistics.median(walls[name]):>14,.0f}   x{med / base:.1f} vs libbpf"
        )
    print(f"kernel ring reservations failed: {lost}")
    print(
        f"kernel fs_tc_ingress: {kernel_cost_ns()} ns/packet (flow aggregation, existing entry), "
        f"{statistics.median(emit_ns)} ns/packet (per-packet event: ring reserve + submit)"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
