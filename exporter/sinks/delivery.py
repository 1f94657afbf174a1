"""Batching, retries, acknowledgements and dead letters shared by the network sinks.

A network sink turns each envelope into *records* (one per row: a bulk
action+document, a Loki entry...) with their encoded sizes and hands them to
:class:`Delivery`. Delivery cuts requests by rows, bytes and age, sends them
from a small pool of worker threads (bounded in-flight: ``submit`` blocks
when every slot is busy, which is how a slow server slows the pipeline),
retries with exponential backoff and full jitter (honouring ``Retry-After``),
splits a request the server finds too large, writes records the server
refuses for good to a dead-letter file, and acknowledges an envelope only
when every one of its rows was accepted or dead-lettered.

The sink supplies one function, ``send(records) -> SendResult``, that speaks
its protocol and classifies the answer:

* return normally — every record not listed in ``retry``/``dead`` is accepted;
* raise :class:`RetryableError` — the whole request is retried (429, 5xx,
  connection refused, timeouts);
* raise :class:`RequestTooLargeError` — the request is split in halves (413);
* raise :class:`RejectedError` — the whole request is refused for good (other 4xx).
"""

from __future__ import annotations

import email.utils
import itertools
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from flowship.components import Context, Sink
from flowship.config import ByteSize, Duration, positive_ints
from flowship.pipeline.envelope import Envelope

if TYPE_CHECKING:  # numpy is imported where records are batched: a sink's config validates without it
    import numpy as np
    import pyarrow as pa

# ---------------------------------------------------------------------------------------------
# Configuration shared by every network sink (``batch:`` and ``retry:`` sections)
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchConfig:
    """When a request is cut: whichever limit is reached first."""

    max_events: int = 10000
    max_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    timeout: Duration = Duration(1.0)

    def validate(self) -> list[str]:
        out = positive_ints(self, "max_events")
        if isinstance(self.max_bytes, int) and self.max_bytes < 1024:
            out.append(f"max_bytes: expected at least 1KiB, got {self.max_bytes}")
        if isinstance(self.timeout, float) and self.timeout <= 0:
            out.append(f"timeout: expected a positive duration, got {self.timeout}")
        return out


@dataclass
class RetryConfig:
    """How failed requests are retried and how many may be in flight."""

    initial_backoff: Duration = Duration(0.5)
    max_backoff: Duration = Duration(30.0)
    max_attempts: int = 0  # 0 = retry until delivered (or shutdown); N = dead-letter after N attempts
    max_retry_after: Duration = Duration(300.0)  # cap on a server's Retry-After
    request_timeout: Duration = Duration(30.0)
    concurrency: int = 2  # requests in flight

    def validate(self) -> list[str]:
        out = positive_ints(self, "concurrency")
        if isinstance(self.max_attempts, int) and self.max_attempts < 0:
            out.append(f"max_attempts: expected 0 (unlimited) or more, got {self.max_attempts}")
        if (isinstance(self.initial_backoff, float) and isinstance(self.max_backoff, float)
                and self.initial_backoff > self.max_backoff):
            out.append("initial_backoff: must not exceed max_backoff")
        return out


@dataclass
class DeliveryConfig:
    """The sections every sink on :class:`Delivery` has; a sink may narrow ``batch`` to its own defaults."""

    dead_letter_path: str | None = None  # default: <data_dir>/dead-letter/<sink name>.jsonl
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)


def default_dead_letter_path(ctx: Context, kind: str = "sink") -> Path:
    """``<data_dir>/dead-letter/<name>.jsonl`` for a sink, ``source-<name>.jsonl`` for a source.

    Sources and sinks have separate name spaces, so a source's file carries a prefix.
    """
    prefix = "" if kind == "sink" else f"{kind}-"
    return Path(ctx.data_dir) / "dead-letter" / f"{prefix}{ctx.name}.jsonl"


# ---------------------------------------------------------------------------------------------
# What ``send`` reports
# ---------------------------------------------------------------------------------------------


class RetryableError(Exception):
    """The whole request failed in a way worth retrying."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class RequestTooLargeError(Exception):
    """The server refused the request for its size: send it in halves."""


class RejectedError(Exception):
    """The server refused the whole request for good; ``reason`` is a short bounded label."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass
