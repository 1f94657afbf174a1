"""``file`` source: Hubble JSON-lines files (plain or gzip), read once or tailed.

Reads what Hubble's file exporter and ``hubble observe -o jsonpb`` write.
With ``follow: false`` every file is read to its end, then the run finishes;
with ``follow: true`` the files are tailed like ``tail -F``: growth is picked
up, and when the exporter rotates ``events.log`` (renames it and starts a new
one) the old file is read to its end before the new one is opened.

Positions (device, inode, byte offset, line) are checkpointed under the data
dir once every sink has accepted the flows before them, so a restarted run
resumes where delivery stopped. For gzip files the offset counts
decompressed bytes; resuming re-reads and skips up to it.
"""

from __future__ import annotations

import glob
import gzip
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from exporter.components import Context, Emit, Source
from exporter.config import ByteSize, Duration
from exporter.model.schema import empty_flows
from exporter.pipeline.checkpoint import CheckpointStore, OrderedAcks
from exporter.sources.lines import BatchAccumulator, LineDecoder, LineStats, split_complete


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


@dataclass(frozen=True)
class FilePosition:
    path: str
    dev: int
    inode: int
    offset: int
    line: int


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class _OpenFile:
    """One input file being read: handle, identity, offset and line count."""

    def __init__(self, path: str, start: dict | None, ctx: Context, stats: LineStats) -> None:
        self.path = path
        self.gzip = _is_gzip(path)
        self.raw: BinaryIO = open(path, "rb")
        st = os.fstat(self.raw.fileno())
        self.dev, self.inode = st.st_dev, st.st_ino
        self.fh: BinaryIO = gzip.GzipFile(fileobj=self.raw) if self.gzip else self.raw
        self.offset = 0  # bytes handed to the decoder (start of ``pending``)
        self.read_total = 0  # bytes read from the (decompressed) stream
        self.pending = b""
        self.decoder = LineDecoder(ctx, path, stats)
        if start and start.get("inode") == self.inode and start.get("dev") == self.dev:
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
        return FilePosition(self.path, self.dev, self.inode, self.offset, self.decoder.line)

    def replaced(self) -> bool:
        """True when the path now names another file (rotation) or the file shrank."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        if (st.st_dev, st.st_ino) != (self.dev, self.inode):
            return True
        return not self.gzip and st.st_size < self.offset

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
        self._state: dict[str, Any] = self.store.load().get("files", {}) if self.store else {}
        self._state_lock = threading.Lock()
        self.acks = OrderedAcks(self._advance)

    # -- checkpoints ------------------------------------------------------------------------
    def _advance(self, position: FilePosition) -> None:
        if self.store is None:
            return
        with self._state_lock:
            self._state[position.path] = {"dev": position.dev, "inode": position.inode,
                                          "offset": position.offset, "line": position.line}
            state = {"files": dict(self._state)}
        self.store.save(state)

    # -- reading ----------------------------------------------------------------------------
    def _expand(self) -> list[str]:
        found: list[str] = []
        for pattern in self.config.paths:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches and not glob.has_magic(pattern) and not self.config.follow:
                raise FileNotFoundError(f"{pattern}: no such file")
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
            if lines:
                batch = f.decoder.decode(lines)
                acc.add(batch, f.position())
                if acc.full:
                    self._emit(emit, acc)
            if eof:
                return True
        return False

    def run(self, emit: Emit, stop: threading.Event) -> None:
        acc = BatchAccumulator(self.config.batch_rows)
        if not self.config.follow:
            for path in self._expand():
                if stop.is_set():
                    break
                f = _OpenFile(path, self._state.get(path), self.ctx, self.stats)
                try:
                    self._consume(f, emit, acc, stop, final=True)
                    self.files_read += 1
                finally:
                    f.close()
                self._emit(emit, acc)
            return
        self._follow(emit, stop, acc)

    def _follow(self, emit: Emit, stop: threading.Event, acc: BatchAccumulator) -> None:
        open_files: dict[str, _OpenFile] = {}
        last_flush = time.monotonic()
        try:
            while not stop.is_set():
                for path in self._expand():
                    if path not in open_files:
                        open_files[path] = _OpenFile(path, self._state.get(path), self.ctx, self.stats)
                        self.files_read += 1
                for path, f in list(open_files.items()):
                    self._consume(f, emit, acc, stop, final=False)
                    if f.replaced():
                        # Rotated away: finish the old file (a last partial line included).
                        self._consume(f, emit, acc, stop, final=True)
                        f.close()
                        del open_files[path]
                        with self._state_lock:
                            self._state.pop(path, None)
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
        return {"files": self.files_read, "lines": self.stats.lines, "flows": self.stats.flows,
                "rejected": self.stats.rejected, "rejected_by_reason": dict(self.stats.reasons),
                "lost_events": self.stats.lost_events}
