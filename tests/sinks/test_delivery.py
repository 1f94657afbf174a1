"""The shared delivery engine: batching, retries, splitting, dead letters, acknowledgements.

``send`` here is a scripted function standing in for a protocol (fault
injection the engine must handle); the protocols themselves are tested
against real servers in the per-sink tests.
"""

from __future__ import annotations

import random
import threading
import time

import orjson
import pyarrow as pa
import pytest
from helpers import make_ctx

from flowship.config import ByteSize, ConfigError, Duration, parse
from flowship.pipeline.envelope import Envelope, Receipt
from flowship.sinks.delivery import (
    BatchConfig,
    DeadLetterWriter,
    Delivery,
    RejectedError,
    RequestTooLargeError,
    RetryableError,
    RetryConfig,
    SendResult,
    backoff_seconds,
    parse_retry_after,
)


def _env(n: int, done: list) -> Envelope:
    batch = pa.RecordBatch.from_pydict({"x": list(range(n))})
    receipt = Receipt(on_done=lambda r: done.append((n, r.failed)), rows=n)
    return Envelope(batch, [receipt])


def _delivery(ctx, send, *, max_events=100, max_bytes=1 << 20, timeout=60.0, concurrency=1, attempts=0,
              backoff=0.001, dead_path=None):
    batch = BatchConfig(max_events=max_events, max_bytes=ByteSize(max_bytes), timeout=Duration(timeout))
    retry = RetryConfig(initial_backoff=Duration(backoff), max_backoff=Duration(backoff * 4), max_attempts=attempts,
                        concurrency=concurrency)
    dead = DeadLetterWriter(dead_path or ctx.data_dir / "dead.jsonl", ctx.name, ctx)
    return Delivery(ctx, batch, retry, send, dead, seed=1)


class Recorder:
    """A send function that records requests and follows a script of outcomes."""

    def __init__(self, script=None) -> None:
        self.requests: list[list] = []
        self.script = list(script or [])
        self.lock = threading.Lock()

    def __call__(self, records: list) -> SendResult:
        with self.lock:
            self.requests.append(list(records))
            step = self.script.pop(0) if self.script else None
        if callable(step):
            return step(records)
        if isinstance(step, Exception):
            raise step
        return step or SendResult(sent_bytes=sum(len(r) for r in records))


def test_batches_by_events_and_acks_after_delivery(ctx):
    send = Recorder()
    d = _delivery(ctx, send, max_events=4)
    done: list = []
    d.submit(_env(3, done), [b"a", b"b", b"c"], [1, 1, 1])
    assert send.requests == [] and done == []
    d.submit(_env(3, done), [b"d", b"e", b"f"], [1, 1, 1])
    assert d.flush(timeout=5)
    d.close()
    assert send.requests == [[b"a", b"b", b"c", b"d"], [b"e", b"f"]]
    assert sorted(done) == [(3, False), (3, False)]
    assert ctx.metrics.value("flowship_sink_batches_total", sink="sink", outcome="ok") == 2


def test_batches_by_bytes_and_an_oversized_record_goes_alone(ctx):
    send = Recorder()
    d = _delivery(ctx, send, max_events=100, max_bytes=10)
    done: list = []
    recs = [b"aaaa", b"bbbb", b"cccc", b"x" * 25, b"dd"]
    d.submit(_env(5, done), recs, [len(r) for r in recs])
    assert d.flush(timeout=5)
    d.close()
    assert send.requests == [[b"aaaa", b"bbbb"], [b"cccc"], [b"x" * 25], [b"dd"]]
    assert done == [(5, False)]


def test_batch_timeout_sends_on_tick(ctx):
    send = Recorder()
    d = _delivery(ctx, send, max_events=100, timeout=0.05)
    done: list = []
    d.submit(_env(2, done), [b"a", b"b"], [1, 1])
    d.tick()
    assert send.requests == []  # not old enough yet
    time.sleep(0.08)
    d.tick()
    assert d.flush(timeout=5)
    d.close()
    assert send.requests == [[b"a", b"b"]]
    assert done == [(2, False)]


def test_whole_request_retry_honours_retry_after(ctx, monkeypatch):
    slept: list[float] = []
    send = Recorder([RetryableError("http_429", "slow down", retry_after=0.2),
                     RetryableError("http_503", "unavailable"), None])
    d = _delivery(ctx, send)
    monkeypatch.setattr(d, "_sleep", lambda s: slept.append(s) or True)
    done: list = []
    d.submit(_env(2, done), [b"a", b"b"], [1, 1])
    assert d.flush(timeout=5)
    d.close()
    assert len(send.requests) == 3
    assert slept[0] >= 0.2  # Retry-After is a floor under the jittered backoff
    assert slept[1] <= 0.004  # full jitter, capped by max_backoff
    assert done == [(2, False)]
    assert ctx.metrics.value("flowship_sink_errors_total", sink="sink", kind="http_429") == 1
    assert ctx.metrics.value("flowship_sink_errors_total", sink="sink", kind="http_503") == 1


