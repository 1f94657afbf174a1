"""``file`` source: Hubble JSON-lines files (plain or gzip), read once or tailed.

Reads what Hubble's file exporter and ``hubble observe -o jsonpb`` write.
With ``follow: false`` every file is read to its end, then the run finishes;
with ``follow: true`` the files are tailed like ``tail -F``: growth is picked
up, and rotation is followed.

A file is known by its identity, not its name: (device, inode) while it is
open, and a fingerprint of its content (SHA-256 of its first line, at most
1 KiB, of the decompressed content), as log shippers do, because an inode
number is reused once a file is deleted. Hubble's exporter (lumberjack)
rotates by renaming ``events.log`` to ``events-<time>.log`` (and may gzip
it to ``.log.gz``) and starting a new ``events.log``; with
``paths: [events.log, events-*.log]`` the renamed file is the same open file
under a new name, and a gzip'd copy has the same fingerprint, so neither is
read again. A file whose first line is not complete yet is left for a later
poll: until then it has no fingerprint.

Positions (fingerprint, path, device, inode, byte offset, line) are
checkpointed under the data dir, keyed by fingerprint, once every sink has
accepted the flows before them, so a restarted run resumes where delivery
stopped, under whatever name the file has by then. For gzip files the offset
counts decompressed bytes (so a plain file's position carries over to its
gzip'd copy); resuming re-reads and skips up to it.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from flowship.components import Context, Emit, Source
from flowship.config import ByteSize, Duration
from flowship.pipeline.checkpoint import CheckpointStore, OrderedAcks
from flowship.sources.lines import BOM, BatchAccumulator, LineDecoder, LineStats, opens_document, split_complete


@dataclass
class FileSourceConfig:
    paths: list[str] = field(default_factory=list)  # files or glob patterns
    follow: bool = False  # tail the files instead of reading them once
    checkpoint: bool = True  # resume from the last delivered position on restart
    batch_rows: int = 65536  # rows per emitted batch (fewer when input pauses)
    read_size: ByteSize = ByteSize(4 * 1024 * 1024)
    poll_interval: Duration = Duration(0.25)  # follow: how often to look for growth
    flush_interval: Duration = Duration(1.0)  # follow: emit a partial batch after this long

    def validate(self) -> list[str]:
        problems = []
        if not self.paths:
            problems.append("paths: at least one file or glob pattern is needed")
        if isinstance(self.batch_rows, int) and self.batch_rows < 1:
            problems.append(f"batch_rows: expected an integer >= 1, got {self.batch_rows}")
        return problems


FINGERPRINT_BYTES = 1024  # the first line, or this many bytes of a longer one
FORGET_AFTER = 3600.0  # follow: checkpoints of files no pattern has matched for this long are dropped


@dataclass(frozen=True)
class FilePosition:
    path: str
    dev: int
    inode: int
    offset: int
    line: int
    fingerprint: str = ""


def fingerprint_head(head: bytes, complete_only: bool) -> str | None:
    """Fingerprint of a file from its first (decompressed) bytes; None if not decidable yet.

    The first line (with its newline) or, for a longer line, the first
    ``FINGERPRINT_BYTES``. A file still shorter than that without a newline
    has no stable fingerprint yet (``complete_only``); a finite read takes
    what is there.
    """
    head = head[:FINGERPRINT_BYTES]
    cut = head.find(b"\n")
    if cut >= 0 and opens_document(head[:cut].removeprefix(BOM)):
        cut = -1  # "[" or "{" opens every pretty-printed file alike: take the first KiB instead
    if cut >= 0:
        head = head[:cut + 1]
    elif len(head) < FINGERPRINT_BYTES and (complete_only or not head):
        return None
    return hashlib.sha256(head).hexdigest()[:32]


def _read_head(raw: BinaryIO, is_gzip: bool) -> bytes:
    """The first bytes of the content, decompressed; what a cut-short gzip yields so far."""
    raw.seek(0)
    if not is_gzip:
        return raw.read(FINGERPRINT_BYTES)
    out = b""
    stream = gzip.GzipFile(fileobj=raw)
    try:
        while len(out) < FINGERPRINT_BYTES:
            piece = stream.read1(FINGERPRINT_BYTES - len(out))
            if not piece:
                break
            out += piece
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        pass
    return out


class _OpenFile:
    """One input file being read: handle, identity (device, inode, fingerprint), offset and line count."""

    def __init__(self, path: str, ctx: Context, stats: LineStats) -> None:
        self.path = path
        self.raw: BinaryIO = open(path, "rb")
        try:
            st = os.fstat(self.raw.fileno())
            self.dev, self.inode = st.st_dev, st.st_ino
            self.gzip = self.raw.read(2) == b"\x1f\x8b"
            self.head = _read_head(self.raw, self.gzip)
            self.raw.seek(0)
        except BaseException:
            self.raw.close()
            raise
        self.fingerprint = ""
        self.fh: BinaryIO = gzip.GzipFile(fileobj=self.raw) if self.gzip else self.raw
        self.offset = 0  # bytes handed to the decoder (start of ``pending``)
        self.read_total = 0  # bytes read from the (decompressed) stream
        self.pending = b""
        self.decoder = LineDecoder(ctx, path, stats)

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.inode

    def resume(self, start: dict | None) -> None:
        """Continue from a checkpointed (or already read) position of the same content."""
        if start:
            self._skip_to(int(start.get("offset", 0)), int(start.get("line", 0)))

    def _skip_to(self, offset: int, line: int) -> None:
        if self.gzip:
            remaining = offset
            while remaining > 0:
                chunk = self.fh.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
        else:
            size = os.fstat(self.raw.fileno()).st_size
            if size < offset:
                return  # truncated since the checkpoint: start over
            self.fh.seek(offset)
        self.offset = self.read_total = offset
        self.decoder.line = line

    def position(self) -> FilePosition:
        return FilePosition(self.path, self.dev, self.inode, self.offset, self.decoder.line, self.fingerprint)

    def shrunk(self) -> bool:
        """True when the file is now shorter than what was read: truncated (copytruncate), new content."""
        return not self.gzip and os.fstat(self.raw.fileno()).st_size < self.offset

    def close(self) -> None:
        self.fh.close()
        if self.fh is not self.raw:
            self.raw.close()


class FileSource(Source):
    """Reads (or tails) Hubble JSON-lines files."""

    config: FileSourceConfig

    def __init__(self, config: FileSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.stats = LineStats()
        self.files_read = 0
        self.store = CheckpointStore(ctx.data_dir, ctx.name) if config.checkpoint else None
        saved = self.store.load() if self.store else {}
        # Checkpoints by fingerprint; a checkpoint written before fingerprints (by path, with
        # device and inode) is kept under "by_path" until its file is seen again.
        if saved.get("version") == 2:
            self._state: dict[str, Any] = dict(saved.get("files", {}))
            self._by_path: dict[str, Any] = dict(saved.get("by_path", {}))
        else:
            self._state, self._by_path = {}, dict(saved.get("files", {}))
        self._state_lock = threading.Lock()
        self._read_upto: dict[str, dict] = {}  # fingerprint -> position read so far by this process
        self._last_seen: dict[str, float] = dict.fromkeys(self._state, time.monotonic())
        self._fp_cache: dict[tuple[int, int], tuple[int, int, str | None]] = {}
        self.rotations = 0
        self._positions: dict[str, FilePosition] = {}  # fingerprint -> read position (source thread)
        self.acks = OrderedAcks(self._advance)

    # -- checkpoints ------------------------------------------------------------------------
    def _advance(self, positions: tuple[FilePosition, ...]) -> None:
        """Persist a snapshot: the read position of every file up to a delivered batch."""
        if self.store is None:
            return
        now = time.monotonic()
        with self._state_lock:
            for position in positions:
                self._state[position.fingerprint] = {"path": position.path, "dev": position.dev,
                                                     "inode": position.inode, "offset": position.offset,
                                                     "line": position.line}
                for path, entry in list(self._by_path.items()):
                    if (entry.get("dev"), entry.get("inode")) == (position.dev, position.inode):
                        del self._by_path[path]  # re-keyed by fingerprint now
            stale = [fp for fp in self._state if now - self._last_seen.get(fp, 0.0) > FORGET_AFTER] \
                if self.config.follow else []  # a finite run sees each file once: it forgets nothing
            for fp in stale:
                # No pattern has matched this content for an hour: rotated away and deleted.
                del self._state[fp]
                self._last_seen.pop(fp, None)
            state = {"version": 2, "files": dict(self._state), "by_path": dict(self._by_path)}
        self.store.save(state)

    def _start_for(self, f: _OpenFile) -> dict | None:
        """Where to continue a file: what this process read of the same content, else its checkpoint."""
        with self._state_lock:
            read = self._read_upto.get(f.fingerprint)
            saved = self._state.get(f.fingerprint)
            legacy = next((e for e in self._by_path.values() if (e.get("dev"), e.get("inode")) == f.key), None)
        if legacy:
            saved = legacy if saved is None or int(legacy.get("offset", 0)) > int(saved.get("offset", 0)) else saved
        candidates = [c for c in (read, saved) if c]
        return max(candidates, key=lambda c: int(c.get("offset", 0))) if candidates else None

    def _remember(self, f: _OpenFile) -> None:
        """Record how far this process read a file, for a copy of it under another inode (gzip)."""
        if f.fingerprint:
            self._read_upto[f.fingerprint] = {"offset": f.offset, "line": f.decoder.line}

    def _identify(self, path: str, complete_only: bool) -> _OpenFile | None:
        """Open a file and fingerprint it; None if it vanished or has no fingerprint yet."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        cached = self._fp_cache.get((st.st_dev, st.st_ino))
        if complete_only and cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns) and cached[2] is None:
            return None  # unchanged since the last poll and still without a complete first line
        try:
            f = _OpenFile(path, self.ctx, self.stats)
        except FileNotFoundError:
            return None
        fp = fingerprint_head(f.head, complete_only)
        self._fp_cache[f.key] = (st.st_size, st.st_mtime_ns, fp)
        if fp is None:
            f.close()
            return None
        f.fingerprint = fp
        self._seen(fp)
        return f

    def _seen(self, fingerprint: str) -> None:
        with self._state_lock:  # _advance prunes by it from a sink's thread
            self._last_seen[fingerprint] = time.monotonic()

    # -- reading ----------------------------------------------------------------------------
    def _expand(self) -> list[str]:
        found: list[str] = []
        for pattern in self.config.paths:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches and not glob.has_magic(pattern) and not self.config.follow:
                raise FileNotFoundError(f"{pattern}: no such file")
            if not glob.has_magic(pattern) and os.path.isdir(os.path.expanduser(pattern)):
                raise IsADirectoryError(f"{pattern}: is a directory; paths: takes files or glob patterns "
                                        f"(for example {os.path.join(pattern, '*.log')})")
            for m in matches:
                if m not in found and os.path.isfile(m):
                    found.append(m)
        return found

    def _read_some(self, f: _OpenFile) -> tuple[bytes, bool]:
        """(complete lines read, at_eof)."""
        data, error = self._read_raw(f)
        if data:
            f.read_total += len(data)
            lines, f.pending = split_complete(f.pending + data)
            f.offset = f.read_total - len(f.pending)
        else:
            lines = b""
        if error is not None:
            # A gzip file cut short (a copy in progress, a crash): keep every complete line.
            f.decoder.reject(f.decoder.line + lines.count(b"\n") + 1,
                             f"truncated or corrupt gzip stream after {f.read_total} bytes: {error}")
            f.pending = b""  # the partial line before the cut is not trustworthy
            f.offset = f.read_total
            return lines, True
        return lines, not data

    def _read_raw(self, f: _OpenFile) -> tuple[bytes, Exception | None]:
        """Up to read_size bytes; for gzip, in pieces so a corrupt tail keeps the good head."""
        if not f.gzip:
            return f.fh.read(self.config.read_size), None
        pieces: list[bytes] = []
        total = 0
        while total < self.config.read_size:
            try:
                piece = f.fh.read1(256 * 1024)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
                return b"".join(pieces), exc
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
        return b"".join(pieces), None

    @staticmethod
    def _final_line(f: _OpenFile) -> bytes:
        """The last line of a file that does not end with a newline."""
        rest, f.pending = f.pending, b""
        f.offset = f.read_total
        return rest + b"\n" if rest.strip() else b""

    def _emit(self, emit: Emit, acc: BatchAccumulator) -> None:
        batch, position = acc.take()
        if position is None:
            return
        if batch is None:
            from flowship.model.schema import empty_flows  # Arrow: once rows flow, not when validating

            batch = empty_flows()
        receipt = self.acks.issue(position, batch.num_rows)
        emit(batch, receipt)

    def _consume(self, f: _OpenFile, emit: Emit, acc: BatchAccumulator, stop: threading.Event,
                 final: bool) -> bool:
        """Read what is there now; True if the file is at its end."""
        while not stop.is_set():
            lines, eof = self._read_some(f)
            if eof and final:
                lines += self._final_line(f)
            batches = [f.decoder.decode(lines)] if lines else []
            if eof and final and f.decoder.in_document:
                batches.append(f.decoder.finish())  # JSON documents are decoded whole, at the end
            if batches and not f.decoder.in_document:
                # A batch can hold lines of several files, and the acknowledgements of several
                # batches can complete at once (only the newest is reported): so each batch carries
                # the position of every file read so far, not only of the last one. A document
                # being collected has no position to resume from until it is decoded.
                self._positions[f.fingerprint] = f.position()
                for batch in batches:
                    acc.add(batch, tuple(self._positions.values()))
                if acc.full:
                    self._emit(emit, acc)
            if eof:
                return True
        return False

    def run(self, emit: Emit, stop: threading.Event) -> None:
        acc = BatchAccumulator(self.config.batch_rows)
        if not self.config.follow:
            seen: set[tuple[int, int]] = set()
            for path in self._expand():
                if stop.is_set():
                    break
                f = self._identify(path, complete_only=False)
                if f is None:
                    self.files_read += 1  # empty: nothing to read
                    continue
                try:
                    if f.key in seen:
                        continue  # the same file under a second name
                    seen.add(f.key)
                    f.resume(self._start_for(f))
                    self._consume(f, emit, acc, stop, final=True)
                    self._remember(f)
                    self.files_read += 1
                finally:
                    f.close()
                self._emit(emit, acc)
            return
        self._follow(emit, stop, acc)

    def _discover(self, open_files: dict[tuple[int, int], _OpenFile]) -> set[tuple[int, int]]:
        """Open files the patterns match that are not open yet; return every matched (device, inode).

        A renamed file (rotation) is recognised by its (device, inode) and keeps being read
        under its new name; a new inode with the content of one being read or read
        already (a gzip'd copy) is recognised by its fingerprint and continues from there.
        """
        reachable: set[tuple[int, int]] = set()
        reading = {f.fingerprint for f in open_files.values()}
        with self._state_lock:
            forgotten = [fp for fp in self._positions if fp not in self._last_seen]
        for fp in forgotten:
            del self._positions[fp]
        for path in self._expand():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in reachable:
                continue
            f = open_files.get(key)
            if f is not None:
                reachable.add(key)
                self._seen(f.fingerprint)
                if f.path != path:
                    self.rotations += 1
                    self.ctx.log.info("rotated file followed under its new name", old=f.path, new=path,
                                      offset=f.offset)
                    f.path = f.decoder.name = path
                continue
            cached = self._fp_cache.get(key)
            if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns) and cached[2] in reading:
                reachable.add(key)  # an unchanged copy of a file being read: no need to open it again
                continue
            f = self._identify(path, complete_only=True)
            if f is None:
                continue
            reachable.add(f.key)
            if f.fingerprint in reading:
                f.close()  # a copy of a file being read (compressed while still open): read it once
                continue
            start = self._start_for(f)
            f.resume(start)
            if start:
                self.ctx.log.info("continuing a known file", path=path, offset=f.offset, line=f.decoder.line)
            open_files[f.key] = f
            reading.add(f.fingerprint)
            self.files_read += 1
        return reachable

    def _follow(self, emit: Emit, stop: threading.Event, acc: BatchAccumulator) -> None:
        open_files: dict[tuple[int, int], _OpenFile] = {}
        last_flush = time.monotonic()
        try:
            while not stop.is_set():
                reachable = self._discover(open_files)
                for key, f in list(open_files.items()):
                    self._consume(f, emit, acc, stop, final=False)
                    self._remember(f)
                    if key not in reachable or f.shrunk():
                        # Deleted, renamed out of the patterns, or truncated: finish what the handle
                        # still holds (a last partial line included), then let it go.
                        self._consume(f, emit, acc, stop, final=True)
                        if f.shrunk():
                            self._read_upto.pop(f.fingerprint, None)  # new content from the start
                        else:
                            self._remember(f)
                        f.close()
                        del open_files[key]
                        self._fp_cache.pop(key, None)
                if acc.rows and (acc.full or time.monotonic() - last_flush >= self.config.flush_interval):
                    self._emit(emit, acc)
                    last_flush = time.monotonic()
                elif acc.position is not None and not acc.rows:
                    self._emit(emit, acc)
                stop.wait(self.config.poll_interval)
            self._emit(emit, acc)
        finally:
            for f in open_files.values():
                f.close()

    def summary(self) -> dict[str, Any]:
        return {"files": self.files_read, "rotations": self.rotations, "lines": self.stats.lines,
                "flows": self.stats.flows,
                "rejected": self.stats.rejected, "rejected_by_reason": dict(self.stats.reasons),
                "lost_events": self.stats.lost_events}
