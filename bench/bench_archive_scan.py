"""What bounds a full filtered scan of the flow archive: Parquet decoding, measured engine by engine on one core.

Builds the same week-long archive as bench/bench_history.py (the real parquet sink, hourly partitions) and reads
it whole, one CPU thread each, counting CPU seconds (the fair figure on a shared machine):

- pyarrow, every column decoded (what ``flowship history`` pays today for each scanned row group);
- pyarrow, only the five columns the filter needs (the cost of evaluating the filter alone);
- pyarrow.dataset with the history's pushed-down superset (namespace + verdict) as the scan filter;
- DuckDB ``SELECT *`` with that superset, and with the exact filter (namespace + verdict + port), where DuckDB
  decodes the other columns only for the rows that passed.

    python3 bench/bench_archive_scan.py --flows 2000000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def measure(name: str, flows: int, read: Callable[[], int]) -> None:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rows = read()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"{name:<52} {rows:>9,} rows {wall:>6.2f} s wall {cpu:>6.2f} CPU-s {flows / cpu:>12,.0f} flows/CPU-s",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=2_000_000)
    args = parser.parse_args()

    import duckdb
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from bench_history import WEEK_S, build

    from flowship.model.schema import FLOW_SCHEMA

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    work = Path(tempfile.mkdtemp(prefix="flowship-bench-scan-"))
    try:
        build(work, args.flows, (int(time.time()) - WEEK_S) * 10**9)
        files = sorted(str(p) for p in (work / "archive").rglob("*.parquet"))
        print(f"archive: {args.flows:,} flows, {len(files)} files; one CPU thread per engine")
        superset = (ds.field("src_namespace") == "production") & (ds.field("verdict") == "DROPPED")
        filter_columns = ["time", "uuid", "src_namespace", "verdict", "dst_port"]
        measure("pyarrow: decode every column", args.flows,
                lambda: sum(pq.ParquetFile(f).read(use_threads=False).num_rows for f in files))
        measure("pyarrow: decode the 5 filter columns", args.flows,
                lambda: sum(pq.ParquetFile(f).read(columns=filter_columns, use_threads=False).num_rows
                            for f in files))
        measure("pyarrow.dataset: SELECT * with namespace + verdict", args.flows,
                lambda: ds.dataset(files, schema=FLOW_SCHEMA, format="parquet")
                .to_table(filter=superset, use_threads=False).num_rows)
        con = duckdb.connect(config={"threads": 1})
        source = f"read_parquet({files!r})"
        for label, where in (("namespace + verdict", "src_namespace = 'production' AND verdict = 'DROPPED'"),
                             ("namespace + verdict + port", "src_namespace = 'production' AND verdict = 'DROPPED' "
                                                            "AND dst_port = 5432")):
            measure(f"DuckDB: SELECT * with {label}", args.flows,
                    lambda where=where: con.sql(f"SELECT * FROM {source} WHERE {where}").to_arrow_table().num_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
