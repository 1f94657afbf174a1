"""The agent's user space: how many kernel events it turns into flows, and what it costs under load.

1. capacity (in-process, one core): ring records decoded per second (KernelCapture.poll on records the
   loaded program wrote through BPF_PROG_TEST_RUN), and kernel events assembled into enriched FLOW_SCHEMA
   rows per second (Assembler.assemble on batches of 65,536 events: L3/L4 events of 5,000 connections between 200
   clients and 50 servers,
   and a mix with 10 % HTTP payload events). CPU time of the thread, not wall time.
2. sustained event rates (`flowship agent` process, per-packet aggregation): the bench runs the agent's
   own tc program (its fd duplicated with pidfd_getfd) on synthetic packets at each --rates value for
   --seconds, one ring event per run (a packet generator could not reach these rates on 2 cores beside
   the agent); printed: events generated, events read, rows, losses and postponements the agent counted,
   agent CPU and RSS.
   0 loss is expected at 100,000 events/s; past saturation the losses must be counted, not silent.
3. connection churn (`flowship agent`, default flow aggregation): --conn-rate new TCP connections per
   second (connect, 1 byte, close) for --seconds; agent CPU %, peak RSS, rows/s, losses, and the rows
   emitted but not yet acknowledged by the sink (sampled from /metrics: what an abrupt death loses in
   user space, besides the at most `report_interval` of counters each live flow holds in the kernel).

    sudo python3 bench/bench_agent.py [--rates 100000,200000,400000] [--seconds 10] [--conn-rate 10000]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netload import SRV_IP, Agent, build_netload, percentile, veth_pair  # noqa: E402

from flowship.agent import events as ev  # noqa: E402
from flowship.agent.assemble import AssembleConfig, Assembler  # noqa: E402
from flowship.agent.capture import LOSS_STATS, CaptureBatch, CaptureConfig, KernelCapture  # noqa: E402
from flowship.agent.enrich import EnrichConfig, Enricher  # noqa: E402

CC_PORT = 7200
# Parquet goes to memory when possible: the benchmark measures the agent, not this machine's disk (fsync).
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


# ---------------------------------------------------------------- 1. capacity


def synthetic_flows(n: int, connections: int, rng: np.random.Generator) -> np.ndarray:
    f = np.zeros(n, dtype=ev.FLOW_EVENT_DTYPE)
    conn = rng.integers(0, connections, n)
    f["kind"] = ev.Kind.FLOW
    f["ip_version"] = 4
    f["l4_proto"] = 6
    f["ifindex"] = 2 + conn % 8
    f["src_addr"] = ev.address_bytes("10.1.0.0")
    f["dst_addr"] = ev.address_bytes("10.2.0.0")
    f["src_addr"][:, 15] = conn % 200  # 200 clients, 50 servers: a node's worth of distinct peers
    f["dst_addr"][:, 15] = conn % 50
    f["src_port"] = 30000 + conn % 30000
    f["dst_port"] = 8080
    f["init_hook"] = 1 + conn % 2
    f["hook"] = f["init_hook"]
    f["trigger"] = rng.choice([ev.Trigger.NEW, ev.Trigger.FLAGS, ev.Trigger.REPORT, ev.Trigger.END], n)
    f["packets"] = rng.integers(0, 20, n)
    f["reply_packets"] = rng.integers(0, 20, n)
    f["bytes"] = f["packets"] * 800
    f["reply_bytes"] = f["reply_packets"] * 1200
    f["tcp_flags"] = 0x18
    f["reply_tcp_flags"] = 0x18
    f["first_ns"] = 1_000_000 + conn
    f["last_ns"] = f["first_ns"] + rng.integers(0, 10**9, n)
    f["ts_ns"] = f["last_ns"]
    f["syn_ns"] = f["first_ns"]
    f["synack_ns"] = f["first_ns"] + 50_000
    return f


def synthetic_http(n: int, rng: np.random.Generator) -> np.ndarray:
    dt = ev.l7_event_dtype(256)
    out = np.zeros(n, dtype=dt)
    req = b"GET /api/v1/items/42?x=1 HTTP/1.1\r\nHost: api:8080\r\nUser-Agent: bench/1\r\nAccept: */*\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    conn = np.arange(n) // 2
    is_resp = np.arange(n) % 2 == 1
    out["ip_version"] = 4
    out["l4_proto"] = 6
    out["ifindex"] = 3
    a, b = ev.address_bytes("10.1.0.1"), ev.address_bytes("10.2.0.1")
    out["src_addr"] = np.where(is_resp[:, None], b, a)
    out["dst_addr"] = np.where(is_resp[:, None], a, b)
    cport = 20000 + conn % 40000
    out["src_port"] = np.where(is_resp, 8080, cport)
    out["dst_port"] = np.where(is_resp, cport, 8080)
    out["is_reply"] = is_resp
    out["hook"] = np.where(is_resp, 2, 1)
    out["l7_kind"] = np.where(is_resp, ev.L7Kind.HTTP_RESPONSE, ev.L7Kind.HTTP_REQUEST)
    out["ts_ns"] = 10**9 + np.arange(n) * 1000
    for i in range(n):
        p = resp if is_resp[i] else req
        out["data"][i, : len(p)] = np.frombuffer(p, dtype=np.uint8)
        out["captured_len"][i] = len(p)
    return out


def assemble_rate(flows: np.ndarray, l7: np.ndarray, rounds: int) -> tuple[float, float]:
    """(events/s, rows/s) of Assembler.assemble with enrichment, per core."""
    lost = {k: 0 for k in LOSS_STATS}
    asm = Assembler(AssembleConfig(node_name="bench"), enricher=Enricher(EnrichConfig(), "bench"))
    batch = CaptureBatch(flows, flows[:0], l7, lost, {}, 0)
    asm.assemble(batch, {})  # warm caches
    events = rows = 0
    cpu = 0.0
    for _ in range(rounds):
        t0 = time.thread_time()
        out = asm.assemble(batch, {i: f"veth{i}" for i in range(16)})
        cpu += time.thread_time() - t0
        events += len(batch)
        rows += out.num_rows
    return events / cpu, rows / cpu


def decode_rate(n: int) -> float:
    """Ring records decoded per second per core by KernelCapture.poll (mmap reader, kind split, stats)."""
    import struct

    cfg = CaptureConfig(aggregation="packet", sweep_interval_s=None, drops=False, flow_ring_bytes=64 << 20)
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + 64, 0, 0x4000, 64, 6, 0, bytes([10, 1, 0, 1]),
                     bytes([10, 1, 0, 2]))
    pkt = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + b"x" * 64
    total, cpu = 0, 0.0
    with KernelCapture().start([], cfg) as cap:
        prog = cap.program("fs_tc_ingress")
        for _ in range(3):
            left = n
            while left:
                step = min(left, 100_000)
                prog.test_run(pkt, repeat=step)
                left -= step
            t0 = time.thread_time()
            got = 0
            while True:
                batch = cap.poll(0)
                if not len(batch):
                    break
                got += len(batch)
            cpu += time.thread_time() - t0
            total += got
    return total / cpu


def capacity() -> None:
    rng = np.random.default_rng(7)
    print("1. user-space capacity (CPU time of one thread)")
    print(f"   ring records decoded (poll):           {decode_rate(400_000) / 1e6:6.2f} M events/s per core")
    flows = synthetic_flows(65536, 5000, rng)
    ev_s, rows_s = assemble_rate(flows, synthetic_http(0, rng), 5)
    print(f"   flow events assembled (L3/L4):         {ev_s / 1e3:6.0f} k events/s per core -> {rows_s / 1e3:.0f} k "
          "rows/s (enriched, uuid, Community ID)")
    mix_flows = flows[: int(65536 * 0.9)]
    ev_s, rows_s = assemble_rate(mix_flows, synthetic_http(65536 - len(mix_flows), rng), 5)
    print(f"   with 10 % HTTP payload events:         {ev_s / 1e3:6.0f} k events/s per core -> {rows_s / 1e3:.0f} k "
          "rows/s")


# ---------------------------------------------------------------- 2. sustained rates


def agent_program_fd(pid: int, name: str = "fs_tc_ingress") -> int:
    """A duplicate, in this process, of the agent process's fd of one of its BPF programs (pidfd_getfd)."""
    import ctypes
    import json as _json

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for entry in os.listdir(f"/proc/{pid}/fdinfo"):
            try:
                info = Path(f"/proc/{pid}/fdinfo/{entry}").read_text()
            except OSError:
                continue
            m = re.search(r"^prog_id:\s+(\d+)", info, re.M)
            if not m:
                continue
            shown = subprocess.run(["bpftool", "-j", "prog", "show", "id", m.group(1)], capture_output=True,
                                   text=True).stdout
            if shown and _json.loads(shown).get("name") == name:
                fd = libc.syscall(438, pidfd, int(entry), 0)  # pidfd_getfd
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                return fd
    finally:
        os.close(pidfd)
    raise RuntimeError(f"no {name} program in process {pid}")


