"""Fuzzing the Hubble JSON decoder: bad input is reported line by line, never raised, never contagious.

``decode_lines`` has two paths, the columnar one (Arrow's JSON reader) and the
line-by-line one; both get every input. For any input they must not raise,
must account for every non-blank line (a flow, a lost-events record, another
Hubble event, or an error with its line number and a reason), and must keep
the valid lines around a bad one. Inputs: random bytes, recorded fixture
lines mutated at the JSON level (values replaced by other types, huge and
negative numbers, deep nesting, keys removed) and at the byte level, and
deeply nested documents.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowship.model.hubble_decode import decode_lines
from flowship.model.schema import FLOW_SCHEMA

FUZZ = settings(max_examples=300, deadline=10_000, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])


FIXTURES = Path(os.environ.get("FLOWSHIP_FIXTURES",
                               Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hubble"))


@functools.cache
def flow_lines() -> tuple[bytes, ...]:
    """Recorded fixture lines that decode to exactly one flow each (not a fixture: examples stay short)."""
    lines = [line for path in sorted(FIXTURES.glob("*.jsonl")) for line in path.read_bytes().split(b"\n")
             if line.strip()]
    out = tuple(line for line in lines if decode_lines(line + b"\n").batch.num_rows == 1)
    if len(out) < 1000:
        pytest.fail(f"expected the recorded Hubble flows in {FIXTURES} (set FLOWSHIP_FIXTURES)", pytrace=False)
    return out


@pytest.fixture(scope="module", autouse=True)
def _load_lines_before_timing() -> None:
    flow_lines()


def uuid_of(line: bytes) -> str:
    return decode_lines(line + b"\n").batch.column("uuid")[0].as_py()


def test_orjson_limits_recursion():
    # orjson before 3.9.15 crashes the process on deeply nested input (CVE-2024-27454).
    version = tuple(int(p) for p in orjson.__version__.split(".")[:3])
    assert version >= (3, 9, 15), (f"orjson {orjson.__version__} crashes on deeply nested JSON; "
                                   "install orjson>=3.9.15 (pip install -e '.[test]')")


def nonblank(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


def decode_both(data: bytes, first_line: int = 1) -> tuple:
    """Both decoder paths, with the properties every result must have."""
    results = []
    for fast in (True, False):
        r = decode_lines(data, first_line=first_line, fast=fast)
        assert isinstance(r.batch, pa.RecordBatch) and r.batch.schema.equals(FLOW_SCHEMA)
        r.batch.validate(full=True)  # e.g. no invalid UTF-8 in string columns
        for number, reason in r.errors:
            assert isinstance(reason, str) and reason.strip(), (number, reason)
        if not data.lstrip().startswith(b"["):
            lines = data.split(b"\n")
            for number, _ in r.errors:
                assert first_line <= number < first_line + len(lines), (number, r.errors)
                assert lines[number - first_line].strip(), f"error reported on blank line {number}"
            accounted = r.batch.num_rows + len(r.errors) + len(r.lost_events) + r.other_events
            assert accounted == nonblank(data), (fast, accounted, nonblank(data), r.errors)
            assert len({n for n, _ in r.errors}) == len(r.errors), "one line reported twice"
        results.append(r)
    return tuple(results)


# -- random bytes ----------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=4000), first_line=st.integers(1, 10**6))
def test_random_bytes(data, first_line, tried):
    tried["hubble_json: random bytes"] += 1
    decode_both(data, first_line)


@FUZZ
@given(parts=st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"flow"', b":", b",", b"\n", b'"time"', b"1",
                                       b'"2023-01-01T00:00:00Z"', b"null", b"true", b'"uuid"', b'"x"', b"\\",
                                       b'"l4"', b'"TCP"', b'"source_port"', b"-", b"e", b"9" * 25, b" ", b"\r",
                                       b"\xff", b"\x00"]), max_size=200))
def test_json_shaped_noise(parts, tried):
    tried["hubble_json: json-shaped noise"] += 1
    decode_both(b"".join(parts))


# -- mutated fixture lines ---------------------------------------------------------------------

class Raw(str):
    """A JSON literal written as is (numbers orjson cannot produce)."""


RAW_NUMBERS = ["1" + "0" * 40, "-1" + "0" * 40, "18446744073709551616", "-9223372036854775809", "1e400", "-1e400",
               "1.5", "-0", "0.0000001", "4294967296", "65536", "-1", "1e-400", "123456789.123456789e10"]
WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30), st.sampled_from(["", "FORWARDED", "2023-13-45T99:99:99Z", "2023-01-01T00:00:00Z",
                                           "not-an-ip", "::1", "10.0.0.1", "TCP", "\u0000", "\ud7ff" * 3]),
    st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(-9, 9), max_size=3),
    st.builds(Raw, st.sampled_from(RAW_NUMBERS)),
    st.integers(1, 3000).map(lambda d: Raw("[" * d + "]" * d)),
    st.integers(1, 3000).map(lambda d: Raw('{"a":' * d + "1" + "}" * d)),
)


def paths_of(obj, prefix=()):  # noqa: ANN001, ANN201
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths_of(v, (*prefix, i))


def dumps_with_raw(obj) -> bytes:  # noqa: ANN001
    raws: dict[str, str] = {}

    def swap(v):  # noqa: ANN001, ANN202
        if isinstance(v, Raw):
            key = f"@@raw{len(raws)}@@"
            raws[key] = str(v)
            return key
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = orjson.dumps(swap(obj)).decode()
    for key, raw in raws.items():
        text = text.replace(f'"{key}"', raw)
    return text.encode()


@st.composite
def json_mutation(draw) -> bytes:  # noqa: ANN001
    obj = orjson.loads(draw(st.sampled_from(flow_lines())))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(paths_of(obj))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "rename"]))
        if not path:
            obj = draw(WEIRD) if action == "replace" else [obj]
            continue
        parent = obj
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        if action == "replace":
            parent[key] = draw(WEIRD)
        elif action == "delete":
            del parent[key]
        elif action == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):
            parent[key[::-1] + "X" if isinstance(key, str) else "k"] = parent.pop(key)
    return dumps_with_raw(obj)


@st.composite
def byte_mutation(draw) -> bytes:  # noqa: ANN001
    line = bytearray(draw(st.sampled_from(flow_lines())))
    for _ in range(draw(st.integers(1, 4))):
        if not line:
            break
        at = draw(st.integers(0, len(line) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]))
        if op == "flip":
            line[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del line[at:at + draw(st.integers(1, 20))]
        elif op == "insert":
            line[at:at] = draw(st.binary(min_size=1, max_size=10))
        elif op == "truncate":
            del line[at:]
        else:
            end = min(len(line), at + draw(st.integers(1, 40)))
            line[at:at] = line[at:end]
    return bytes(line).replace(b"\n", b" ")


def columns(batch: pa.RecordBatch) -> dict[str, list]:
    return {f.name: (batch.column(f.name).cast(pa.int64()) if pa.types.is_timestamp(f.type)
                     else batch.column(f.name)).to_pylist() for f in batch.schema}


def check_neighbours_kept(before: bytes, bad: bytes, after: bytes, first_line: int) -> None:
    data = before + b"\n" + bad + b"\n" + after + b"\n"
    good = {uuid_of(before), uuid_of(after)}
    fast, slow = decode_both(data, first_line)
    for r in (fast, slow):
        assert good <= set(r.batch.column("uuid").to_pylist()), "a valid neighbour of a bad line was lost"
        assert all(number == first_line + 1 for number, _ in r.errors), r.errors


@FUZZ
@given(data=st.data(), first_line=st.integers(1, 10**5))
def test_json_mutations_keep_neighbours(data, first_line, tried):
    tried["hubble_json: JSON-level mutations"] += 1
    bad = data.draw(json_mutation())
    assume(b"\n" not in bad)
    before, after = data.draw(st.sampled_from(flow_lines())), data.draw(st.sampled_from(flow_lines()))
    check_neighbours_kept(before, bad, after, first_line)


@FUZZ
@given(data=st.data(), first_line=st.integers(1, 10**5))
def test_byte_mutations_keep_neighbours(data, first_line, tried):
    tried["hubble_json: byte-level mutations"] += 1
    bad = data.draw(byte_mutation())
    before, after = data.draw(st.sampled_from(flow_lines())), data.draw(st.sampled_from(flow_lines()))
    check_neighbours_kept(before, bad, after, first_line)


@settings(max_examples=40, deadline=30_000)
@given(depth=st.integers(500, 300_000), where=st.sampled_from(["top", "flow", "unknown", "summary", "IP"]),
       kind=st.sampled_from(["[]", "{}"]))
def test_deep_nesting(depth, where, kind, tried):
    tried["hubble_json: deep nesting"] += 1
    deep = ("[" * depth + "]" * depth) if kind == "[]" else ('{"a":' * depth + "1" + "}" * depth)
    obj = orjson.loads(flow_lines()[0])
    if where == "top":
        bad = deep.encode()
    else:
        target = obj if where == "unknown" else obj["flow"]
        target[{"flow": "source", "unknown": "zzz", "summary": "Summary", "IP": "IP"}[where]] = Raw(deep)
        bad = dumps_with_raw(obj)
    check_neighbours_kept(flow_lines()[1], bad, flow_lines()[2], 1)


@FUZZ
@given(data=st.data())
def test_fixture_chunks_decode_the_same_on_both_paths(data, tried):
    """Unmutated input: the columnar path gives exactly the line decoder's batch."""
    tried["hubble_json: valid chunks, both paths equal"] += 1
    chunk = b"\n".join(data.draw(st.lists(st.sampled_from(flow_lines()), min_size=1, max_size=50))) + b"\n"
    fast, slow = decode_both(chunk)
    assert not fast.errors and not slow.errors
    assert columns(fast.batch) == columns(slow.batch)
