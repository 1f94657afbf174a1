"""Flow history through the Hubble API: ``observer.Observer`` served over a ``parquet`` sink's archive.

``flowship history --archive PATH|s3://BUCKET/PREFIX`` answers ``hubble observe``, Hubble UI's backend and
any other Observer client from the stored flows, the way a Cilium node answers from its ring: GetFlows with
``since``/``until``/``number``/``first``, whitelist and blacklist FlowFilters, ``field_mask``; ServerStatus,
GetNodes and GetNamespaces. See docs/history.md.

How a GetFlows call is answered:

1. **Partition pruning.** The archive is listed once per call and only files whose hour partition
   (``dt=/hour=`` or the aws layout's ``year=/month=/day=/hour=``) overlaps [since, until] are kept.
2. **Push-down.** Hours are read in queries of widening size (1, 2, 4, ... hours) with the time range and a
   superset of the whitelist (verdicts, directions, namespaces, ports, identities, uuids) in the scan. A local
   archive is read by DuckDB, which decodes the columns that are not filtered on only for the rows that
   passed; an S3 archive by pyarrow.dataset on pyarrow's S3 filesystem (no DuckDB extension to download),
   where row-group statistics skip what cannot match.
3. **Order.** DuckDB sorts each query's rows by (time, uuid), spilling to disk past its memory limit (for S3:
   Arrow in memory up to ``_SORT_IN_MEMORY_ROWS``, DuckDB beyond). Hours do not overlap, so query after query
   is time order across the whole archive.
4. **The exact answer** comes from the one FlowFilter compiler the ``filter`` stage and the agent's
   Observer use (:func:`flowship.model.flowfilter.compile_filter_set`), evaluated on those batches.

``number`` with ``first`` is the first n matching flows at or after ``since``; ``number`` without
``first`` is the last n at or before ``until`` (the newest hours are read first and reading stops once n
matched); no ``number`` is every matching flow in the range. ``follow`` continues with the files the sink
publishes after the call started: the archive is listed every ``follow_poll`` and each new file's matching
flows are sent, in time order within what one listing found.

With a live source (``--live-observer`` or ``--live-kafka``), ``follow`` hands over instead from the archive
to that source at a per-node seam (the newest archived flow), looking back a window before it and dropping
the live flows the archive already answered, so no flow is missing or repeated at the seam; a source that no
longer holds the window is reported with a LostEvent (:mod:`flowship.history_live`).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import structlog
from pyarrow import fs

from flowship.history_live import LiveConfig, LiveSourceError, follow_live
from flowship.model.flowfilter import FilterSet
from flowship.model.schema import FLOW_SCHEMA
from flowship.observer_server import (
    VERSION,
    FlowRequest,
    ObserverTLSConfig,
    address_problems,
    health_handler,
    listen,
    new_grpc_server,
    observer_handler,
)
from flowship.proto.flow import flow_pb2
from flowship.proto.observer import observer_pb2
from flowship.sinks.parquet_store import S3Config, s3_filesystem, s3_location

# Not Cilium's Hubble server (4244) nor Hubble Relay (4245): both can run on the same machine.
DEFAULT_ADDRESS = "127.0.0.1:4255"
HOUR_NS = 3600 * 1_000_000_000
_TIME_TYPE = FLOW_SCHEMA.field("time").type
_SUMMARY_COLUMNS = ["time", "node_name", "src_cluster", "src_namespace", "dst_cluster", "dst_namespace"]
_CONVERT_ROWS = 1024  # rows converted to Flow messages at a time (and between client checks)
_SPILL_DIR = os.path.join(tempfile.gettempdir(), "flowship-history")  # DuckDB's sorts bigger than memory
_SORT_IN_MEMORY_ROWS = 262_144  # an hour's scanned rows up to this many are ordered by Arrow; more go to DuckDB
_SCAN_THREADS = max(1, min(2, os.cpu_count() or 1))  # DuckDB threads of one local scan
_SCAN_MEMORY = "1GB"  # DuckDB's memory for every scan of an archive; its sorts spill to _SPILL_DIR past it
_QUERY_BYTES = 256 * 2**20  # Parquet read by one query of widening hours (see _widening)


class ArchiveError(ValueError):
    """The archive cannot be read: a missing directory or bucket, a path that is not a parquet sink's."""


