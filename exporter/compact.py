"""``flowship compact``: merge the small files of closed partitions, and delete partitions past retention.

Every node's parquet sink publishes a file per ``max_file_rows`` or ``max_file_age``, so an hour of a busy
cluster becomes hundreds of small files, and query engines pay per file. Compaction rewrites the files of
each *closed* partition (its hour ended more than ``settle`` ago) into files of ``max_file_rows`` with
row groups of ``row_group_rows``, sorted by time, on a local disk or on S3 alike.

Memory stays bounded whatever the partition size: only the time column of the inputs is read whole (8 bytes a
row) to compute the merged order; rows then flow through in chunks, each input read forward once (every input
is already sorted by time, so the rows a chunk takes from one input are the next ones in it).

A crash at any moment loses and duplicates nothing, through a journal per partition:

1. the outputs are written under hidden names (``.compacted-….parquet.pending``, which readers skip);
2. a journal ``_flowship/compaction/<partition>.json`` names the inputs and outputs;
3. the outputs get their visible names, then the inputs are deleted, then the journal.

A run first finishes what a journal describes (steps 3, each idempotent) and removes hidden outputs no journal
names (a crash before step 2: the inputs are untouched). Between step 3's renames and deletes a reader can see
a partition's rows twice for a moment: ``flowship history`` reads the journals to leave out the replaced files;
other readers that need exactness deduplicate by ``uuid``, as for any at-least-once data. Files that appear in a partition while it is compacted (late flows) are not inputs, so
they stay, and the next run merges them.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from flowship.model.low_cardinality import LOW_CARDINALITY_COLUMNS
from flowship.sinks import time_column
from flowship.sinks.parquet_store import ArchiveOps, LocalStore, S3Config, S3Store, s3_location

JOURNALS = "_flowship/compaction"
PENDING = ".pending"
KINDS = ("flows", "aggregates")
HOUR_NS = 3600 * 10**9
_PART = re.compile(r"^([a-z_]+)=(.*)$")


@dataclass
class CompactOptions:
    settle: float = 3600.0  # a partition is closed this long after its hour ended
    max_file_rows: int = 4_194_304
    # Scan-sized (engines read row groups in parallel), and the memory bound: a row group is held decoded
    # until it is written (~1 KiB a flow), as pyarrow writes whole row groups.
    row_group_rows: int = 262_144
    chunk_rows: int = 65_536  # rows merged at a time (memory per chunk)
    retention: float | None = None  # delete partitions whose hour ended longer ago than this
    dry_run: bool = False
    compression: str = "zstd"
    compression_level: int = 3  # written once, read often: a little more effort than the sink's level 1


@dataclass
class Partition:
    kind: str
    directory: str  # key of the leaf folder, e.g. flows/dt=2026-12-01/hour=13
    start_ns: int
    files: list[str] = field(default_factory=list)  # visible *.parquet keys
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each visible file, from the listing
    pending: list[str] = field(default_factory=list)  # hidden outputs of an earlier run

    @property
    def end_ns(self) -> int:
        return self.start_ns + HOUR_NS


@dataclass
class Summary:
    partitions_seen: int = 0
    compacted: int = 0
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    deleted_partitions: int = 0
    deleted_files: int = 0
    recovered: int = 0
    skipped: list[str] = field(default_factory=list)  # partitions left alone, with the reason

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def open_archive(path: str, s3: S3Config | None = None) -> ArchiveOps:
    log = structlog.get_logger().bind(component="compact")
    if s3_location(path):
        store = S3Store(path, s3 or S3Config(), log)
        store.start()
        return store
    store = LocalStore(path, fsync=True, log=log)
    if not store.root.is_dir():
        raise ValueError(f"{path}: no such directory (the parquet sink's path)")
    return store


def partition_start(directory: str) -> int | None:
    """The hour a partition folder holds, from ``dt=/hour=`` or ``year=/month=/day=/hour=`` parts."""
    parts: dict[str, str] = {}
    for segment in directory.split("/"):
        match = _PART.match(segment)
        if match:
            parts[match.group(1)] = match.group(2)
    try:
        if "dt" in parts:
            day = datetime.strptime(parts["dt"], "%Y-%m-%d")
        else:
            day = datetime(int(parts["year"]), int(parts["month"]), int(parts["day"]))
        hour = int(parts["hour"])
    except (KeyError, ValueError):
        return None
    if not 0 <= hour <= 23:
        return None
    return int(day.replace(tzinfo=UTC).timestamp()) * 10**9 + hour * HOUR_NS


def find_partitions(store: ArchiveOps) -> tuple[list[Partition], list[str]]:
    """Leaf folders holding Parquet under flows/ and aggregates/; and folders whose names carry no hour."""
    found: dict[str, Partition] = {}
    unknown: set[str] = set()
    for kind in KINDS:
        for item in store.list_files(kind):
            directory, _, name = item.key.rpartition("/")
            visible = name.endswith(".parquet") and not name.startswith((".", "_"))
            # an output, or what a crash inside its write left (the local store's .tmp of a .pending)
            hidden = name.startswith((".compacted-", "..compacted-")) and name.endswith((PENDING, PENDING + ".tmp"))
            if not (visible or hidden):
                continue
            part = found.get(directory)
            if part is None:
                start = partition_start(directory)
                if start is None:
                    unknown.add(directory)
                    continue
                part = found[directory] = Partition(kind, directory, start)
            (part.files if visible else part.pending).append(item.key)
            if visible:
                part.sizes[item.key] = item.size
    return sorted(found.values(), key=lambda p: (p.kind, p.start_ns, p.directory)), sorted(unknown)


def journal_key(part: Partition) -> str:
    return f"{JOURNALS}/{part.directory.replace('/', '~')}.json"


# ---------------------------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------------------------


def recover(store: ArchiveOps, log: Any) -> int:
    """Finish every journalled compaction a crash interrupted; returns how many."""
    done = 0
    for item in store.list_files(JOURNALS):
        if item.key.endswith(".json.tmp"):  # a journal whose write a crash cut: its compaction never began
            store.delete(item.key)
            continue
        if not item.key.endswith(".json"):
            continue
        try:
            journal = orjson.loads(store.read(item.key))
            inputs, outputs = list(journal["inputs"]), [(o["pending"], o["final"]) for o in journal["outputs"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{store.path(item.key)}: not a compaction journal ({exc}); remove it only after "
                             "checking the partition it names") from None
        missing = [final for pending, final in outputs if not store.exists(pending) and not store.exists(final)]
        if missing:
            raise ValueError(f"{store.path(item.key)}: the outputs {missing} it names are gone; the inputs are "
                             "kept, nothing is deleted")
        _finish(store, inputs, outputs)
        store.delete(item.key)
        log.info("finished an interrupted compaction", journal=store.path(item.key), inputs=len(inputs))
        done += 1
    return done


def _finish(store: ArchiveOps, inputs: list[str], outputs: list[tuple[str, str]]) -> None:
    for pending, final in outputs:
        if store.exists(pending):
            store.rename(pending, final)
    for key in inputs:
        if store.exists(key):
            store.delete(key)


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


class _Forward:
    """Reads one input file forward, handing out its next ``n`` rows."""

    def __init__(self, store: ArchiveOps, key: str, schema: pa.Schema, batch_rows: int) -> None:
        self._file = pq.ParquetFile(store.open_input(key))
        self._batches = self._file.iter_batches(batch_size=batch_rows)
        self._schema = schema
        self._held: list[pa.RecordBatch] = []
        self._held_rows = 0

    def take(self, n: int) -> pa.Table:
        while self._held_rows < n:
            batch = next(self._batches)
            self._held.append(batch)
            self._held_rows += batch.num_rows
        table = pa.Table.from_batches(self._held).combine_chunks()
        out, rest = table.slice(0, n), table.slice(n)
        self._held = rest.to_batches()
        self._held_rows = rest.num_rows
        return out.cast(self._schema) if out.schema != self._schema else out


def merged_chunks(store: ArchiveOps, kind: str, inputs: list[str], schema: pa.Schema,
                  chunk_rows: int) -> Iterator[pa.Table]:
    """The rows of all inputs in time order (ties: input order), ``chunk_rows`` at a time, as ``schema``."""
    column = time_column(schema.empty_table(), kind)
    if column is None:
        raise ValueError(f"{inputs[0]}: no time column to sort {kind} rows by")
    times = [pq.read_table(store.open_input(key), columns=[column]).column(column)
             .cast(pa.int64()).to_numpy(zero_copy_only=False) for key in inputs]
    which = np.concatenate([np.full(len(t), i, dtype=np.int32) for i, t in enumerate(times)])
    order = np.argsort(np.concatenate(times), kind="stable")
    source = which[order]
    del which, order, times
    # Small reads per input: the reader decodes pages as asked, so what an input holds decoded is about one
    # read, and the inputs together about one chunk, however many there are.
    batch_rows = max(1024, chunk_rows // len(inputs))
    readers = [_Forward(store, key, schema, batch_rows) for key in inputs]
    for start in range(0, len(source), chunk_rows):
        files = source[start:start + chunk_rows]
        counts = np.bincount(files, minlength=len(inputs))
        taken = [(i, readers[i].take(int(c))) for i, c in enumerate(counts) if c]
        offset = np.zeros(len(inputs), dtype=np.int64)
        offset[[i for i, _ in taken]] = np.cumsum([0] + [t.num_rows for _, t in taken[:-1]])
        # the k-th row of this chunk that comes from input f is row k of what f gave
        by_file = np.argsort(files, kind="stable")
        group_start = np.cumsum(counts) - counts
        rank = np.empty(len(files), dtype=np.int64)
        rank[by_file] = np.arange(len(files)) - np.repeat(group_start, counts)
        table = pa.concat_tables([t for _, t in taken])
        yield table.take(pa.array(offset[files] + rank))


def _output_keys(part: Partition, inputs: list[str], first_ns: int, count: int) -> list[tuple[str, str]]:
    """(hidden, visible) names, the same for the same inputs: a rerun after a crash rewrites, never adds."""
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:12]
    names = [f"compacted-{first_ns}-{digest}-{i:03d}.parquet" for i in range(count)]
    return [(f"{part.directory}/.{n}{PENDING}", f"{part.directory}/{n}") for n in names]


def compact_partition(store: ArchiveOps, part: Partition, options: CompactOptions, log: Any) -> tuple[int, int, int]:
    """Rewrites one partition; returns (rows, bytes in, bytes out)."""
    inputs = sorted(part.files)
    rows = sum(pq.read_metadata(store.open_input(key)).num_rows for key in inputs)
    count = max(1, -(-rows // options.max_file_rows))
    outputs = _output_keys(part, inputs, part.start_ns, count)
    schema = pq.read_schema(store.open_input(inputs[0]))
    chunks = merged_chunks(store, part.kind, inputs, schema, options.chunk_rows)
    dictionary = [c for c in sorted(LOW_CARDINALITY_COLUMNS) if c in schema.names]
    held: list[pa.Table] = []
    bytes_out = 0
    for n, (pending, _final) in enumerate(outputs):
        quota = min(options.max_file_rows, rows - n * options.max_file_rows)

        def write(where: Any, quota: int = quota) -> None:
            with pq.ParquetWriter(where, schema, compression=options.compression,
                                  compression_level=options.compression_level, use_dictionary=dictionary or False,
                                  write_statistics=True) as writer:
                left = quota
                pending_rows: list[pa.Table] = []
                buffered = 0
                while left:
                    table = held.pop() if held else next(chunks)
                    if table.num_rows > left:
                        held.append(table.slice(left))
                        table = table.slice(0, left)
                    left -= table.num_rows
                    pending_rows.append(table)
                    buffered += table.num_rows
                    if buffered >= options.row_group_rows or not left:
                        group = pa.concat_tables(pending_rows)
                        for start in range(0, group.num_rows, options.row_group_rows):
                            writer.write_table(group.slice(start, options.row_group_rows),
                                               row_group_size=options.row_group_rows)
                        pending_rows, buffered = [], 0

        bytes_out += store.put(pending, write)
    journal = {"inputs": inputs, "outputs": [{"pending": p, "final": f} for p, f in outputs],
               "rows": rows, "time": datetime.now(UTC).isoformat()}
    store.put(journal_key(part), lambda where: where.write(orjson.dumps(journal)))
    _finish(store, inputs, outputs)
    store.delete(journal_key(part))
    log.info("partition compacted", partition=part.directory, files_in=len(inputs), files_out=len(outputs),
             rows=rows)
    return rows, sum(part.sizes.get(k, 0) for k in inputs), bytes_out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(store: ArchiveOps, options: CompactOptions, now_ns: int | None = None, progress: Any = None) -> Summary:
    """Recover, apply retention, and compact every closed partition that has files the sinks wrote and more
    than one file in all (a partition of compaction outputs only is left as it is: reruns are no-ops)."""
    log = structlog.get_logger().bind(component="compact")
    now_ns = now_ns if now_ns is not None else time.time_ns()
    summary = Summary()
    if not options.dry_run:
        summary.recovered = recover(store, log)
    partitions, unknown = find_partitions(store)
    summary.skipped.extend(f"{d}: no dt=/hour= or year=/month=/day=/hour= in the path" for d in unknown)
    summary.partitions_seen = len(partitions)
    for part in partitions:
        if part.pending and not options.dry_run:
            for key in part.pending:  # outputs of a run that crashed before its journal: inputs are intact
                store.delete(key)
            part.pending = []
        if options.retention is not None and part.end_ns <= now_ns - int(options.retention * 1e9):
            summary.deleted_partitions += 1
            summary.deleted_files += len(part.files)
            if progress:
                progress(f"{'would delete' if options.dry_run else 'deleting'} {part.directory} "
                         f"({len(part.files)} files, past retention)")
            if not options.dry_run:
                store.delete_tree(part.directory)
            continue
        if part.end_ns > now_ns - int(options.settle * 1e9):
            continue  # still open: the sinks may add files
        fresh = [key for key in part.files if not key.rpartition("/")[2].startswith("compacted-")]
        if not fresh or len(part.files) < 2:
            continue  # compacted already, or a single file: nothing to merge
        if progress:
            progress(f"{'would compact' if options.dry_run else 'compacting'} {part.directory} "
                     f"({len(part.files)} files)")
        summary.compacted += 1
        summary.files_in += len(part.files)
        if options.dry_run:
            continue
        try:
            rows, bytes_in, bytes_out = compact_partition(store, part, options, log)
        except (OSError, pa.ArrowException, ValueError) as exc:
            summary.compacted -= 1
            summary.files_in -= len(part.files)
            summary.skipped.append(f"{part.directory}: {exc}")
            log.error("partition not compacted; its files are kept", partition=part.directory, error=str(exc))
            continue
        summary.rows += rows
        summary.bytes_in += bytes_in
        summary.bytes_out += bytes_out
        summary.files_out += max(1, -(-rows // options.max_file_rows))
    return summary
