"""``flowship history`` over an archive of a week: time to the first flows of a filtered query, a full filtered
scan, and streaming everything of a namespace — beside a plain DuckDB query on the same files.

Builds an hourly-partitioned archive with the real parquet sink (``--flows`` generated flows over 7 days), starts
``flowship history`` on it, and asks through the Observer gRPC API (the repo's stubs, as the hubble CLI does):

- ``first 100``: namespace + verdict filter, ``first: true``, since 7 days ago: time until 100 flows arrived;
- ``last 100``: the same filter, the newest 100 (``hubble observe --last 100``);
- ``scan``: a filter few flows match (namespace + verdict DROPPED + a port), over the whole week: flows scanned
  per second;
- ``stream``: every flow of one namespace, streamed: flows per second received.

DuckDB runs the same queries with SQL over ``read_parquet(..., hive_partitioning=true)``.

    python3 bench/bench_history.py --flows 2000000
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
    sink.flush()
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


def duck(root: Path, sql: str) -> tuple[float, list]:
    import duckdb

    started = time.perf_counter()
    rows = duckdb.connect().execute(sql.format(files=f"read_parquet('{root}/flows/**/*.parquet', "
                                                     "hive_partitioning=true)")).fetchall()
    return time.perf_counter() - started, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=2_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flowship-bench-history-"))
    server = None
    try:
        now_s = int(time.time())
        start_ns = (now_s - WEEK_S) * 10**9
        t0 = time.perf_counter()
        files = build(work, args.flows, start_ns)
        root = work / "archive"
        size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
        print(f"archive: {args.flows:,} flows over 7 days, {files:,} files, {size / 2**20:,.0f} MiB "
              f"(built in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-level", "warning", "history",
                                   "--archive", str(root), "--listen", address],
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "flowship history did not start"
                time.sleep(0.2)
        since = start_ns - 3600 * 10**9
        ns_verdict = [{"source_pod": ["production/"], "verdict": ["FORWARDED"]}]
        rare = [{"source_pod": ["production/"], "verdict": ["DROPPED"], "destination_port": ["5432"]}]
        where_nv = "src_namespace = 'production' and verdict = 'FORWARDED'"
        where_rare = "src_namespace = 'production' and verdict = 'DROPPED' and dst_port = 5432"
        print(f"{'query':<34} {'flowship history':>22} {'DuckDB SQL':>16}")

        first100, _, _ = grpc_query(address, since, ns_verdict, number=100, first=True)
        d, _ = duck(root, f"select * from {{files}} where {where_nv} order by time limit 100")
        print(f"{'first 100 (namespace + verdict)':<34} {first100:>20.2f} s {d:>14.2f} s")

        _, last_all, n = grpc_query(address, since, ns_verdict, number=100)
        d, _ = duck(root, f"select * from {{files}} where {where_nv} order by time desc limit 100")
        print(f"{'last 100 (namespace + verdict)':<34} {last_all:>20.2f} s {d:>14.2f} s")

        _, scan_s, matched = grpc_query(address, since, rare)
        d, rows = duck(root, f"select count(*) from {{files}} where {where_rare}")
        assert rows[0][0] == matched, f"flowship matched {matched}, DuckDB {rows[0][0]}"
        print(f"{'scan, few matches: flows/s':<34} {args.flows / scan_s:>22,.0f} {args.flows / d:>16,.0f}"
              f"   ({matched:,} matched)")

        _, stream_s, streamed = grpc_query(address, since, [{"source_pod": ["production/"]}])
        d, rows = duck(root, "select count(*) from {files} where src_namespace = 'production'")
        assert rows[0][0] == streamed, f"flowship streamed {streamed}, DuckDB counts {rows[0][0]}"
        print(f"{'stream one namespace: flows/s':<34} {streamed / stream_s:>22,.0f} {'':>16}   "
              f"({streamed:,} flows)")
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