def test_per_record_outcomes_retry_dead_letter_and_duplicates(ctx):
    def first(records):
        # record 0 accepted, 1 retried, 2 refused for good, 3 already there
        return SendResult(retry=[1], dead=[(2, "mapper_parsing_exception", "failed to parse field [source.ip]")],
                          duplicates=1)

    send = Recorder([first, None])
    d = _delivery(ctx, send)
    done: list = []
    d.submit(_env(4, done), [b"r0", b"r1", b"r2", b"r3"], [2, 2, 2, 2])
    assert d.flush(timeout=5)
    d.close()
    assert send.requests == [[b"r0", b"r1", b"r2", b"r3"], [b"r1"]]
    assert done == [(4, True)]  # one row dead-lettered: the receipt is marked failed, still released
    lines = (ctx.data_dir / "dead.jsonl").read_bytes().splitlines()
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert entry["record"] == "r2"
    assert entry["reason"] == "mapper_parsing_exception"
    assert entry["detail"] == "failed to parse field [source.ip]"
    assert entry["sink"] == "sink"
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="sink", reason="mapper_parsing_exception") == 1
    assert ctx.metrics.value("flowship_sink_duplicates_total", sink="sink") == 1


def test_too_large_splits_in_halves_until_it_fits(ctx):
    def maybe_too_large(records):
        if len(records) > 2:
            raise RequestTooLargeError("413")
        return SendResult()

    send = Recorder([maybe_too_large] * 20)
    d = _delivery(ctx, send)
    done: list = []
    recs = [bytes([65 + i]) for i in range(7)]
    d.submit(_env(7, done), recs, [1] * 7)
    assert d.flush(timeout=5)
    d.close()
    delivered = [r for req in send.requests if len(req) <= 2 for r in req]
    assert sorted(delivered) == sorted(recs)
    assert done == [(7, False)]


def test_single_record_too_large_is_dead_lettered(ctx):
    send = Recorder([RequestTooLargeError("413 entity too large")])
    d = _delivery(ctx, send)
    done: list = []
    d.submit(_env(1, done), [b"huge"], [4])
    assert d.flush(timeout=5)
    d.close()
    assert done == [(1, True)]
    entry = orjson.loads((ctx.data_dir / "dead.jsonl").read_bytes())
    assert entry["reason"] == "request_too_large" and entry["record"] == "huge"


def test_rejected_request_is_dead_lettered_whole(ctx):
    send = Recorder([RejectedError("invalid_labels", "HTTP 400: error parsing labels", 400)])
    d = _delivery(ctx, send)
    done: list = []
    d.submit(_env(2, done), [b"a", b"b"], [1, 1])
    assert d.flush(timeout=5)
    d.close()
    assert done == [(2, True)]
    entries = [orjson.loads(x) for x in (ctx.data_dir / "dead.jsonl").read_bytes().splitlines()]
    assert [(e["record"], e["reason"]) for e in entries] == [("a", "invalid_labels"), ("b", "invalid_labels")]


def test_refused_rows_count_towards_the_ack(ctx):
    send = Recorder()
    d = _delivery(ctx, send)
    done: list = []
    d.submit(_env(3, done), [b"a", b"b"], [1, 1], refused=[("line_too_long", "300000 bytes", {"line": "x"})])
    assert d.flush(timeout=5)
    d.close()
    assert done == [(3, True)]
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="sink", reason="line_too_long") == 1


def test_max_attempts_gives_up_to_the_dead_letter_file(ctx):
    send = Recorder([RetryableError("transport", "connection refused")] * 3)
    d = _delivery(ctx, send, attempts=3)
    done: list = []
    d.submit(_env(1, done), [b"a"], [1])
    assert d.flush(timeout=5)
    d.close()
    assert len(send.requests) == 3
    assert done == [(1, True)]
    entry = orjson.loads((ctx.data_dir / "dead.jsonl").read_bytes())
    assert entry["reason"] == "retries_exhausted" and "connection refused" in entry["detail"]


def test_unlimited_retries_keep_rows_unacknowledged_until_delivered(ctx):
    gate = threading.Event()

    def fail_until_gate(records):
        if not gate.is_set():
            raise RetryableError("transport", "down")
        return SendResult()

    send = Recorder([fail_until_gate] * 10_000)
    d = _delivery(ctx, send, backoff=0.01)
    done: list = []
    d.submit(_env(2, done), [b"a", b"b"], [1, 1])
    assert d.flush(timeout=0.3) is False  # still failing: nothing acknowledged, nothing lost
    assert done == []
    gate.set()
    assert d.flush(timeout=5)
    d.close()
    assert done == [(2, False)]