def kernel_generator(prog_fd: int, rate: int, seconds: float) -> int:
    """Run the agent's own tc program on synthetic TCP packets, `rate` runs per second (one ring event per
    run in per-packet aggregation), 64 flows; returns the number of runs."""
    import ctypes
    import struct

    from flowship.agent import loader

    def packet(sport: int) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", sport, 443, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + 64, 0, 0x4000, 64, 6, 0, bytes([10, 1, 0, 1]),
                         bytes([10, 1, 0, 2]))
        return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + b"x" * 64

    bufs = [ctypes.create_string_buffer(p, len(p)) for p in (packet(40000 + i) for i in range(64))]
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    start = time.monotonic()
    done = 0
    i = 0
    while time.monotonic() - start < seconds:
        buf = bufs[i % len(bufs)]
        opts = loader._TestRunOpts(sz=ctypes.sizeof(loader._TestRunOpts), data_in=ctypes.addressof(buf),
                                   data_size_in=len(buf))
        opts.repeat = per_tick
        if loader.libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)) == 0:
            done += per_tick
        i += 1
        due = start + i * tick
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return done


def run_rate(pair, workdir: Path, rate: int, seconds: int) -> None:  # noqa: ANN001
    agent = Agent(pair, workdir, metrics_port=19090 + rate // 1000 % 900,
                  extra="    aggregation: packet\n").start()
    fd = agent_program_fd(agent.proc.pid)
    cpu0, t0 = agent.cpu_seconds(), time.monotonic()
    generated = kernel_generator(fd, rate, seconds)
    elapsed = time.monotonic() - t0
    time.sleep(1.5)
    cpu = agent.cpu_seconds() - cpu0
    wall = time.monotonic() - t0
    rss = agent.hwm_bytes()
    lost = {k: agent.metric(f'flowship_agent_lost_total{{kind="{k}"}}') for k in LOSS_STATS}
    os.close(fd)
    summary = agent.summary(agent.stop()).get("sources", {}).get("agent", {})
    real = lost["drop_ring"] + lost["l7_ring"] + lost["untracked"]
    print(f"   {rate:>9,}/s target, {generated / elapsed:>9,.0f}/s generated: {generated:>9,} events, "
          f"{summary.get('kernel_events', 0):>9,} read, rows {summary.get('flows', 0):>9,}, lost {int(real)}, "
          f"postponed {int(lost['flow_ring'])}, agent CPU {100 * cpu / wall:5.1f} %, peak RSS {rss / 2**20:.0f} MiB")


