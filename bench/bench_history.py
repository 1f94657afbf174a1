"""``flowship history`` over an archive of a week: time to the first flows of a filtered query, a full filtered
scan, and streaming everything of a namespace — beside a plain DuckDB query on the same files.

Builds an hourly-partitioned archive with the real parquet sink (``--flows`` generated flows over 7 days), starts
``flowship history`` on it, and asks through the Observer gRPC API (the repo's stubs, as the hubble CLI does):

- ``first 100``: namespace + verdict filter, ``first: true``, since 7 days ago: time until 100 flows arrived;
- ``last 100``: the same filter, the newest 100 (``hubble observe --last 100``);
- ``scan``: a filter few flows match (namespace + verdict DROPPED + a port), over the whole week: flows scanned
  per second;
- ``stream``: every flow of one namespace, streamed: flows per second received.

DuckDB runs the same queries with SQL over ``read_parquet(..., hive_partitioning=true)``, returning the same rows
(``SELECT *`` in time order, as Arrow). CPU seconds are the server process's (``/proc/PID/stat``) and, for DuckDB,
this process's: the fair figure on a shared machine. ``--against CHECKOUT`` serves the same archive from another
checkout's ``exporter/`` too (history needs nothing else), side by side in the same run.

    python3 bench/bench_history.py --flows 10000000 [--against ../baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
WEEK_S = 7 * 24 * 3600


def build(root: Path, flows: int, start_ns: int) -> int:
    from flowgen import generate_batch

    from flowship.components import Context
    from flowship.config import parse
    from flowship.metrics import Metrics
    from flowship.pipeline.envelope import Envelope, Receipt
    from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig

    ctx = Context(name="bench", metrics=Metrics(), node_name="bench-node", data_dir=root / "state")
    sink = ParquetSink(parse(ParquetSinkConfig, {"path": str(root / "archive"), "fsync": False,
                                                 "max_file_rows": 200_000}, "bench"), ctx)
    sink.start()
    chunk = 250_000
    for i in range(0, flows, chunk):
        n = min(chunk, flows - i)
        batch = generate_batch(n, seed=i, start_ns=start_ns + int(i / flows * WEEK_S * 1e9),
                               duration_s=WEEK_S * n / flows)
        for s in range(0, n, 16_384):
            sink.write(Envelope(batch.slice(s, 16_384), [Receipt()]))
        sink.flush()  # publishes the chunk's hours: the open files of a week would hold every row in memory
    return len(list((root / "archive").rglob("*.parquet")))


def grpc_query(address: str, since_ns: int, whitelist: list[dict], number: int = 0, first: bool = False) -> tuple:
    """(seconds to the 100th flow or None, seconds in all, flows received)."""
    import grpc
    from google.protobuf import json_format

    from flowship.proto.flow import flow_pb2
    from flowship.proto.observer import observer_pb2, observer_pb2_grpc

    request = observer_pb2.GetFlowsRequest(number=number, first=first)
    request.since.FromNanoseconds(since_ns)
    for f in whitelist:
        request.whitelist.append(json_format.ParseDict(f, flow_pb2.FlowFilter()))
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        count, hundredth = 0, None
        for resp in stub.GetFlows(request, timeout=3600):
            if resp.HasField("flow"):
                count += 1
                if count == 100:
                    hundredth = time.perf_counter() - started
    return hundredth, time.perf_counter() - started, count


def duck(root: Path, sql: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, rows) of a DuckDB query returning its rows as Arrow."""
    import duckdb

    cpu0, started = time.process_time(), time.perf_counter()
    table = duckdb.connect().sql(sql.format(files=f"read_parquet('{root}/flows/**/*.parquet', "
                                                  "hive_partitioning=true)")).to_arrow_table()
    return time.perf_counter() - started, time.process_time() - cpu0, table.num_rows


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(root: Path, package_root: Path) -> tuple[subprocess.Popen, str]:
    """``flowship history`` on ``root`` with ``flowship`` imported from ``package_root``; (process, address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-level", "warning", "history",
                               "--archive", str(root), "--listen", address],
                              env={**os.environ, "PYTHONPATH": str(package_root)})
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, address
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "flowship history did not start"
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=2_000_000)
    parser.add_argument("--against", type=Path, help="another checkout whose history server runs beside this one")
    parser.add_argument("--no-stream", action="store_true", help="leave out streaming a namespace (the long case)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flowship-bench-history-"))
    servers: list[tuple[str, subprocess.Popen, str]] = []
    try:
        now_s = int(time.time())
        start_ns = (now_s - WEEK_S) * 10**9
        t0 = time.perf_counter()
        files = build(work, args.flows, start_ns)
        root = work / "archive"
        size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
        print(f"archive: {args.flows:,} flows over 7 days, {files:,} files, {size / 2**20:,.0f} MiB "
              f"(built in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs")
        servers.append(("flowship history", *start_server(root, REPO)))
        if args.against:
            linked = work / "against"
            linked.mkdir()
            (linked / "flowship").symlink_to(args.against.resolve() / "exporter")
            servers.append((f"history of {args.against.name}", *start_server(root, linked)))
        since = start_ns - 3600 * 10**9
        ns_verdict = [{"source_pod": ["production/"], "verdict": ["FORWARDED"]}]
        rare = [{"source_pod": ["production/"], "verdict": ["DROPPED"], "destination_port": ["5432"]}]
        where_nv = "src_namespace = 'production' and verdict = 'FORWARDED'"
        where_rare = "src_namespace = 'production' and verdict = 'DROPPED' and dst_port = 5432"
        cases = [
            ("first 100 (namespace + verdict)", dict(whitelist=ns_verdict, number=100, first=True),
             f"select * from {{files}} where {where_nv} order by time, uuid limit 100"),
            ("last 100 (namespace + verdict)", dict(whitelist=ns_verdict, number=100),
             f"select * from {{files}} where {where_nv} order by time desc, uuid desc limit 100"),
            ("full scan, few matches", dict(whitelist=rare),
             f"select * from {{files}} where {where_rare} order by time, uuid"),
            ("stream one namespace", dict(whitelist=[{"source_pod": ["production/"]}]),
             "select * from {files} where src_namespace = 'production' order by time, uuid"),
        ][: 3 if args.no_stream else 4]
        print(f"{'query':<34} {'engine':<30} {'rows':>10} {'first 100':>10} {'wall s':>8} {'CPU-s':>8} "
              f"{'archive flows/CPU-s':>20} {'rows/s':>10}")
        for label, query, sql in cases:
            counts = set()
            for name, server, address in servers:
                cpu0 = process_cpu(server.pid)
                hundredth, wall, count = grpc_query(address, since, **query)
                cpu = process_cpu(server.pid) - cpu0
                counts.add(count)
                first = f"{hundredth:.2f} s" if hundredth is not None else "-"
                rate = "-" if "number" in query else f"{args.flows / cpu:,.0f}"  # a whole-archive query
                print(f"{label:<34} {name:<30} {count:>10,} {first:>10} {wall:>8.2f} {cpu:>8.2f} "
                      f"{rate:>20} {count / wall:>10,.0f}", flush=True)
            wall, cpu, rows = duck(root, sql)
            counts.add(rows)
            rate = "-" if "number" in query else f"{args.flows / cpu:,.0f}"
            print(f"{label:<34} {'DuckDB SQL (in process)':<30} {rows:>10,} {'':>10} {wall:>8.2f} {cpu:>8.2f} "
                  f"{rate:>20} {rows / wall:>10,.0f}", flush=True)
            assert len(counts) == 1, f"{label}: the engines disagree on the number of flows: {counts}"
    finally:
        for _, server, _ in servers:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