class SendResult:
    """Per-record outcome of one request. Records in neither list were accepted."""

    retry: list[int] = field(default_factory=list)  # indexes to send again
    dead: list[tuple[int, str, str]] = field(default_factory=list)  # (index, reason label, detail)
    retry_after: float | None = None
    retry_kind: str = "item"  # metric label for the retried records
    retry_reason: str = ""  # the server's words for the first retried record (logged)
    duplicates: int = 0  # accepted records the server already had (409 on a deterministic id)
    sent_bytes: int = 0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def backoff_seconds(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, initial * 2^attempt)]."""
    return rng.uniform(0.0, min(cap, initial * (2 ** min(attempt, 30))))


# ---------------------------------------------------------------------------------------------
# Dead letters
# ---------------------------------------------------------------------------------------------


class DeadLetterWriter:
    """Appends refused records as JSON lines: the record plus the server's reason.

    Each line: ``{"time", "sink", "reason", "detail", "record"}`` (``"source"``
    instead of ``"sink"`` for a source's file). Lines are flushed and fsynced
    before the envelope that held the record is acknowledged (before a source
    commits past it), so a record is either delivered or in this file. Counted
    in ``flowship_sink_dead_letter_total{sink,reason}`` or, for a source,
    ``flowship_source_dead_letter_total{source,reason}``.
    """

    def __init__(self, path: Path | str, sink: str, ctx: Context, kind: str = "sink") -> None:
        self.path = Path(path)
        self.sink = sink
        self.kind = kind
        self.ctx = ctx
        self._lock = threading.Lock()
        self._file = None
        self.count = 0
        self.by_reason: Counter[str] = Counter()

    def write(self, entries: Sequence[tuple[str, str, Any]]) -> None:
        """Write ``(reason, detail, record)`` entries and count them per reason."""
        if not entries:
            return
        from flowship.model.times import datetime_text

        now = datetime_text(datetime.now(UTC))
        lines = [orjson.dumps({"time": now, self.kind: self.sink, "reason": reason, "detail": detail,
                               "record": record}, default=_jsonable) + b"\n"
                 for reason, detail, record in entries]
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across writes
            self._file.write(b"".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.count += len(entries)
            reasons = Counter(reason for reason, _, _ in entries)
            self.by_reason.update(reasons)
        for reason, n in reasons.items():
            self._counter(reason).inc(n)
        self.ctx.log.warning("records dead-lettered", count=len(entries), path=str(self.path),
                             reasons=sorted({r for r, _, _ in entries}),
                             first_detail=str(entries[0][1])[:300])

    def _counter(self, reason: str) -> Any:
        if self.kind == "sink":
            return self.ctx.metrics.dead_letters(self.sink, reason)
        return self.ctx.metrics.counter(f"flowship_{self.kind}_dead_letter_total",
                                        f"Messages a {self.kind} rejected and wrote to its dead-letter file.",
                                        [self.kind, "reason"]).labels(self.sink, reason)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Acknowledgement tracking
# ---------------------------------------------------------------------------------------------


class PendingEnvelope:
    """Rows of one envelope still waiting for the server (or the dead-letter file)."""

    __slots__ = ("env", "remaining", "failed", "delivered", "_lock", "_on_settled")

    def __init__(self, env: Envelope, rows: int, on_settled: Callable[[PendingEnvelope], None] | None = None) -> None:
        self.env = env
        self.remaining = rows
        self.failed = 0
        self.delivered = 0
        self._lock = threading.Lock()
        self._on_settled = on_settled
        if rows == 0:
            self._finish()

    def settle(self, delivered: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.delivered += delivered
            self.failed += failed
            self.env.delivered(delivered)  # counted as they arrive, not when the whole envelope settles
            self.remaining -= delivered + failed
            if self.remaining > 0:
                return
            if self.remaining < 0:
                raise RuntimeError("more rows settled than the envelope holds")
        self._finish()

    def _finish(self) -> None:
        env = self.env
        if self.failed:
            for receipt in env.receipts:
                receipt.failed = True
        env.on_ack = None  # delivered rows were counted in settle(); failed rows are not delivered
        env.ack()
        if self._on_settled is not None:
            self._on_settled(self)


def settle_records(owners: Sequence[PendingEnvelope], indexes: Sequence[int] | None, failed: bool) -> None:
    """Settle records by index (all when ``indexes`` is None), grouped per envelope."""
    if indexes is None:
        for owner, group in itertools.groupby(owners):
            n = sum(1 for _ in group)
            owner.settle(failed=n) if failed else owner.settle(delivered=n)
        return
    for owner, n in Counter(owners[i] for i in indexes).items():
        owner.settle(failed=n) if failed else owner.settle(delivered=n)


class Outstanding:
    """Envelopes a sink took and has not settled yet, and the error that stopped it (thread-safe).

    ``add`` when an envelope is taken, ``settled`` (a :class:`PendingEnvelope` callback) when it
    is done; ``fail`` records an error no retry can mend, which ``raise_fatal`` then raises on
    the sink's thread and which ends ``wait``.
    """

    def __init__(self, message: Callable[[BaseException], str]) -> None:
        self._message = message
        self._idle = threading.Condition()
        self.count = 0
        self.fatal: BaseException | None = None

    def add(self) -> None:
        with self._idle:
            self.count += 1

    def settled(self, _owner: PendingEnvelope | None = None) -> None:
        with self._idle:
            self.count -= 1
            self._idle.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._idle:
            self.fatal = exc
            self._idle.notify_all()

    def raise_fatal(self) -> None:
        if self.fatal is not None:
            raise RuntimeError(self._message(self.fatal)) from self.fatal

    def wait(self, deadline: float | None) -> bool:
        """Until nothing is outstanding (True), a fatal error (True) or ``deadline`` (monotonic; False)."""
        with self._idle:
            while self.count and self.fatal is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
        return True


# ---------------------------------------------------------------------------------------------
# The delivery engine
# ---------------------------------------------------------------------------------------------


@dataclass
class _Request:
    records: list
    owners: list[PendingEnvelope]
    size: int
    attempt: int = 0


class Delivery:
    """Cuts records into requests and delivers them with retries; see the module doc."""

    def __init__(self, ctx: Context, batch: BatchConfig, retry: RetryConfig,
                 send: Callable[[list], SendResult], dead_letters: DeadLetterWriter,
                 describe: Callable[[Any], Any] = lambda record: record,
                 seed: int | None = None) -> None:
        self.ctx = ctx
        self.batch = batch
        self.retry = retry
        self.send = send
        self.dead_letters = dead_letters
        self.describe = describe
        self._rng = random.Random(seed)
        self._records: list = []
        self._owners: list[PendingEnvelope] = []
        self._size = 0
        self._oldest: float | None = None
        self._slots = threading.Semaphore(retry.concurrency)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._stop = threading.Event()
        self._pending = Outstanding(lambda exc: f"sink {ctx.name}: delivery failed: {exc}")
        name = ctx.name
        m = ctx.metrics
        self._ok = m.sink_batches(name, "ok")
        self._retried = m.sink_batches(name, "retry")
        self._split = m.sink_batches(name, "split")
        self._failed = m.sink_batches(name, "failed")
        self._bytes = m.sink_bytes(name)
        self._latency = m.sink_latency(name)
        self._duplicates = m.counter("flowship_sink_duplicates_total",
                                     "Rows the server already had (a retry of a delivered row).",
                                     ["sink"]).labels(name)
        self._inflight = m.gauge("flowship_sink_inflight_requests", "Requests in flight per sink.",
                                 ["sink"]).labels(name)
        self._workers = [threading.Thread(target=self._worker, name=f"{name}-send-{i}", daemon=True)
                         for i in range(retry.concurrency)]
        for w in self._workers:
            w.start()

    # -- producer side (the sink's thread) ------------------------------------------------
    def submit(self, env: Envelope, records: list, sizes: Sequence[int] | np.ndarray,
               refused: Sequence[tuple[str, str, Any]] = ()) -> None:
        """Queue an envelope's records; blocks while every request slot is busy.

        ``refused`` are ``(reason, detail, record)`` for rows of the envelope the
        sink will not send (oversize, invalid): they are dead-lettered now and
        count towards the envelope's acknowledgement.
        """
        self._pending.raise_fatal()
        self._pending.add()
        owner = PendingEnvelope(env, len(records) + len(refused), self._pending.settled)
        if refused:
            self.dead_letters.write(refused)
            owner.settle(failed=len(refused))
        n = len(records)
        if n == 0:
            return
        import numpy as np

        cumulative = np.cumsum(np.asarray(sizes, dtype=np.int64))
        max_events, max_bytes = self.batch.max_events, self.batch.max_bytes
        start = 0
        while start < n:
            if self._oldest is None:
                self._oldest = time.monotonic()
            count = len(self._records)
            base = int(cumulative[start - 1]) if start else 0
            # records [start, end) fit when their cumulative size stays within the byte budget
            fit = int(np.searchsorted(cumulative[start:], base + (max_bytes - self._size), side="right"))
            take = min(fit, max_events - count, n - start)
            if take <= 0 and count == 0:
                take = 1  # a record larger than max_bytes travels alone
            if take > 0:
                end = start + take
                self._records.extend(records[start:end])
                self._owners.extend([owner] * take)
                self._size += int(cumulative[end - 1]) - base
                start = end
            if len(self._records) >= max_events or self._size >= max_bytes or start < n:
                self._dispatch()

    def tick(self) -> None:
        """Send the partial request once its oldest record is ``batch.timeout`` old."""
        self._pending.raise_fatal()
        if self._records and self._oldest is not None and time.monotonic() - self._oldest >= self.batch.timeout:
            self._dispatch()

    def flush(self, timeout: float | None = None) -> bool:
        """Send what is buffered and wait until every envelope is settled."""
        if self._records:
            self._dispatch()
        if not self._pending.wait(None if timeout is None else time.monotonic() + timeout):
            return False
        self._pending.raise_fatal()
        return True

    def close(self) -> None:
        """Stop the workers; requests still unsent stay unacknowledged (they are read again)."""
        self._stop.set()
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=5)
        self.dead_letters.close()

    @property
    def outstanding(self) -> int:
        return self._pending.count

    def _dispatch(self) -> None:
        if not self._records:
            return
        request = _Request(self._records, self._owners, self._size)
        self._records, self._owners, self._size, self._oldest = [], [], 0, None
        while not self._slots.acquire(timeout=0.5):
            self._pending.raise_fatal()
            if self._stop.is_set():
                return
        self._inflight.inc()
        self._queue.put(request)

    # -- worker side ------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            try:
                self._deliver(request)
            except BaseException as exc:  # noqa: BLE001 - a bug in send: stop the sink loudly
                self.ctx.log.error("sink delivery crashed", error=str(exc), exc_type=type(exc).__name__)
                self._pending.fail(exc)
            finally:
                self._inflight.dec()
                self._slots.release()

    def _sleep(self, seconds: float) -> bool:
        """Wait; False when the sink is closing."""
        return not self._stop.wait(seconds)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = backoff_seconds(attempt, self.retry.initial_backoff, self.retry.max_backoff, self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry.max_retry_after))
        return delay

    def _give_up(self, request: _Request, indexes: Sequence[int] | None, reason: str, detail: str) -> None:
        chosen = range(len(request.records)) if indexes is None else indexes
        self.dead_letters.write([(reason, detail, self.describe(request.records[i])) for i in chosen])
        settle_records(request.owners, indexes, failed=True)

    def _deliver(self, first: _Request) -> None:
        stack = [first]
        max_attempts = self.retry.max_attempts
        while stack:
            request = stack.pop()
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                result = self.send(request.records)
            except RequestTooLargeError as exc:
                self._split.inc()
                if len(request.records) == 1:
                    self._failed.inc()
                    self._give_up(request, None, "request_too_large", str(exc))
                    continue
                half = len(request.records) // 2
                self.ctx.log.info("request too large, splitting", records=len(request.records))
                stack.append(_Request(request.records[half:], request.owners[half:], 0, request.attempt))
                stack.append(_Request(request.records[:half], request.owners[:half], 0, request.attempt))
                continue
            except RejectedError as exc:
                self._failed.inc()
                self._give_up(request, None, exc.reason, str(exc))
                continue
            except RetryableError as exc:
                self._retried.inc()
                self.ctx.metrics.sink_errors(self.ctx.name, exc.kind).inc()
                request.attempt += 1
                if max_attempts and request.attempt >= max_attempts:
                    self._failed.inc()
                    self._give_up(request, None, "retries_exhausted", f"{exc.kind}: {exc}")
                    continue
                delay = self._backoff(request.attempt - 1, exc.retry_after)
                self.ctx.log.warning("request failed, retrying", kind=exc.kind, error=str(exc)[:300],
                                     attempt=request.attempt, delay=round(delay, 3),
                                     records=len(request.records))
                if not self._sleep(delay):
                    return
                stack.append(request)
                continue
            finally:
                self._latency.observe(time.monotonic() - started)
            self._bytes.inc(result.sent_bytes)
            if result.duplicates:
                self._duplicates.inc(result.duplicates)
            if not result.retry and not result.dead:
                self._ok.inc()
                settle_records(request.owners, None, failed=False)
                continue
            retry = set(result.retry)
            dead_idx = [i for i, _, _ in result.dead]
            skip = retry.union(dead_idx)
            if result.dead:
                self.dead_letters.write([(reason, detail, self.describe(request.records[i]))
                                         for i, reason, detail in result.dead])
                settle_records(request.owners, dead_idx, failed=True)
            accepted = [i for i in range(len(request.records)) if i not in skip]
            if accepted:
                settle_records(request.owners, accepted, failed=False)
            if not retry:
                self._ok.inc()
                continue
            order = sorted(retry)
            again = _Request([request.records[i] for i in order], [request.owners[i] for i in order], 0,
                             request.attempt + 1)
            self._retried.inc()
            self.ctx.metrics.sink_errors(self.ctx.name, result.retry_kind).inc()
            if max_attempts and again.attempt >= max_attempts:
                self._failed.inc()
                self._give_up(again, None, "retries_exhausted", f"{result.retry_kind}: gave up after "
                                                                f"{again.attempt} attempts")
                continue
            delay = self._backoff(again.attempt - 1, result.retry_after)
            self.ctx.log.warning("records refused, retrying", kind=result.retry_kind, records=len(order),
                                 attempt=again.attempt, delay=round(delay, 3), reason=result.retry_reason)
            if not self._sleep(delay):
                return
            stack.append(again)


# ---------------------------------------------------------------------------------------------
# The shape of a network sink
# ---------------------------------------------------------------------------------------------


class DeliverySink(Sink):
    """A sink on :class:`Delivery`: it writes only what is its own, the rest is here.

    A subclass (config: a :class:`DeliveryConfig`) supplies

    * ``connect()`` — open clients, install what the server needs; returns the fields of the
      "<name> sink ready" log line; ``disconnect()`` closes them;
    * ``encode_flows(batch)`` and ``encode_aggregates(batch)`` — records, their sizes and the rows
      refused before sending (``(reason, detail, record)``, dead-lettered at once);
    * ``send(records) -> SendResult`` — one request, its answer classified (see the module doc);
    * ``describe(record)`` — a record as its dead-letter entry shows it.

    Batching, retries, acknowledgements, dead letters and the choice by ``env.kind`` happen here.
    """

    log_name: ClassVar[str] = "network"

    def __init__(self, config: Any, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.delivery: Delivery | None = None

    def connect(self) -> dict[str, Any]:
        return {}

    def disconnect(self) -> None:
        """Close what ``connect`` opened."""

    def encode_flows(self, batch: pa.RecordBatch) -> tuple[list, np.ndarray, list]:
        raise NotImplementedError

    def encode_aggregates(self, batch: pa.RecordBatch) -> tuple[list, np.ndarray, list]:
        raise NotImplementedError

    def send(self, records: list) -> SendResult:
        raise NotImplementedError

    def describe(self, record: Any) -> Any:
        return record

    def encode(self, batch: pa.RecordBatch, kind: str = "flows") -> tuple[list, np.ndarray, list]:
        """Records, sizes and refused rows of a batch of ``kind`` (flows or aggregate rows)."""
        if batch.num_rows == 0:
            import numpy as np

            return [], np.zeros(0, dtype=np.int64), []
        return self.encode_flows(batch) if kind == "flows" else self.encode_aggregates(batch)

    def start(self) -> None:
        c = self.config
        facts = self.connect()
        path = c.dead_letter_path or default_dead_letter_path(self.ctx)
        self.delivery = Delivery(self.ctx, c.batch, c.retry, self.send,
                                 DeadLetterWriter(path, self.ctx.name, self.ctx), self.describe)
        self.ctx.log.info(f"{self.log_name} sink ready", **facts, dead_letter_path=str(path))

    def write(self, env: Envelope) -> None:
        records, sizes, refused = self.encode(env.batch, env.kind)
        self.delivery.submit(env, records, sizes, refused)

    def tick(self, now_ns: int) -> None:
        self.delivery.tick()

    def flush(self) -> None:
        self.delivery.flush()

    def close(self) -> None:
        if self.delivery is not None:
            self.delivery.close()
        self.disconnect()

    @property
    def outstanding(self) -> int:
        return self.delivery.outstanding if self.delivery is not None else 0
