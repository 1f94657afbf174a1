"""What the all-null columns of a flow batch cost the Parquet sink, and what its sorting copy costs.

    python bench/bench_parquet_columns.py [--rows 131072] [--repeat 3]

Rows come from bench/flowgen.py (agent-like flows: about 40 of the 87
columns are null in every row). For one file's worth of rows, in CPU
seconds of this process (best of ``--repeat``), Arrow on one thread:

* the sink's two copies before writing — ``combine_chunks`` of the buffered
  batches and the ``take`` that sorts by time — done on every column, and
  done with the all-null columns rebuilt as null arrays instead;
* ``pyarrow.parquet.write_table`` (zstd 1, the sink's dictionary columns)
  of all columns, of the populated columns only, and of the null ones alone,
  with the file sizes.

Leaving the null columns out of a file would change its schema, which the
history reader and compaction expect to be the flow schema; the figures say
whether that would be worth it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowgen import generate_batch  # noqa: E402

from flowship.model.schema import LOW_CARDINALITY_COLUMNS  # noqa: E402


def best_cpu(fn: Callable[[], object], repeat: int) -> float:
    """The smallest CPU time of ``repeat`` calls: the least disturbed one on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=131_072)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    flows = generate_batch(args.rows, seed=1, pods=2000, duration_s=600, namespaces=40)
    buffered = pa.Table.from_batches(pa.Table.from_batches([flows]).to_batches(max_chunksize=8192))
    n = buffered.num_rows
    null = [name for name in buffered.column_names if buffered.column(name).null_count == n]
    populated = [name for name in buffered.column_names if name not in null]
    dictionary = sorted(c for c in LOW_CARDINALITY_COLUMNS if c in buffered.column_names)
    print(f"{n:,} rows in {buffered.column(0).num_chunks} buffered batches; {len(null)} of "
          f"{buffered.num_columns} columns null in every row")

    combined = buffered.combine_chunks()
    order = pc.sort_indices(combined, sort_keys=[("time", "ascending")])

    def copies_all() -> pa.Table:
        table = buffered.combine_chunks()
        return table.take(order)

    def copies_skipping_nulls() -> pa.Table:
        arrays = [pa.nulls(n, col.type) if col.null_count == n else col.combine_chunks().take(order)
                  for col in buffered.columns]
        return pa.Table.from_arrays(arrays, schema=buffered.schema)

    assert copies_all().equals(copies_skipping_nulls())
    print(f"{'step':<52} {'CPU s':>7} {'rows/s':>12} {'file MiB':>9}")
    for label, fn in (("combine_chunks + sorting take, every column", copies_all),
                      ("combine_chunks + sorting take, null columns rebuilt", copies_skipping_nulls)):
        cpu = best_cpu(fn, args.repeat)
        print(f"{label:<52} {cpu:>7.3f} {n / cpu:>12,.0f}")

    sorted_table = copies_all()
    with tempfile.TemporaryDirectory(prefix="bench-parquet-columns-") as directory:
        for label, names in ((f"write_table, all {len(populated) + len(null)} columns", populated + null),
                             (f"write_table, the {len(populated)} populated columns", populated),
                             (f"write_table, the {len(null)} null columns alone", null)):
            path = os.path.join(directory, "f.parquet")
            table = sorted_table.select(names)
            encoded = [c for c in dictionary if c in names] or False

            def write(table: pa.Table = table, path: str = path, encoded: list[str] | bool = encoded) -> None:
                pq.write_table(table, path, row_group_size=131_072, compression="zstd", compression_level=1,
                               use_dictionary=encoded,
                               write_statistics=True, coerce_timestamps=None)

            cpu = best_cpu(write, args.repeat)
            print(f"{label:<52} {cpu:>7.3f} {n / cpu:>12,.0f} {os.path.getsize(path) / 2**20:>9.2f}")


if __name__ == "__main__":
    main()