def rates(rates_list: list[int], seconds: int) -> None:
    print(f"2. sustained event rates (per-packet aggregation, {seconds}s each): the agent's own tc program run on "
          "synthetic packets\n   (BPF_PROG_TEST_RUN through its fd) at a paced rate, one ring event per run; "
          "the agent reads, assembles and writes Parquet")
    with veth_pair() as pair, tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        for rate in rates_list:
            run_rate(pair, Path(tmp) / str(rate), rate, seconds)


# ---------------------------------------------------------------- 3. connection churn


def churn(conn_rate: int, seconds: int) -> None:
    netload = build_netload()
    print(f"3. connection churn: {conn_rate:,} new TCP connections/s for {seconds}s (flow aggregation)")
    with veth_pair() as pair, tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        server = pair.run(pair.srv, str(netload), "cc-server", SRV_IP, str(CC_PORT), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
        assert server.stdout is not None
        server.stdout.readline()
        agent = Agent(pair, Path(tmp), metrics_port=19191).start()
        try:
            unacked: list[float] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.5):
                    unacked.append(agent.metric("flowship_agent_unacked_rows"))

            sampler = threading.Thread(target=sample, daemon=True)
            cpu0, t0 = agent.cpu_seconds(), time.monotonic()
            rows0 = agent.metric("flowship_flows_in_total")
            sampler.start()
            out = subprocess.run(["ip", "netns", "exec", pair.cli, str(netload), "cc-client", SRV_IP, str(CC_PORT),
                                  str(conn_rate), str(seconds)], capture_output=True, text=True, check=True).stdout
            time.sleep(3)  # ended flows are evicted 2 s after their last packet
            stop.set()
            sampler.join()
            cpu, wall = agent.cpu_seconds() - cpu0, time.monotonic() - t0
            rows = agent.metric("flowship_flows_in_total") - rows0
            events = agent.metric("flowship_agent_events_total")
            lost = {k: agent.metric(f'flowship_agent_lost_total{{kind="{k}"}}') for k in LOSS_STATS}
            rss = agent.hwm_bytes()
        finally:
            summary = agent.summary(agent.stop())
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
    print(f"   client: {out.strip()}")
    print(f"   agent: CPU {100 * cpu / wall:.1f} % of one core, peak RSS {rss / 2**20:.0f} MiB, "
          f"{events / wall:,.0f} kernel events/s, {rows / wall:,.0f} rows/s")
    print(f"   losses: {', '.join(f'{k} {int(v)}' for k, v in lost.items())}")
    if unacked:
        print(f"   rows emitted but not yet acknowledged (Parquet sink, default max_file_age 60s): "
              f"p50 {percentile(unacked, 0.5):,.0f}, max {max(unacked):,.0f}")
    print(f"   final summary: {summary.get('sources', {})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100000,200000,400000,800000,1600000")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conn-rate", type=int, default=10000)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: capacity,rates,churn")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_agent needs root (eBPF, namespaces)")
    skip = set(args.skip.split(","))
    print(f"machine: {os.cpu_count()} cores, kernel {platform.release()}, Python {platform.python_version()}")
    if "capacity" not in skip:
        capacity()
    if "rates" not in skip:
        rates([int(r) for r in args.rates.split(",")], args.seconds)
    if "churn" not in skip:
        churn(args.conn_rate, args.seconds)


if __name__ == "__main__":
    main()
