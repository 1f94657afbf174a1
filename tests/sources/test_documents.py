"""The line sources (file, stdin) read what people actually pipe in, through the real ``flowship export``.

Pretty-printed JSON (an array of flows, or objects one after another, as ``jq`` or an API dump writes
them) with or without a final newline, a UTF-8 byte order mark, gzip on stdin. Every case checks the exact
flows delivered: the uuids in the JSON-lines file the ``file`` sink wrote.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import orjson
import pytest
from flowgen_input import generate_lines

REPO = Path(__file__).resolve().parents[2]
COUNT = 200
BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Hubble ExportEvents from bench/flowgen.py, each with its own uuid."""
    path = tmp_path_factory.mktemp("flows") / "flows.jsonl"
    return [orjson.loads(line) for line in generate_lines(path, COUNT)]


def uuids(events: list[dict]) -> list[str]:
    return [e["flow"]["uuid"] for e in events]


def jsonl(events: list[dict]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def export(tmp_path: Path, source: str, stdin: bytes = b"", name: str = "run") -> tuple[int, str, list[str]]:
    """Run ``flowship export`` with one source into a JSON-lines file; (exit code, stderr, uuids delivered)."""
    out = tmp_path / f"{name}.out.jsonl"
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"data_dir: {tmp_path}/state\nsources: [{source}]\n"
                      f"sinks: [{{type: file, path: '{out}', fsync: false}}]\n")
    proc = subprocess.run([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                           str(config), "--no-progress"], input=stdin, capture_output=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    got = [orjson.loads(line)["flow"]["uuid"] for line in out.read_bytes().splitlines()] if out.exists() else []
    return proc.returncode, stderr, got


def file_source(*paths: Path) -> str:
    return "{type: file, paths: [" + ", ".join(f"'{p}'" for p in paths) + "]}"


def rejected(stderr: str) -> list[tuple[str, str]]:
    """(where, reason) of every rejected record the run logged."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{") and '"rejected input line"' in line:
            record = json.loads(line)
            out.append((record["where"], record["reason"]))
    return out


@pytest.mark.parametrize("final_newline", [True, False])
def test_a_pretty_printed_array_in_a_file(tmp_path, events, final_newline):
    path = tmp_path / "dump.json"
    path.write_bytes(json.dumps(events, indent=2).encode() + (b"\n" if final_newline else b""))
    code, stderr, got = export(tmp_path, file_source(path))
    assert code == 0, stderr
    assert got == uuids(events)
    # its position is checkpointed at its end: a second run reads nothing again
    code, stderr, again = export(tmp_path, file_source(path), name="again")
    assert (code, again) == (0, []), stderr


def test_pretty_printed_objects_one_after_another_and_a_compact_array_without_newline(tmp_path, events):
    jq = tmp_path / "jq.json"  # what `jq .` prints for a stream of events
    jq.write_bytes(b"\n".join(json.dumps(e, indent=2).encode() for e in events[:100]))
    compact = tmp_path / "compact.json"
    compact.write_bytes(orjson.dumps(events[100:150]))  # one line, no final newline
    tabs = tmp_path / "tabs.json"  # Go's MarshalIndent with a tab, the first record on the opening line
    tabs.write_bytes(b"[" + json.dumps(events[150:], indent="\t")[1:].lstrip().encode())
    code, stderr, got = export(tmp_path, file_source(jq, compact, tabs))
    assert code == 0, stderr
    assert got == uuids(events)


def test_two_pretty_printed_files_are_two_files(tmp_path, events):
    """Both open with "[": their identity is not their first line, or the second would be skipped as read."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(events[:50], indent=2))
    second.write_text(json.dumps(events[50:], indent=2))
    code, stderr, got = export(tmp_path, file_source(first, second))
    assert code == 0, stderr
    assert got == uuids(events)


def test_a_bad_record_in_an_array_is_reported_by_its_line_and_costs_only_itself(tmp_path, events):
    text = json.dumps(events[:5], indent=2)
    lines = text.split("\n")
    # break the verdict of the third record: an unquoted word is not JSON
    starts = [i for i, line in enumerate(lines) if line == "  {"]
    bad = next(i for i in range(starts[2], starts[3]) if '"verdict": ' in lines[i])
    lines[bad] = lines[bad].replace('"verdict": "', '"verdict": ').replace('",', ",", 1)
    # and give the fifth a flow that is not an object
    fifth = starts[4]
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines[:fifth]) + '\n  {"flow": 5}\n]')
    code, stderr, got = export(tmp_path, file_source(path))
    assert code == 3, stderr
    assert got == uuids([events[0], events[1], events[3]])
    where = [w for w, _reason in rejected(stderr)]
    assert where == [f"{path}:{bad + 1}", f"{path}:{fifth + 1}"], rejected(stderr)
    assert rejected(stderr)[0][1].startswith("invalid JSON: Expecting value")
    assert rejected(stderr)[1][1] == "'flow' is not an object"


def test_a_byte_order_mark_costs_no_line(tmp_path, events):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(BOM + jsonl(events))
    code, stderr, got = export(tmp_path, file_source(path))
    assert code == 0, stderr
    assert got == uuids(events)
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=BOM + jsonl(events), name="stdin")
    assert code == 0, stderr
    assert got == uuids(events)
    pretty = BOM + json.dumps(events[:10], indent=2).encode()
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=pretty, name="pretty")
    assert (code, got) == (0, uuids(events[:10])), stderr


@pytest.mark.parametrize("final_newline", [True, False])
def test_a_pretty_printed_array_on_stdin(tmp_path, events, final_newline):
    data = json.dumps(events, indent=4).encode() + (b"\n" if final_newline else b"")
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=data)
    assert code == 0, stderr
    assert got == uuids(events)


def test_gzip_on_stdin_is_decompressed(tmp_path, events):
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=gzip.compress(jsonl(events)))
    assert code == 0, stderr
    assert got == uuids(events)
    # `cat a.gz b.gz`: two members, the second a pretty-printed array would not be one input; JSON lines are
    members = gzip.compress(jsonl(events[:70])) + gzip.compress(jsonl(events[70:]))
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=members, name="members")
    assert (code, got) == (0, uuids(events)), stderr
    pretty = gzip.compress(BOM + json.dumps(events, indent=2).encode())
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=pretty, name="pretty")
    assert (code, got) == (0, uuids(events)), stderr


def test_gzip_on_stdin_cut_short_keeps_the_complete_lines_and_says_so(tmp_path, events):
    data = jsonl(events)
    compressed = gzip.compress(data, compresslevel=0)  # stored blocks: the cut lands at a known byte
    cut = compressed[: len(compressed) - 8 - len(data) // 2]  # about half of the content, no trailer
    complete_lines = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < complete_lines < COUNT
    code, stderr, got = export(tmp_path, "{type: stdin}", stdin=cut)
    assert code == 3, stderr
    assert got == uuids(events)[:complete_lines]
    ((where, reason),) = rejected(stderr)
    assert where == f"<stdin>:{complete_lines + 1}"
    assert reason.startswith("truncated or corrupt gzip stream after ")
