"""Compaction speed and memory: ``flowship compact`` beside a plain DuckDB ``COPY ... ORDER BY time``.

Builds an archive with the real parquet sink (many small files per hour), then, each in a fresh process and on
its own copy of the archive, runs:

- ``flowship``: ``flowship.compact.run`` (journalled, streaming merge), and
- ``duckdb``: one ``COPY (SELECT * FROM read_parquet(<hour's files>) ORDER BY time) TO ...`` per hour (no
  journal, no schema check: the floor of what a sort-and-rewrite costs here),

and prints rows per second (wall and CPU), peak RSS and files in/out for each, side by side.

    python3 bench/bench_compact.py --rows 2000000 --hours 4 --file-rows 4000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def build(root: Path, rows: int, hours: int, file_rows: int) -> int:
    from flowgen import DEFAULT_START_NS, generate_batch

    from flowship.components import Context
    from flowship.config import parse
    from flowship.metrics import Metrics
    from flowship.pipeline.envelope import Envelope, Receipt
    from flowship.sinks.parquet import ParquetSink, ParquetSinkConfig

    ctx = Context(name="bench", metrics=Metrics(), node_name="bench-node", data_dir=root / "state")
    sink = ParquetSink(parse(ParquetSinkConfig, {"path": str(root / "archive"), "max_file_rows": file_rows,
                                                 "fsync": False}, "bench"), ctx)
    sink.start()
    chunk = 200_000
    for i in range(0, rows, chunk):
        n = min(chunk, rows - i)
        start = DEFAULT_START_NS + int(i / rows * hours * 3600e9)
        batch = generate_batch(n, seed=i, start_ns=start, duration_s=hours * 3600 * n / rows)
        for s in range(0, n, 8192):
            sink.write(Envelope(batch.slice(s, 8192), [Receipt()]))
    sink.flush()
    return len(list((root / "archive").rglob("*.parquet")))


def run_flowship(archive: str) -> dict:
    from flowship import compact

    store = compact.open_archive(archive)
    summary = compact.run(store, compact.CompactOptions())
    return {"files_out": summary.files_out, "rows": summary.rows}


def run_duckdb(archive: str) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order=false")
    rows = files_out = 0
    for hour in sorted({p.parent for p in Path(archive).rglob("*.parquet")}):
        inputs = sorted(str(p) for p in hour.glob("*.parquet"))
        out = hour / "duckdb-compacted.parquet.out"
        con.execute(f"COPY (SELECT * FROM read_parquet({inputs!r}) ORDER BY time) TO '{out}' "
                    "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1048576)")
        rows += con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchall()[0][0]
        for p in inputs:
            os.unlink(p)
        os.replace(out, hour / "duckdb-compacted.parquet")
        files_out += 1
    return {"files_out": files_out, "rows": rows}


def child(variant: str, archive: str) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    result = (run_flowship if variant == "flowship" else run_duckdb)(archive)
    result.update(wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--file-rows", type=int, default=4000, help="rows per file the sink writes")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    work = Path(tempfile.mkdtemp(prefix="flowship-bench-compact-"))
    try:
        t0 = time.perf_counter()
        files = build(work / "base", args.rows, args.hours, args.file_rows)
        print(f"archive: {args.rows:,} flows in {files:,} files over {args.hours} hours "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        print(f"{'variant':<10} {'files out':>9} {'rows':>11} {'wall s':>8} {'cpu s':>8} {'rows/cpu-s':>11} "
              f"{'peak RSS MiB':>13}")
        for variant in ("flowship", "duckdb"):
            copy = work / variant
            shutil.copytree(work / "base", copy)
            proc = subprocess.run([sys.executable, __file__, "--child", variant, str(copy / "archive")],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                print(f"{variant}: failed\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{variant:<10} {r['files_out']:>9,} {r['rows']:>11,} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
                  f"{r['rows'] / max(r['cpu_s'], 1e-9):>11,.0f} {r['peak_rss_mib']:>13,.0f}")
            shutil.rmtree(copy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
