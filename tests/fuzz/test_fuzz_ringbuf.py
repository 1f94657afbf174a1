"""Fuzzing the BPF ring-buffer reader with records of impossible lengths, in fake ring memory.

``MmapRing`` maps a ring the way the kernel lays it out: the consumer page at
offset 0, then the producer page and the data area mapped twice. A memfd of
the same layout (the data area written twice by hand) stands in for the
kernel's map, so the real reader runs unchanged on ring contents the kernel
would never write: lengths that do not match the record size, huge lengths,
busy and discarded records in any order, producer positions that are not a
whole number of records.

Checked: ``read()`` never raises, returns only whole records the test wrote
with the right length (never a torn or misaligned one), stops at the first
busy record, skips discarded ones, counts malformed lengths, and never moves
the consumer position backwards. ``committed_prefix`` (the batch fast path)
is checked against a plain loop on random length words.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowship.agent.events import FLOW_EVENT_DTYPE
from flowship.agent.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER_SIZE, MmapRing, committed_prefix

PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE  # ring data size: a power-of-two multiple of the page size
ITEM = FLOW_EVENT_DTYPE.itemsize
STRIDE = HEADER_SIZE + ((ITEM + 7) & ~7)
FUZZ = settings(max_examples=400, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])

RECORD = st.one_of(
    st.just(("valid", ITEM)), st.just(("valid", ITEM)), st.just(("valid", ITEM)),
    st.just(("discard", ITEM)), st.just(("busy", ITEM)),
    st.tuples(st.just("length"), st.integers(0, 2 * ITEM)),  # a wrong but plausible length
    st.tuples(st.just("length"), st.integers(0, (1 << 30) - 1)),  # anything up to 1 GiB
    st.tuples(st.just("raw"), st.integers(0, 2**32 - 1)),  # any header word, flags included
)


class FakeRing:
    """A memfd laid out like a BPF ring buffer map; the data area is mirrored as the kernel maps it."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("fake-ringbuf")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)

    def write(self, pos: int, data: bytes) -> None:
        for i in range(0, len(data)):
            off = (pos + i) & (SIZE - 1)
            os.pwrite(self.fd, data[i:i + 1], 2 * PAGE + off)
            os.pwrite(self.fd, data[i:i + 1], 2 * PAGE + SIZE + off)

    def set_positions(self, consumer: int, producer: int) -> None:
        os.pwrite(self.fd, struct.pack("<Q", consumer), 0)
        os.pwrite(self.fd, struct.pack("<Q", producer), PAGE)

    def close(self) -> None:
        os.close(self.fd)


def payload(n: int) -> bytes:
    """Record n's bytes: distinct per record, and never a plausible header (the busy bit is set)."""
    return bytes([0x80 | (n & 0x7F)]) * ITEM


@FUZZ
@given(records=st.lists(RECORD, max_size=SIZE // STRIDE), start=st.integers(0, 2**40).map(lambda x: x * 8),
       producer=st.one_of(st.none(), st.integers(-64, 64)))
def test_reader_survives_any_ring_contents(records, start, producer, tried):
    tried["ringbuf: fake ring contents"] += 1
    ring = FakeRing()
    try:
        stream = bytearray()
        expected: list[bytes] = []  # whole valid records before the first busy one
        malformed = discarded = 0
        stopped = misaligned = False
        for n, (kind, value) in enumerate(records):
            if kind == "raw":
                word = value
            else:
                word = value | (BUSY_BIT if kind == "busy" else 0) | (DISCARD_BIT if kind == "discard" else 0)
            body = payload(n)
            stream += struct.pack("<II", word, 0) + body + bytes((-ITEM) % 8)
            if stopped:
                continue
            length = word & ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
            if word & BUSY_BIT:
                stopped = True
            elif word & DISCARD_BIT:
                discarded += 1
                misaligned = misaligned or length != ITEM
            elif length == ITEM:
                expected.append(body)
            else:
                malformed += 0 if misaligned else 1  # reached while the walk is still aligned
                misaligned = True  # past a bad length the walk is no longer aligned with what was written
        ring.write(start, bytes(stream))
        end = start + len(stream) if producer is None else max(0, start + len(stream) + producer)
        ring.set_positions(start, end)
        reader = MmapRing(ring.fd, SIZE, FLOW_EVENT_DTYPE)
        try:
            out = reader.read()
            consumer = int(reader._cons[0])
            assert out.dtype == FLOW_EVENT_DTYPE
            got = [bytes(r) for r in out.view(np.uint8).reshape(len(out), ITEM)] if len(out) else []
            written = {payload(n) for n in range(len(records))}
            assert all(g in written for g in got), "a record that was never written (torn or misaligned)"
            assert consumer >= start, "the consumer position moved backwards"
            if not misaligned and producer is None:
                # Lengths all plausible: exactly the committed valid records, in order.
                assert got == expected
                assert reader.discarded == discarded and reader.malformed == 0
            if producer is None and not misaligned:
                assert consumer <= end
            if producer is None and malformed:
                assert reader.malformed >= 1, "a record of the wrong length was not counted"
            reader.read()  # a second read after any of this must not raise either
        finally:
            reader.close()
    finally:
        ring.close()


@FUZZ
@given(lens=st.lists(st.one_of(st.just(ITEM), st.just(ITEM | DISCARD_BIT), st.just(ITEM | BUSY_BIT),
                               st.integers(0, 2**32 - 1)), max_size=64))
def test_committed_prefix_matches_a_plain_loop(lens, tried):
    tried["ringbuf: committed_prefix length words"] += 1
    n, keep = committed_prefix(np.array(lens, dtype=np.uint32), ITEM)
    first_busy = next((i for i, w in enumerate(lens) if w & BUSY_BIT), len(lens))
    prefix = lens[:first_busy]
    if any((w & ~(BUSY_BIT | DISCARD_BIT)) != ITEM for w in prefix):
        assert n == -1 and keep is None
        return
    assert n == first_busy
    discard = [bool(w & DISCARD_BIT) for w in prefix]
    if any(discard):
        assert keep is not None and keep.tolist() == [not d for d in discard]
    else:
        assert keep is None