@dataclass(frozen=True)
class ArchiveFile:
    path: str  # as the archive's filesystem names it
    hour: int | None  # hours since the epoch, from the partition folders; None when they say nothing
    size: int
    mtime_ns: int


@dataclass
class FileSummary:
    """What ServerStatus, GetNodes and GetNamespaces need from one file (read once, then cached)."""

    rows: int
    oldest_ns: int | None
    newest_ns: int | None
    nodes: dict[str, int]
    namespaces: set[tuple[str, str]]


@dataclass
class ArchiveSummary:
    files: int = 0
    flows: int = 0
    oldest_ns: int | None = None
    newest_ns: int | None = None
    nodes: dict[str, int] = field(default_factory=dict)
    namespaces: set[tuple[str, str]] = field(default_factory=set)


def partition_hour(parts: list[str]) -> int | None:
    """Hours since the epoch named by a file's folders (``dt=2026-12-01/hour=13`` or year=/month=/day=/hour=)."""
    keys = dict(p.split("=", 1) for p in parts if "=" in p)
    try:
        if "dt" in keys and "hour" in keys:
            day = datetime.strptime(keys["dt"], "%Y-%m-%d").replace(tzinfo=UTC)
        elif {"year", "month", "day", "hour"} <= keys.keys():
            day = datetime(int(keys["year"]), int(keys["month"]), int(keys["day"]), tzinfo=UTC)
        else:
            return None
        return int(day.timestamp()) // 3600 + int(keys["hour"])
    except ValueError:
        return None


@dataclass(frozen=True)
class _Term:
    """``column IN values``: one conjunct of a pushed-down scan filter."""

    column: str
    values: tuple[Any, ...]


def _ints(values: Any) -> tuple[int, ...] | None:
    """Port numbers as the compiler reads them, or None when one does not parse (the compiler reports it)."""
    try:
        return tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        return None


def _pushdown_terms(whitelist: list[flow_pb2.FlowFilter]) -> list[list[_Term]] | None:
    """A superset of the whitelist as alternatives (OR) of conjunctions (AND) of ``column IN values``.

    Only fields whose compiled meaning is a plain membership of one column carry over: verdicts, traffic
    directions, the namespace of ``source_pod``/``destination_pod``, ports, identities and uuids. None when
    some whitelist filter constrains none of them, since then any flow may match. The compiler decides
    afterwards; this only lets the scan skip row groups and rows early.
    """
    if not whitelist:
        return None
    alternatives = []
    for spec in whitelist:
        terms = []
        if spec.verdict:
            terms.append(_Term("verdict", tuple(flow_pb2.Verdict.Name(v) for v in spec.verdict)))
        if spec.traffic_direction:
            terms.append(_Term("traffic_direction",
                               tuple(flow_pb2.TrafficDirection.Name(v) for v in spec.traffic_direction)))
        for values, column in ((spec.source_pod, "src_namespace"), (spec.destination_pod, "dst_namespace")):
            namespaces = set()
            for value in values:
                ns = value.split("/")[0] if "/" in value else ("default" if value else "")
                namespaces.add(ns)
            if values and "" not in namespaces:  # the compiler's "[namespace/][prefix]" rule
                terms.append(_Term(column, tuple(sorted(namespaces))))
        for values, column in ((spec.source_port, "src_port"), (spec.destination_port, "dst_port"),
                               (spec.source_identity, "src_identity"),
                               (spec.destination_identity, "dst_identity")):
            numbers = _ints(values) if values else None
            if numbers is not None:
                terms.append(_Term(column, numbers))
        if spec.uuid:
            terms.append(_Term("uuid", tuple(sorted(set(spec.uuid)))))
        if not terms:
            return None
        alternatives.append(terms)
    return alternatives


def _pushdown(whitelist: list[flow_pb2.FlowFilter]) -> ds.Expression | None:
    """The pushed-down superset as a pyarrow.dataset filter (the S3 scan)."""
    alternatives = _pushdown_terms(whitelist)
    if alternatives is None:
        return None
    out = None
    for terms in alternatives:
        expr = None
        for term in terms:
            kept = ds.field(term.column).isin(list(term.values))
            expr = kept if expr is None else expr & kept
        out = expr if out is None else out | expr
    return out