def test_in_flight_is_bounded_and_submit_blocks(ctx):
    release = threading.Event()
    active: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def slow(records):
        with lock:
            active.append(1)
            peak[0] = max(peak[0], len(active))
        release.wait(5)
        with lock:
            active.pop()
        return SendResult()

    send = Recorder([slow] * 10)
    d = _delivery(ctx, send, max_events=1, concurrency=2)
    done: list = []
    finished = threading.Event()

    def producer():
        for _ in range(5):
            d.submit(_env(1, done), [b"r"], [1])
        finished.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.3)
    assert not finished.is_set()  # 2 in flight + 1 queued at most: the producer waits
    assert peak[0] == 2
    release.set()
    t.join(5)
    assert d.flush(timeout=5)
    d.close()
    assert len(done) == 5 and peak[0] == 2


def test_ack_waits_for_every_request_holding_the_envelope(ctx):
    gate = threading.Event()

    def second_waits(records):
        if records == [b"c"]:
            gate.wait(5)
        return SendResult()

    send = Recorder([None, second_waits])
    d = _delivery(ctx, send, max_events=2, concurrency=2)
    done: list = []
    d.submit(_env(3, done), [b"a", b"b", b"c"], [1, 1, 1])
    d.tick()
    threading.Thread(target=lambda: d.flush(timeout=5)).start()
    time.sleep(0.2)
    assert done == []  # first request done, second still in flight
    gate.set()
    assert d.flush(timeout=5)
    d.close()
    assert done == [(3, False)]


def test_envelope_row_count_reaches_on_ack(ctx):
    send = Recorder([lambda records: SendResult(dead=[(0, "bad", "x")])])
    d = _delivery(ctx, send)
    delivered: list[int] = []
    env = _env(3, [])
    env.on_ack = delivered.append
    d.submit(env, [b"a", b"b", b"c"], [1, 1, 1])
    assert d.flush(timeout=5)
    d.close()
    assert delivered == [2]  # dead-lettered rows are not counted as delivered


def test_crash_in_send_fails_the_sink(ctx):
    send = Recorder([KeyError("bug")])
    d = _delivery(ctx, send)
    d.submit(_env(1, []), [b"a"], [1])
    with pytest.raises(RuntimeError, match="delivery failed"):
        d.flush(timeout=5)
    d.close()


def test_retry_after_parsing():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("  2.5 ") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0


def test_full_jitter_bounds():
    rng = random.Random(3)
    values = [backoff_seconds(a, 0.5, 30.0, rng) for a in range(12) for _ in range(50)]
    assert all(0 <= v <= 30.0 for v in values)
    assert max(backoff_seconds(0, 0.5, 30.0, rng) for _ in range(200)) <= 0.5
    assert max(backoff_seconds(10, 0.5, 30.0, rng) for _ in range(200)) > 15


def test_config_sections_validate():
    with pytest.raises(ConfigError) as err:
        parse(BatchConfig, {"max_events": 0, "max_bytes": "1B", "timeout": "0s"}, "f.yaml", "sinks[0].batch")
    text = str(err.value)
    assert "sinks[0].batch.max_events: expected an integer >= 1" in text
    assert "sinks[0].batch.max_bytes: expected at least 1KiB" in text
    with pytest.raises(ConfigError, match="concurrency"):
        parse(RetryConfig, {"concurrency": 0}, "f.yaml")
    cfg = parse(RetryConfig, {"initial_backoff": "100ms", "max_backoff": "10s", "max_attempts": 5}, "f.yaml")
    assert cfg.initial_backoff == 0.1 and cfg.max_attempts == 5


def test_dead_letter_writer_appends_json_lines(tmp_path):
    ctx = make_ctx("s", tmp_path)
    w = DeadLetterWriter(tmp_path / "sub" / "dl.jsonl", "s", ctx)
    w.write([("r1", "why", {"a": 1}), ("r2", "why not", b"\xff\xfe")])
    w.write([("r1", "again", "text")])
    w.close()
    lines = [orjson.loads(x) for x in (tmp_path / "sub" / "dl.jsonl").read_bytes().splitlines()]
    assert [x["reason"] for x in lines] == ["r1", "r2", "r1"]
    assert lines[0]["record"] == {"a": 1}
    assert lines[1]["record"] == "fffe"
    assert w.count == 3
    assert ctx.metrics.value("flowship_sink_dead_letter_total", sink="s", reason="r1") == 2
