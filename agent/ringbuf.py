"""BPF ring-buffer readers that hand out numpy structured arrays, one array per read.

MmapRing (the default) maps the ring directly: the consumer page read-write at offset 0, the
producer page plus the data area (mapped twice by the kernel, so a wrapped record is contiguous)
read-only at offset one page. When every record has the same size, the region between the consumer
and producer positions is a regular array of (8-byte header + record), so one np.frombuffer view,
a mask over the headers and one copy decode a whole batch; the consumer position is published once
per batch. Memory ordering: x86-64 keeps loads in order and stores in order, which is all the
protocol needs from user space (the producer position is read before the records, the consumer
position written after them). Other architectures would need explicit barriers.

LibbpfRing uses libbpf's ring_buffer__new/consume with a Python callback per record; it exists as
the reference implementation and for bench/bench_ringbuf.py, which shows why it is not the default.
"""

from __future__ import annotations

import ctypes
import mmap
import select
import struct
from typing import Protocol

import numpy as np

from flowship.agent import loader

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8


def _round8(n: int) -> int:
    return (n + 7) & ~7


def committed_prefix(lens: np.ndarray, itemsize: int) -> tuple[int, np.ndarray | None]:
    """From the length words of consecutive records: how many may be consumed (those before the
    first BUSY one) and which of them to keep (None: all; DISCARD records are skipped). Returns
    n = -1 when a consumable record's length is not itemsize (the region is not a regular array)."""
    busy = (lens & BUSY_BIT) != 0
    n = int(np.argmax(busy)) if busy.any() else len(lens)
    lens = lens[:n]
    if np.any((lens & np.uint32(~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF)) != itemsize):
        return -1, None
    discard = (lens & DISCARD_BIT) != 0
    return n, (~discard if discard.any() else None)


class RingReader(Protocol):
    """What capture.py needs from a ring reader."""

    dtype: np.dtype
    discarded: int
    malformed: int

    def fileno(self) -> int: ...

    def read(self) -> np.ndarray: ...

    def close(self) -> None: ...


class MmapRing:
    """Direct-mmap reader of a ring whose records all have dtype's size."""

    def __init__(self, map_fd: int, size: int, dtype: np.dtype) -> None:
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring size {size} is not a power-of-two multiple of the page size")
        page = mmap.PAGESIZE
        self._fd = map_fd
        self.dtype = dtype
        self.size = size
        self._mask = size - 1
        self._stride = HEADER_SIZE + _round8(dtype.itemsize)
        self._cons_mm = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_mm = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons = np.frombuffer(self._cons_mm, dtype=np.uint64, count=1)
        self._prod = np.frombuffer(self._prod_mm, dtype=np.uint64, count=1)
        self._data_off = page
        self._rec_dtype = np.dtype(
            {
                "names": ["len", "pg_off", "rec"],
                "formats": ["<u4", "<u4", dtype],
                "offsets": [0, 4, HEADER_SIZE],
                "itemsize": self._stride,
            }
        )
        self.malformed = 0  # records whose length did not match dtype (skipped)
        self.discarded = 0  # records the kernel reserved and then discarded (skipped)

    def fileno(self) -> int:
        """The ring map fd (pollable: readable when records are waiting)."""
        return self._fd

    def pending_bytes(self) -> int:
        """Bytes between consumer and producer positions."""
        return int(self._prod[0]) - int(self._cons[0])

    def read(self, max_records: int | None = None) -> np.ndarray:
        """All committed records from the consumer position on, as a new array; advances the consumer."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        avail = prod - cons
        if avail <= 0:
            return np.empty(0, dtype=self.dtype)
        if avail % self._stride:
            return self._read_walk(cons, prod, max_records)
        n = avail // self._stride
        if max_records is not None:
            n = min(n, max_records)
        recs = np.frombuffer(self._prod_mm, dtype=self._rec_dtype, count=n, offset=self._data_off + (cons & self._mask))
        n, keep = committed_prefix(recs["len"], self.dtype.itemsize)
        if n < 0:
            return self._read_walk(cons, prod, max_records)
        if n == 0:
            return np.empty(0, dtype=self.dtype)
        recs = recs[:n]
        if keep is None:
            out = recs["rec"].copy()
        else:
            out = recs["rec"][keep]
            self.discarded += n - len(out)
        self._cons[0] = cons + n * self._stride
        return out

    def _read_walk(self, cons: int, prod: int, max_records: int | None) -> np.ndarray:
        """Record-by-record walk, for a region that is not a regular array (never expected)."""
        chunks: list[bytes] = []
        pos = cons
        size = self.dtype.itemsize
        while pos < prod and (max_records is None or len(chunks) < max_records):
            off = self._data_off + (pos & self._mask)
            (length,) = struct.unpack_from("<I", self._prod_mm, off)
            if length & BUSY_BIT:
                break
            rec_len = length & ~(BUSY_BIT | DISCARD_BIT)
            if length & DISCARD_BIT:
                self.discarded += 1
            else:
                if rec_len == size:
                    chunks.append(self._prod_mm[off + HEADER_SIZE : off + HEADER_SIZE + size])
                else:
                    self.malformed += 1
            pos += HEADER_SIZE + _round8(rec_len)
        self._cons[0] = pos
        return np.frombuffer(b"".join(chunks), dtype=self.dtype).copy()

    def close(self) -> None:
        """Unmap (arrays returned by read() are copies and stay valid)."""
        del self._cons, self._prod
        self._cons_mm.close()
        self._prod_mm.close()


class LibbpfRing:
    """Reader through libbpf's ring_buffer API: one Python callback per record."""

    def __init__(self, map_fd: int, size: int, dtype: np.dtype) -> None:
        self._fd = map_fd
        self.dtype = dtype
        self.size = size
        self._chunks: list[bytes] = []
        self._callback = loader.RING_SAMPLE_FN(self._on_sample)
        self._lib = loader.libbpf()
        self._rb = self._lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not self._rb:
            raise loader.BpfError(ctypes.get_errno(), "ring_buffer__new failed")
        self._item = dtype.itemsize
        self.malformed = 0
        self.discarded = 0  # libbpf skips discarded records without telling

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        if size == self._item:
            self._chunks.append(ctypes.string_at(data, size))
        else:
            self.malformed += 1
        return 0

    def fileno(self) -> int:
        """The ring map fd."""
        return self._fd

    def read(self) -> np.ndarray:
        """Consume everything committed; records come back as one array."""
        ret = self._lib.ring_buffer__consume(self._rb)
        if ret < 0:
            raise loader.BpfError(-ret, "ring_buffer__consume failed")
        if not self._chunks:
            return np.empty(0, dtype=self.dtype)
        buf = b"".join(self._chunks)
        self._chunks.clear()
        return np.frombuffer(buf, dtype=self.dtype)

    def close(self) -> None:
        """Free libbpf's ring_buffer."""
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None


READERS: dict[str, type[MmapRing] | type[LibbpfRing]] = {"mmap": MmapRing, "libbpf": LibbpfRing}


class RingWaiter:
    """epoll over several ring fds: wait until any has records (the kernel wakes it on submit)."""

    def __init__(self, rings: list[RingReader]) -> None:
        self._ep = select.epoll()
        for r in rings:
            self._ep.register(r.fileno(), select.EPOLLIN)

    def wait(self, timeout: float | None) -> bool:
        """True when a ring became readable before timeout (seconds; None waits forever)."""
        return bool(self._ep.poll(-1 if timeout is None else max(timeout, 0.0)))

    def close(self) -> None:
        """Release the epoll fd."""
        self._ep.close()