def _pushdown_sql(whitelist: list[flow_pb2.FlowFilter]) -> tuple[str, list[Any]] | None:
    """The pushed-down superset as a DuckDB WHERE clause with its parameters (the local scan)."""
    alternatives = _pushdown_terms(whitelist)
    if alternatives is None:
        return None
    clauses, params = [], []
    for terms in alternatives:
        parts = []
        for term in terms:  # column names come from the fixed set above; values are bound parameters
            parts.append(f"{term.column} IN ({', '.join('?' * len(term.values))})")
            params.extend(term.values)
        clauses.append("(" + " AND ".join(parts) + ")")
    return " OR ".join(clauses), params


def _time_sql(since_ns: int | None, until_ns: int | None) -> tuple[list[str], list[Any]]:
    """The time range as DuckDB conditions, exact to the nanosecond (TIMESTAMPTZ would round to microseconds)."""
    clauses, params = [], []
    if since_ns is not None:
        clauses.append("time >= make_timestamp_ns(?)::TIMESTAMPTZ_NS")
        params.append(since_ns)
    if until_ns is not None:
        clauses.append("time <= make_timestamp_ns(?)::TIMESTAMPTZ_NS")
        params.append(until_ns)
    return clauses, params


def _as_flow_schema(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch DuckDB returned, in FLOW_SCHEMA: its time zone is named Etc/UTC, and files written before a
    column existed lack it (null)."""
    columns = []
    for f in FLOW_SCHEMA:
        i = batch.schema.get_field_index(f.name)
        if i < 0:
            columns.append(pa.nulls(batch.num_rows, f.type))
        else:
            column = batch.column(i)
            columns.append(column if column.type == f.type else column.cast(f.type))
    return pa.RecordBatch.from_arrays(columns, schema=FLOW_SCHEMA)


class Archive:
    """The flows a ``parquet`` sink stored under a directory or ``s3://bucket/prefix``."""

    def __init__(self, location: str, s3: S3Config | None = None) -> None:
        self.location = location
        bucket_prefix = s3_location(location)
        if bucket_prefix is not None:
            bucket, prefix = bucket_prefix
            self.fs: fs.FileSystem = s3_filesystem(s3 or S3Config())
            self.root = f"{bucket}/{prefix}" if prefix else bucket
        else:
            self.fs = fs.LocalFileSystem()
            self.root = location.rstrip("/") or "/"
        self._summaries: dict[ArchiveFile, FileSummary] = {}
        self._lock = threading.Lock()
        self._duckdb: Any = None  # one in-memory DuckDB database for every local scan; a cursor per query

    def check(self) -> None:
        """Raises ArchiveError when the location does not exist or is not a directory (a bucket, a prefix)."""
        try:
            info = self.fs.get_file_info(self.root)
        except OSError as exc:
            raise ArchiveError(f"{self.location}: cannot be read: {exc}") from None
        if info.type == fs.FileType.NotFound and s3_location(self.location) is None:
            raise ArchiveError(f"{self.location}: no such directory (give the parquet sink's path)")
        if info.type == fs.FileType.File:
            raise ArchiveError(f"{self.location}: is a file, not a parquet sink's directory")
        if s3_location(self.location) is not None:
            bucket = self.root.split("/")[0]
            try:
                exists = self.fs.get_file_info(bucket).type != fs.FileType.NotFound
            except OSError as exc:
                raise ArchiveError(f"{self.location}: cannot be read: {exc}") from None
            if not exists:
                raise ArchiveError(f"{self.location}: the bucket {bucket!r} does not exist")

    def _flows_root(self) -> str:
        flows = f"{self.root.rstrip('/')}/flows"
        return flows if self.fs.get_file_info(flows).type == fs.FileType.Directory else self.root

    def list_files(self) -> list[ArchiveFile]:
        """Every published Parquet file (a directory walk, or one recursive S3 listing), each flow in one file.

        ``flowship compact`` replaces a partition's files by renaming its outputs into place and then deleting
        the inputs, so a listing in between sees both. Its journals (read before and after the listing) name
        the inputs and outputs of every switch in progress: while some outputs are visible the inputs still
        hold every flow and those outputs are left out; once all are, the inputs are.
        """
        journals = self._compaction_journals()
        root = self._flows_root()
        selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            if info.type != fs.FileType.File or not name.endswith(".parquet") or name.startswith("."):
                continue  # .<name>.tmp is a file being written
            hour = partition_hour(info.path[len(root):].split("/")[:-1])
            out.append(ArchiveFile(info.path, hour, info.size or 0, info.mtime_ns or 0))
        journals.update(self._compaction_journals())
        if not journals:
            return out
        listed = {f.path for f in out}
        hidden: set[str] = set()
        for inputs, outputs in journals.values():
            visible = outputs & listed
            hidden |= inputs if visible == outputs else visible
        return [f for f in out if f.path not in hidden]

    def _compaction_journals(self) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
        """The (inputs, outputs) of each compaction journal under ``_flowship/compaction``, by journal path."""
        import orjson

        base = self.root.rstrip("/")
        selector = fs.FileSelector(f"{base}/_flowship/compaction", allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(selector):
            if info.type != fs.FileType.File or not info.path.endswith(".json"):
                continue
            try:
                with self.fs.open_input_stream(info.path) as src:
                    journal = orjson.loads(src.read())
                inputs = frozenset(f"{base}/{key}" for key in journal["inputs"])
                outputs = frozenset(f"{base}/{o['final']}" for o in journal["outputs"])
            except FileNotFoundError:
                continue  # the compaction finished between the listing and the read
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: `flowship compact` reports it; the listing stays as it is
            out[info.path] = (inputs, outputs)
        return out

    def files(self, since_ns: int | None = None, until_ns: int | None = None,
              among: list[ArchiveFile] | None = None) -> list[ArchiveFile]:
        """Published files (or those of ``among``) whose hour partition may hold flows in [since, until]."""
        def overlaps(hour: int | None) -> bool:
            if hour is None:
                return True
            return ((since_ns is None or (hour + 1) * HOUR_NS > since_ns)
                    and (until_ns is None or hour * HOUR_NS <= until_ns))

        return [f for f in (self.list_files() if among is None else among) if overlaps(f.hour)]

    # -- summaries ---------------------------------------------------------------------------
    def summary(self) -> ArchiveSummary:
        """Flows stored, their time span, nodes and namespaces; files already summarized are not read again."""
        files = self.list_files()
        out = ArchiveSummary(files=len(files))
        known = {f: self._summary_of(f) for f in files}
        with self._lock:
            self._summaries = known  # files gone from the archive are forgotten
        for s in known.values():
            out.flows += s.rows
            if s.oldest_ns is not None:
                out.oldest_ns = s.oldest_ns if out.oldest_ns is None else min(out.oldest_ns, s.oldest_ns)
                assert s.newest_ns is not None
                out.newest_ns = s.newest_ns if out.newest_ns is None else max(out.newest_ns, s.newest_ns)
            for node, count in s.nodes.items():
                out.nodes[node] = out.nodes.get(node, 0) + count
            out.namespaces |= s.namespaces
        return out

    def newest_ns(self, files: list[ArchiveFile]) -> int | None:
        """The time of the newest flow in ``files``."""
        times = [s.newest_ns for s in map(self._summary_of, files) if s.newest_ns is not None]
        return max(times) if times else None

    def _summary_of(self, f: ArchiveFile) -> FileSummary:
        with self._lock:
            known = self._summaries.get(f)
        if known is None:
            known = self._summarize(f)
            with self._lock:
                self._summaries[f] = known
        return known

    def _summarize(self, f: ArchiveFile) -> FileSummary:
        table = pq.read_table(f.path, columns=_SUMMARY_COLUMNS, filesystem=self.fs)
        times = table.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        counts = table.column("node_name").value_counts().to_pylist() if table.num_rows else []
        nodes = {c["values"]: c["counts"] for c in counts if c["values"]}
        namespaces: set[tuple[str, str]] = set()
        for side in ("src", "dst"):
            pairs = table.select([f"{side}_cluster", f"{side}_namespace"]).group_by(
                [f"{side}_cluster", f"{side}_namespace"]).aggregate([])
            for cluster, ns in zip(pairs.column(0).to_pylist(), pairs.column(1).to_pylist(), strict=True):
                if ns:
                    namespaces.add((cluster or "", ns))
        return FileSummary(table.num_rows, int(times.min()) if len(times) else None,
                           int(times.max()) if len(times) else None, nodes, namespaces)

    # -- queries -----------------------------------------------------------------------------
    def select(self, since_ns: int | None, until_ns: int | None, filters: FilterSet | None = None,
               whitelist: list[flow_pb2.FlowFilter] | None = None, number: int = 0,
               first: bool = False, among: list[ArchiveFile] | None = None) -> Iterator[pa.RecordBatch]:
        """Matching flows in time order (time, then uuid): all of them, the first ``number`` or the last.

        ``since`` and ``until`` are inclusive. ``whitelist`` (the same filters ``filters`` was compiled
        from) only narrows the scan; ``filters`` decides. ``among`` limits the query to those files.
        """
        files = self.files(since_ns, until_ns, among)
        by_hour: dict[int, list[ArchiveFile]] = {}
        for f in files:
            by_hour.setdefault(-1 if f.hour is None else f.hour, []).append(f)
        # hours oldest first; files outside hour partitions make one group covering every time
        groups = [files] if -1 in by_hour else [by_hour[hour] for hour in sorted(by_hour)]
        if number and not first:
            # newest first, hour after hour, until `number` matched; then sent oldest first
            newest: list[pa.RecordBatch] = []
            remaining = number
            for group in _widening(list(reversed(groups))):
                for batch in self._ordered(group, since_ns, until_ns, whitelist, filters, newest_first=True):
                    batch = batch.slice(0, remaining)
                    newest.append(batch)
                    remaining -= batch.num_rows
                    if remaining == 0:
                        break
                if remaining == 0:
                    break
            for batch in reversed(newest):
                if batch.num_rows:
                    yield batch.take(pa.array(range(batch.num_rows - 1, -1, -1)))
            return
        remaining = number
        for group in _widening(groups):
            for batch in self._ordered(group, since_ns, until_ns, whitelist, filters):
                if number:
                    batch = batch.slice(0, remaining)
                    remaining -= batch.num_rows
                if batch.num_rows:
                    yield batch
                if number and remaining == 0:
                    return

    def _ordered(self, files: list[ArchiveFile], since_ns: int | None, until_ns: int | None,
                 whitelist: list[flow_pb2.FlowFilter] | None, filters: FilterSet | None,
                 newest_first: bool = False) -> Iterator[pa.RecordBatch]:
        """The matching flows of ``files`` sorted by (time, uuid): DuckDB for a local archive, pyarrow for S3."""
        if isinstance(self.fs, fs.LocalFileSystem):
            return self._ordered_duckdb(files, since_ns, until_ns, list(whitelist or []), filters, newest_first)
        scan_filter = _time_filter(since_ns, until_ns)
        narrowed = _pushdown(list(whitelist or []))
        if narrowed is not None:
            scan_filter = narrowed if scan_filter is None else scan_filter & narrowed
        return self._ordered_pyarrow(files, scan_filter, filters, newest_first)

    def scan_engine(self) -> Any:
        """The DuckDB database of this archive's local scans, opened on first use (the server opens it at start:
        importing DuckDB and opening a database cost more than scanning an hour of a small archive)."""
        import duckdb

        with self._lock:
            if self._duckdb is None:
                self._duckdb = duckdb.connect(config={"threads": _SCAN_THREADS, "temp_directory": _SPILL_DIR,
                                                      "memory_limit": _SCAN_MEMORY})
            return self._duckdb

    def _ordered_duckdb(self, files: list[ArchiveFile], since_ns: int | None, until_ns: int | None,
                        whitelist: list[flow_pb2.FlowFilter], filters: FilterSet | None,
                        newest_first: bool) -> Iterator[pa.RecordBatch]:
        """DuckDB reads, filters and orders some hours of a local archive; the compiler decides on what it returns.

        DuckDB evaluates the pushed-down superset on its columns first and decodes the other columns only for
        the rows that passed, so a selective query (a port, an identity) reads a fraction of each file; pyarrow
        decodes every column of every row group it keeps. Its sort spills to a temporary directory past its
        memory limit.
        """
        import duckdb

        where, params = _time_sql(since_ns, until_ns)
        narrowed = _pushdown_sql(whitelist)
        if narrowed is not None:
            where.append(f"({narrowed[0]})")
            params.extend(narrowed[1])
        direction = "DESC" if newest_first else "ASC"
        sql = ("SELECT * FROM read_parquet(?, hive_partitioning=false, union_by_name=true)"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY time {direction}, uuid {direction}")
        con = self.scan_engine().cursor()
        try:
            reader = con.sql(sql, params=[[f.path for f in files], *params]).to_arrow_reader(64 * 1024)
            for batch in reader:
                batch = _as_flow_schema(batch)
                if filters is not None:
                    batch = batch.filter(pa.array(filters.mask(batch), type=pa.bool_()))
                if batch.num_rows:
                    yield batch
        except (duckdb.IOException, duckdb.InvalidInputException) as exc:
            # a file deleted under the query (retention, compaction) or damaged: the caller answers UNAVAILABLE
            raise OSError(str(exc).splitlines()[0]) from exc
        finally:
            con.close()

    def _ordered_pyarrow(self, files: list[ArchiveFile], scan_filter: ds.Expression | None,
                         filters: FilterSet | None, newest_first: bool = False) -> Iterator[pa.RecordBatch]:
        """One hour's matching flows sorted by (time, uuid): pyarrow scans, the compiler filters, Arrow or DuckDB
        orders.

        What the scan keeps of an hour is usually small (the pushed-down filter narrows it): up to
        ``_SORT_IN_MEMORY_ROWS`` rows are filtered and sorted in memory by Arrow, which costs no per-hour set-up;
        a bigger hour goes to DuckDB, whose sort spills to a temporary directory past its memory limit. Batches are
        matched as they are produced, so a caller that stops early (``--last 20``) leaves the rest unconverted.
        """
        import pyarrow.compute as pc

        dataset = ds.dataset([f.path for f in files], schema=FLOW_SCHEMA, format="parquet", filesystem=self.fs)
        scanned = dataset.scanner(filter=scan_filter).to_reader()
        matched = (batch if filters is None else batch.filter(pa.array(filters.mask(batch), type=pa.bool_()))
                   for batch in scanned)
        order = "descending" if newest_first else "ascending"
        held: list[pa.RecordBatch] = []
        rows = 0
        for batch in matched:
            held.append(batch)
            rows += batch.num_rows
            if rows > _SORT_IN_MEMORY_ROWS:
                break
        else:
            table = pa.Table.from_batches(held, schema=FLOW_SCHEMA)
            if table.num_rows:
                table = table.take(pc.sort_indices(table, sort_keys=[("time", order), ("uuid", order)]))
                yield from table.to_batches(max_chunksize=64 * 1024)
            return
        import duckdb

        reader = pa.RecordBatchReader.from_batches(FLOW_SCHEMA, itertools.chain(held, matched))
        con = duckdb.connect(config={"threads": 2, "temp_directory": _SPILL_DIR})
        direction = "DESC" if newest_first else "ASC"
        try:
            con.register("flows", reader)
            ordered = con.sql(f"SELECT * FROM flows ORDER BY time {direction}, uuid {direction}") \
                .to_arrow_reader(64 * 1024)
            for batch in ordered:
                yield pa.RecordBatch.from_arrays(batch.columns, schema=FLOW_SCHEMA)  # DuckDB says Etc/UTC
        finally:
            con.close()


def _widening(hours: list[list[ArchiveFile]]) -> Iterator[list[ArchiveFile]]:
    """Hours (each a list of files, in the order they are read) joined into queries of 1, 2, 4, ... hours.

    The first flows come after one hour's query; a long range then costs few queries, since each has a fixed
    price (planning, reading footers, starting the sort) that hour-by-hour queries over a week would pay 168
    times. A query stops growing at ``_QUERY_BYTES`` of Parquet; hours never overlap, so the order holds.
    """
    width, i = 1, 0
    while i < len(hours):
        group: list[ArchiveFile] = []
        size = taken = 0
        while i < len(hours) and taken < width:
            hour_size = sum(f.size for f in hours[i])
            if group and size + hour_size > _QUERY_BYTES:
                break
            group.extend(hours[i])
            size += hour_size
            i += 1
            taken += 1
        yield group
        width *= 2


def _time_filter(since_ns: int | None, until_ns: int | None) -> ds.Expression | None:
    expr = None
    if since_ns is not None:
        expr = ds.field("time") >= pa.scalar(since_ns, type=_TIME_TYPE)
    if until_ns is not None:
        upper = ds.field("time") <= pa.scalar(until_ns, type=_TIME_TYPE)
        expr = upper if expr is None else expr & upper
    return expr


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

@dataclass
class HistoryConfig:
    """``flowship history``'s options."""

    archive: str
    address: str = DEFAULT_ADDRESS  # host:port, :port (every interface, needs mTLS) or unix:PATH
    tls: ObserverTLSConfig | None = None
    allow_unauthenticated: bool = False  # serve a non-loopback address without client certificates
    s3: S3Config = field(default_factory=S3Config)
    max_workers: int = 16  # concurrent calls; past twice as many waiting, gRPC answers RESOURCE_EXHAUSTED
    follow_poll: float = 1.0  # seconds between listings of the archive for a follow stream
    server_name: str | None = None  # the name in GetNodes' TLS info
    live: LiveConfig | None = None  # follow streams continue from this live source instead of polling the archive

    def validate(self) -> list[str]:
        problems = address_problems(self.address, self.tls, self.allow_unauthenticated)
        if self.live is not None:
            problems.extend(self.live.validate())
        if self.tls is not None:
            problems.extend(f"tls.{p}" for p in self.tls.validate())
        problems.extend(f"s3.{p}" for p in self.s3.validate())
        return problems


class HistoryServer:
    """observer.Observer over an :class:`Archive`."""

    def __init__(self, config: HistoryConfig, node_name: str | None = None, log: Any = None) -> None:
        self.config = config
        self.archive = Archive(config.archive, config.s3)
        self.node_name = node_name or socket.gethostname()
        self.log = log or structlog.get_logger().bind(component="history")
        self.started_ns = time.monotonic_ns()
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()  # ends follow streams
        # GetFlows streams hold a thread each: two are kept for ServerStatus and the other short calls
        self._stream_slots = threading.BoundedSemaphore(max(1, config.max_workers - 2))

    def start(self, where: str = "address") -> int:
        """Checks the archive, binds and serves; returns the port (0 for a unix socket)."""
        self.archive.check()
        if isinstance(self.archive.fs, fs.LocalFileSystem):
            self.archive.scan_engine()  # so that the first query's first flows do not wait for it
        server = new_grpc_server(self.config.max_workers, 60.0, 20.0)
        server.add_generic_rpc_handlers((observer_handler(_HistoryServicer(self)), health_handler()))
        self.port = listen(server, self.config.address, self.config.tls, where,
                           tcp_hint="(4244 is Cilium's Hubble server and 4245 Hubble Relay; choose another port)")
        server.start()
        self._server = server
        return self.port

    def stop(self, grace: float | None = 2.0) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace).wait(grace)
            self._server = None

    def get_flows(self, request: observer_pb2.GetFlowsRequest, query: FlowRequest,
                  context: grpc.ServicerContext) -> Iterator[bytes]:
        """The stored part (as Hubble: none for a follow without number or since), then, following, the live
        source's flows past the seam (:mod:`flowship.history_live`) or, without one, newly published files."""
        whitelist = list(request.whitelist)
        listed = self.archive.list_files()
        if request.number or not request.follow or query.since is not None:
            batches = self.archive.select(query.since, query.until, query.filters, whitelist, request.number,
                                          request.first, among=listed)
            yield from self._emit(batches, query, context)
        if not request.follow:
            return
        if self.config.live is not None:
            try:
                yield from follow_live(self.config.live, self.archive, listed, request, query, context,
                                       self._stopping)
            except LiveSourceError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        seen = {f.path for f in listed}
        while context.is_active() and not self._stopping.wait(float(self.config.follow_poll)):
            new = [f for f in self.archive.list_files() if f.path not in seen]
            if not new:
                continue
            seen.update(f.path for f in new)
            batches = self.archive.select(query.since, query.until, query.filters, whitelist, among=new)
            yield from self._emit(batches, query, context)
            newest = self.archive.newest_ns(new)
            if query.until is not None and newest is not None and newest > query.until:
                return  # a flow later than until was stored: the range is complete

    @staticmethod
    def _emit(batches: Iterator[pa.RecordBatch], query: FlowRequest,
              context: grpc.ServicerContext) -> Iterator[bytes]:
        from flowship.model.proto import to_flow_messages

        for batch in batches:
            for start in range(0, batch.num_rows, _CONVERT_ROWS):
                if not context.is_active():
                    return
                for msg in to_flow_messages(batch.slice(start, _CONVERT_ROWS)):
                    yield query.response(msg)

    def status(self) -> observer_pb2.ServerStatusResponse:
        s = self.archive.summary()
        span_s = ((s.newest_ns or 0) - (s.oldest_ns or 0)) / 1e9
        return observer_pb2.ServerStatusResponse(
            num_flows=s.flows, max_flows=s.flows, seen_flows=s.flows,
            uptime_ns=time.monotonic_ns() - self.started_ns, version=f"{VERSION} ({_span(s)})",
            flows_rate=s.flows / span_s if span_s > 0 else 0.0,
            num_connected_nodes={"value": len(s.nodes)}, num_unavailable_nodes={"value": 0})

    def nodes(self) -> list[observer_pb2.Node]:
        tls = self.config.tls
        s = self.archive.summary()
        return [observer_pb2.Node(
            name=name, version=VERSION, address=self.config.address,
            state=observer_pb2.NodeState.Value("NODE_CONNECTED"),
            tls=observer_pb2.TLS(enabled=tls is not None, server_name=self.config.server_name or ""),
            uptime_ns=time.monotonic_ns() - self.started_ns, num_flows=count, max_flows=count, seen_flows=count)
            for name, count in sorted(s.nodes.items())]

    def namespaces(self) -> list[observer_pb2.Namespace]:
        return [observer_pb2.Namespace(cluster=c, namespace=ns) for c, ns in sorted(self.archive.summary().namespaces)]


def _span(s: ArchiveSummary) -> str:
    """``history of N flows from OLDEST to NEWEST`` (RFC 3339, UTC), for ServerStatus and the start log."""
    if s.oldest_ns is None or s.newest_ns is None:
        return "history: no flows stored yet"

    def iso(ns: int) -> str:
        seconds, nanos = divmod(ns, 10**9)
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"

    return f"history of {s.flows} flows from {iso(s.oldest_ns)} to {iso(s.newest_ns)}"


class _HistoryServicer:
    def __init__(self, server: HistoryServer) -> None:
        self.s = server

    def GetFlows(self, request, context) -> Iterator[bytes]:  # noqa: N802 - gRPC naming
        if request.first and request.follow:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be specified with follow")
        try:
            query = FlowRequest(request, self.s.node_name)
        except ValueError as exc:  # FilterError is a ValueError too
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.s._stream_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many GetFlows streams: the limit is {self.s.config.max_workers - 2} "
                          "(max_workers - 2, so that short calls always find a thread)")
        try:
            yield from self.s.get_flows(request, query, context)
        except OSError as exc:  # S3 unreachable, a file deleted under the query (retention, compaction)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"reading the archive failed: {exc}")
        finally:
            self.s._stream_slots.release()

    def ServerStatus(self, request, context) -> observer_pb2.ServerStatusResponse:  # noqa: N802
        return self.s.status()

    def GetNodes(self, request, context) -> observer_pb2.GetNodesResponse:  # noqa: N802
        return observer_pb2.GetNodesResponse(nodes=self.s.nodes())

    def GetNamespaces(self, request, context) -> observer_pb2.GetNamespacesResponse:  # noqa: N802
        return observer_pb2.GetNamespacesResponse(namespaces=self.s.namespaces())


def serve(config: HistoryConfig, where: str = "--listen") -> int:
    """Runs the server until SIGTERM/SIGINT; prints ``listening on ADDRESS`` once clients can connect.

    Raises ArchiveError for an unreadable archive and OSError when the address cannot be bound.
    """
    log = structlog.get_logger().bind(component="history")
    server = HistoryServer(config, log=log)
    port = server.start(where)
    shown = config.address
    if port and config.address.rpartition(":")[2] == "0":
        shown = f"{config.address.rpartition(':')[0]}:{port}"
    summary = server.archive.summary()
    log.info("history listening", address=shown, archive=config.archive, files=summary.files,
             flows=summary.flows, span=_span(summary), tls=config.tls is not None)
    print(f"listening on {shown}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.stop()
    return 0
