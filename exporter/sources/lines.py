"""Shared machinery of the line-oriented sources (file, stdin).

Turns a byte stream of Hubble JSON lines into flow batches: splits on line
boundaries (carrying a partial last line over), decodes with
:mod:`flowship.model.hubble_decode`, reports each bad line with ``name:line``
and its reason, counts lost events, and groups decoded rows into batches of
about ``batch_rows`` so that the columnar stages see large batches.

A UTF-8 byte order mark at the start of an input is skipped. An input whose
first line is not JSON on its own but opens one (``[`` or ``{`` spread over
many lines, as ``jq`` and API dumps write it) is read as JSON documents: an
array of records, or records one after another, each reported by the line it
starts on. Such documents are decoded when the input ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from flowship.components import Context

if TYPE_CHECKING:
    import pyarrow as pa

BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, as some Windows tools write it
_WHITESPACE = " \t\r\n"

MAX_REPORTED_ERRORS = 20  # per input: after that, errors are only counted


@dataclass
class LineStats:
    lines: int = 0
    flows: int = 0
    rejected: int = 0
    lost_events: int = 0
    other_events: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _reason_category(reason: str) -> str:
    """A short, bounded label for the rejected-lines metric."""
    if reason.startswith("invalid JSON"):
        return "invalid_json"
    if "timestamp" in reason or "no time" in reason:
        return "bad_time"
    if "neither a flow" in reason or "expected a JSON object" in reason:
        return "not_a_flow"
    if "truncated" in reason:
        return "truncated"
    return "bad_value"


class LineDecoder:
    """Decode complete-line chunks of one named input; keep per-input counts."""

    def __init__(self, ctx: Context, name: str, stats: LineStats) -> None:
        self.ctx = ctx
        self.name = name
        self.stats = stats
        self.line = 0  # number of the last line consumed
        self._reported = 0
        self._sniffed = False  # the start of the input was looked at (BOM, JSON lines or documents)
        self._document: bytearray | None = None  # JSON documents held until the input ends
        self._document_line = 1  # the line the held documents start on

    @property
    def in_document(self) -> bool:
        """True while multi-line JSON documents are being collected (nothing decoded until :meth:`finish`)."""
        return self._document is not None

    def decode(self, chunk: bytes) -> pa.RecordBatch:
        """Decode complete lines; in document mode keep them for :meth:`finish`."""
        # Arrow and the decoder load with the first lines read, not with the config that names this source.
        from flowship.model.hubble_decode import decode_lines
        from flowship.model.schema import empty_flows

        if not self._sniffed:
            chunk = self._sniff(chunk)
        if self._document is not None:
            self._document += chunk
            self.line += chunk.count(b"\n") + (0 if chunk.endswith(b"\n") or not chunk else 1)
            self.stats.lines += chunk.count(b"\n")
            return empty_flows()
        result = decode_lines(chunk, first_line=self.line + 1)
        self.line += chunk.count(b"\n") + (0 if chunk.endswith(b"\n") or not chunk else 1)
        self.stats.lines += chunk.count(b"\n")
        return self._settle(result)

    def _sniff(self, chunk: bytes) -> bytes:
        """At the start of the input: drop a BOM; choose JSON lines or JSON documents by the first line."""
        if self.line > 0:  # resumed in the middle of an input: it was JSON lines
            self._sniffed = True
            return chunk
        if chunk.startswith(BOM):
            chunk = chunk[len(BOM):]
        for raw in chunk.split(b"\n"):
            first = raw.strip()
            if not first:
                continue
            self._sniffed = True
            if opens_document(first):
                self._document = bytearray()
                self._document_line = self.line + 1
            break
        return chunk

    def finish(self) -> pa.RecordBatch:
        """At the end of the input: decode the JSON documents held (an empty batch in line mode)."""
        from flowship.model.hubble_decode import decode_lines
        from flowship.model.schema import empty_flows

        if self._document is None:
            return empty_flows()
        data, self._document = bytes(self._document), None
        records, errors = split_documents(data, self._document_line)
        if not records:
            for number, reason in errors:
                self.reject(number, reason)
            return empty_flows()
        lines = [line for line, _raw in records]
        result = decode_lines(b"\n".join(raw for _line, raw in records) + b"\n", first_line=1)
        result.errors = sorted(errors + [(lines[number - 1], reason) for number, reason in result.errors])
        return self._settle(result)

    def _settle(self, result: Any) -> pa.RecordBatch:
        for number, reason in result.errors:
            self.reject(number, reason)
        for lost in result.lost_events:
            count = int(lost.get("num_events_lost") or 0)
            self.stats.lost_events += count
            self.ctx.metrics.record_lost(self.ctx.name, str(lost.get("source")), count)
            self.ctx.log.warning("upstream lost events", input=self.name, lost_source=lost.get("source"),
                                 count=count, node=lost.get("node_name"))
        self.stats.other_events += result.other_events
        self.stats.flows += result.batch.num_rows
        return result.batch

    def reject(self, number: int, reason: str) -> None:
        category = _reason_category(reason)
        self.stats.rejected += 1
        self.stats.reasons[category] = self.stats.reasons.get(category, 0) + 1
        self.ctx.metrics.rejected(self.ctx.name, category).inc()
        if self._reported < MAX_REPORTED_ERRORS:
            where = f"{self.name}:{number}" if number > 0 else self.name
            self.ctx.log.warning("rejected input line", where=where, reason=reason[:300])
            self._reported += 1
            if self._reported == MAX_REPORTED_ERRORS:
                self.ctx.log.warning("more rejected lines are counted but not logged", input=self.name)


class BatchAccumulator:
    """Collects decoded batches until ``batch_rows``, remembering the last position."""

    def __init__(self, batch_rows: int) -> None:
        self.batch_rows = batch_rows
        self._batches: list[pa.RecordBatch] = []
        self._rows = 0
        self.position: Any = None

    def add(self, batch: pa.RecordBatch, position: Any) -> None:
        if batch.num_rows:
            self._batches.append(batch)
            self._rows += batch.num_rows
        self.position = position

    @property
    def full(self) -> bool:
        return self._rows >= self.batch_rows

    @property
    def rows(self) -> int:
        return self._rows

    def take(self) -> tuple[pa.RecordBatch | None, Any]:
        """(combined batch or None if only positions advanced, position) and reset."""
        position, batches = self.position, self._batches
        self._batches, self._rows, self.position = [], 0, None
        if not batches:
            return None, position
        if len(batches) == 1:
            return batches[0], position
        import pyarrow as pa

        return pa.Table.from_batches(batches).combine_chunks().to_batches()[0], position


def opens_document(first_line: bytes) -> bool:
    """True for the first line of a JSON document spread over lines (``[``, ``{``, ``[{``, ``{"flow": {``).

    A line that is JSON on its own is a JSON line; so is a broken one (``{"flow": {"ti``), which is
    rejected by its line number as before, so that a bad first line does not hold a tailed file back.
    """
    line = first_line.strip()
    if line[:1] not in (b"[", b"{") or line[-1:] not in (b"[", b"{", b","):
        return False
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return True
    return False


def split_documents(data: bytes, first_line: int = 1) -> tuple[list[tuple[int, bytes]], list[tuple[int, str]]]:
    """JSON documents → ([(line, one-line JSON record)], [(line, reason)]).

    ``data`` holds JSON values one after another, each an object (a record) or an array of them,
    spread over any number of lines. Each record is numbered by the line it starts on. After a
    syntax error, reading continues at the next line that opens an object or an array with the
    broken record's indentation, so one bad record costs that record, as a bad line does in JSON lines.
    """
    text = data.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    records: list[tuple[int, bytes]] = []
    errors: list[tuple[int, str]] = []
    counted, line = 0, first_line  # line is the number of the line holding text[counted]

    def line_at(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    def resync(record: int, error: int) -> int:
        """Where the record after a broken one starts: the next line opening ``{`` or ``[`` as indented as it.

        Pretty printers indent the records of an array alike and nested values deeper, so the broken
        record's own nested objects are passed over.
        """
        indent = record - (text.rfind("\n", 0, record) + 1)
        pos = error
        while True:
            cut = text.find("\n", pos)
            if cut < 0:
                return len(text)
            pos = cut + 1
            opener = skip(pos)
            if opener >= len(text):
                return opener
            if opener - pos == indent and text[opener] in "{[" and not text[pos:opener].strip():
                return opener

    pos, depth = skip(0), 0  # depth 1: inside a top-level array
    while pos < len(text):
        char = text[pos]
        if depth == 0 and char == "[":
            depth, pos = 1, skip(pos + 1)
            continue
        if depth == 1 and char == "]":
            depth, pos = 0, skip(pos + 1)
            continue
        if depth == 1 and char == ",":
            pos = skip(pos + 1)
            continue
        start = line_at(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            errors.append((line_at(exc.pos), f"invalid JSON: {exc.msg} (in the record starting on line {start})"))
            pos = resync(pos, exc.pos)
            continue
        records.append((start, orjson.dumps(value)))
        pos = skip(end)
    if depth == 1:
        errors.append((line_at(len(text)), "invalid JSON: the array is not closed (truncated input?)"))
    return records, errors


def split_complete(buffer: bytes) -> tuple[bytes, bytes]:
    """(complete lines, trailing partial line)."""
    cut = buffer.rfind(b"\n")
    if cut < 0:
        return b"", buffer
    return buffer[: cut + 1], buffer[cut + 1:]
