"""`flowship export` end to end: files in, Parquet and JSON lines out, read back with DuckDB."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def flowship(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowship.cli", "--log-format", "json", *args]


def parquet_rows(root: Path, where: str = "true", what: str = "count(*)") -> list[tuple]:
    return duckdb.sql(f"select {what} from read_parquet('{root}/flows/**/*.parquet', hive_partitioning=true) "
                      f"where {where}").fetchall()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_embedded_default_reads_stdin_into_parquet(tmp_path, fixture_lines):
    proc = run(flowship("export"), tmp_path, stdin=b"\n".join(fixture_lines) + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"embedded default" in proc.stderr
    root = tmp_path / "flows"
    assert parquet_rows(root) == [(1518,)]
    # exact values straight from the recorded flows
    assert parquet_rows(root, "verdict = 'DROPPED'", "count(*), list(drop_reason order by drop_reason)") == \
        [(2, ["INVALID_SOURCE_IP", "POLICY_DENIED"])]
    assert parquet_rows(root, "verdict = 'REDIRECTED'") == [(427,)]
    assert parquet_rows(root, "http_code = 503 and l7_type = 'RESPONSE'") == \
        [(sum(1 for line in fixture_lines if b'"code":503' in line),)]
    assert parquet_rows(root, "dns_rcode = 3") == [(sum(1 for line in fixture_lines if b'"rcode":3' in line),)]
    # hive partitions from the flows' own time, rows sorted by time inside each file
    for path in root.glob("flows/dt=*/hour=*/*.parquet"):
        times = duckdb.sql(f"select time from read_parquet('{path}')").fetchall()
        assert times == sorted(times)
    assert {p.parent.parent.name for p in root.glob("flows/dt=*/hour=*/*.parquet")} == \
        {"dt=2021-06-16", "dt=2021-10-04", "dt=2021-11-10", "dt=2023-08-21"}
    assert not list(root.rglob(".*.tmp"))


def test_files_gzip_and_bad_lines(tmp_path, fixture_files, fixture_lines):
    plain = fixture_files[0]
    compressed = tmp_path / "in.jsonl.gz"
    compressed.write_bytes(gzip.compress(fixture_files[1].read_bytes()))
    bad = tmp_path / "bad.jsonl"
    good = fixture_files[2].read_bytes().split(b"\n")
    bad.write_bytes(b"\n".join([good[0], b"{broken", good[1], b"", b'{"flow": 5}', good[2]]) + b"\n")
    config = write_config(tmp_path / "c.yaml", f"""
sources:
  - type: file
    paths: ["{plain}", "{compressed}", "{bad}"]
sinks:
  - type: parquet
    path: {tmp_path / 'out'}
""")
    proc = run(flowship("export", "--config", str(config)), tmp_path)
    assert proc.returncode == 3, proc.stderr.decode()  # finished, but input was rejected
    stderr = proc.stderr.decode()
    assert f"{bad}:2" in stderr and f"{bad}:5" in stderr
    assert "rejected 2" in stderr
    expected = (len([x for x in plain.read_bytes().split(b"\n") if x.strip()])
                + len([x for x in fixture_files[1].read_bytes().split(b"\n") if x.strip()]) + 3)
    assert parquet_rows(tmp_path / "out") == [(expected,)]


def test_truncated_gzip_is_reported_and_complete_lines_kept(tmp_path, fixture_files):
    data = gzip.compress(fixture_files[0].read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    config = write_config(tmp_path / "c.yaml", f"""
sources: [{{type: file, paths: ["{cut}"]}}]
sinks: [{{type: parquet, path: {tmp_path / 'out'}}}]
""")
    proc = run(flowship("export", "--config", str(config)), tmp_path)
    assert proc.returncode == 3
    assert b"truncated or corrupt gzip" in proc.stderr
    rows = parquet_rows(tmp_path / "out")[0][0]
    total = len([x for x in fixture_files[0].read_bytes().split(b"\n") if x.strip()])
    assert 0 < rows < total


def test_checkpoint_resume_reads_only_new_lines(tmp_path, fixture_lines):
    src = tmp_path / "events.log"
    src.write_bytes(b"\n".join(fixture_lines[:500]) + b"\n")
    config = write_config(tmp_path / "c.yaml", f"""
data_dir: {tmp_path / 'state'}
sources: [{{type: file, paths: ["{src}"]}}]
sinks: [{{type: parquet, path: {tmp_path / 'out'}}}]
""")
    assert run(flowship("export", "--config", str(config)), tmp_path).returncode == 0
    assert parquet_rows(tmp_path / "out") == [(500,)]
    with open(src, "ab") as fh:
        fh.write(b"\n".join(fixture_lines[500:800]) + b"\n")
    proc = run(flowship("export", "--config", str(config)), tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert parquet_rows(tmp_path / "out", what="count(*), count(distinct uuid)") == \
        parquet_rows(tmp_path / "out", what="800, count(distinct uuid)")
    checkpoint = orjson.loads((tmp_path / "state" / "checkpoints" / "file.json").read_bytes())
    (entry,) = checkpoint["files"].values()  # keyed by the fingerprint of the file's first line
    assert entry["path"] == str(src)
    assert entry["offset"] == src.stat().st_size
    assert entry["line"] == 800


def test_follow_survives_rotation_and_sigterm_flushes(tmp_path, fixture_lines):
    log = tmp_path / "events.log"
    log.write_bytes(b"\n".join(fixture_lines[:100]) + b"\n")
    config = write_config(tmp_path / "c.yaml", f"""
data_dir: {tmp_path / 'state'}
sources: [{{type: file, paths: ["{log}"], follow: true, poll_interval: 0.05}}]
sinks:
  - type: parquet
    path: {tmp_path / 'out'}
    max_file_age: 1h
  - type: file
    path: {tmp_path / 'copy.jsonl'}
""")
    proc = subprocess.Popen(flowship("export", "--config", str(config)), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        copy = tmp_path / "copy.jsonl"

        def copied() -> int:
            return len(copy.read_bytes().splitlines()) if copy.exists() else 0

        def wait_for(n: int) -> None:
            deadline = time.monotonic() + 30
            while copied() < n and time.monotonic() < deadline:
                time.sleep(0.05)
            assert copied() == n

        wait_for(100)
        with open(log, "ab") as fh:  # growth, with a line written in two pieces
            fh.write(b"\n".join(fixture_lines[100:200]) + b"\n" + fixture_lines[200][:50])
            fh.flush()
            time.sleep(0.3)
            fh.write(fixture_lines[200][50:] + b"\n")
        wait_for(201)
        os.rename(log, tmp_path / "events-1.log")  # rotation as Hubble's exporter does it
        with open(tmp_path / "events-1.log", "ab") as fh:  # late writes to the old file
            fh.write(b"\n".join(fixture_lines[201:250]) + b"\n")
        log.write_bytes(b"\n".join(fixture_lines[250:400]) + b"\n")
        wait_for(400)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    # parquet files were still open (max_file_age 1h): SIGTERM published them
    assert parquet_rows(tmp_path / "out", what="count(*), count(distinct uuid)") == [(400, len(set(fixture_lines[:400])))]


def test_sigterm_during_stdin_flushes_everything_read(tmp_path, fixture_lines):
    config = write_config(tmp_path / "c.yaml", f"""
sources: [{{type: stdin, flush_interval: 0.1}}]
sinks: [{{type: parquet, path: {tmp_path / 'out'}, max_file_age: 1h}}]
""")
    proc = subprocess.Popen(flowship("export", "--config", str(config)), cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdin.write(b"\n".join(fixture_lines[:700]) + b"\n")
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert parquet_rows(tmp_path / "out") == [(700,)]
    assert b"stopping: flushing sinks" in err


def test_hubble_json_file_sink_is_read_back_by_the_file_source(tmp_path, fixture_lines):
    config = write_config(tmp_path / "a.yaml", f"""
sources: [{{type: stdin}}]
sinks:
  - {{type: file, path: {tmp_path / 'hubble.jsonl'}, format: hubble}}
""")
    assert run(flowship("export", "--config", str(config)), tmp_path, stdin=b"\n".join(fixture_lines)).returncode == 0
    config2 = write_config(tmp_path / "b.yaml", f"""
data_dir: {tmp_path / 'state'}
sources: [{{type: file, paths: ["{tmp_path / 'hubble.jsonl'}"]}}]
sinks: [{{type: parquet, path: {tmp_path / 'out'}}}]
""")
    assert run(flowship("export", "--config", str(config2)), tmp_path).returncode == 0
    written = [orjson.loads(line) for line in (tmp_path / "hubble.jsonl").read_bytes().splitlines()]
    assert len(written) == 1518
    uuids = {w["flow"]["uuid"] for w in written}
    assert {u for (u,) in parquet_rows(tmp_path / "out", what="distinct uuid")} == uuids


@pytest.mark.parametrize("text,message", [
    ("sources: [{type: stdin}]\nsinks: [{type: parquet, pth: x}]\n",
     "c.yaml: sinks[0].pth: unknown key (known keys here:"),
    ("sources: [{type: stdin}]\nsinks: [{type: parquet, max_file_rows: many}]\n",
     "c.yaml: sinks[0].max_file_rows: expected an integer, got 'many'"),
    ("sources: [{type: stdin}]\nsinks: [{type: parquet, max_file_age: soon}]\n",
     "c.yaml: sinks[0].max_file_age: expected a duration like \"10s\""),
    ("sources: [{type: nope}]\nsinks: [{type: parquet}]\n",
     "c.yaml: sources[0].type: unknown source type 'nope' (one of: file, stdin"),
    ("sources: [{type: file}]\nsinks: [{type: parquet}]\n",
     "c.yaml: sources[0].paths: at least one file or glob pattern is needed"),
    ("sources: [{type: stdin}]\nsinks: [{type: parquet, stages: [{type: sample, rate: zero}]}]\n",
     "c.yaml: sinks[0].stages[0].rate: expected an integer, got 'zero'"),
    ("sources: [{type: stdin}\nsinks: []\n", "c.yaml: line 2, column 1: not valid YAML"),
    ("sources: [{type: stdin}]\nsinks: [{type: parquet}]\nbogus: 1\n", "c.yaml: bogus: unknown key"),
])
def test_config_errors_name_file_key_path_and_expectation(tmp_path, text, message):
    config = write_config(tmp_path / "c.yaml", text)
    proc = run(flowship("validate", "--config", str(config)), tmp_path)
    assert proc.returncode == 6  # invalid configuration
    assert message in proc.stderr.decode(), proc.stderr.decode()
    proc = run(flowship("export", "--config", str(config)), tmp_path)
    assert proc.returncode == 6


def test_shipped_configs_are_valid_and_defaults_match_embedded(tmp_path, monkeypatch):
    from flowship.defaults import AGENT_DEFAULT, EXPORT_DEFAULT

    monkeypatch.setenv("NODE_NAME", "node-1")  # the DaemonSet config takes node_name from it

    assert (REPO / "configs" / "export-default.yaml").read_text() == EXPORT_DEFAULT
    assert (REPO / "configs" / "agent-default.yaml").read_text() == AGENT_DEFAULT
    for path in sorted((REPO / "configs").glob("*.yaml")):
        proc = run(flowship("validate", "--config", str(path)), tmp_path)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr.decode()}"


def test_every_input_shape_gives_the_same_flows(tmp_path, fixture_lines):
    """ExportEvent lines, camelCase (protojson's default spelling), bare Flow lines, a JSON array, gzip."""
    from google.protobuf import json_format

    from flowship.proto.observer import observer_pb2

    events = [orjson.loads(line) for line in fixture_lines]
    camel = []
    for line in fixture_lines:
        msg = json_format.Parse(line, observer_pb2.GetFlowsResponse())
        camel.append(json_format.MessageToJson(msg, indent=None).encode())
    assert b'"nodeName"' in camel[0] and b'"node_name"' not in camel[0]
    shapes = {
        "export.jsonl": b"\n".join(fixture_lines) + b"\n",
        "camel.jsonl": b"\n".join(camel) + b"\n",
        "bare.jsonl": b"\n".join(orjson.dumps(e["flow"]) for e in events) + b"\n",
        "array.json": orjson.dumps(events),
        "export.jsonl.gz": gzip.compress(b"\n".join(fixture_lines)),
    }
    key = "count(*), count(distinct (time, ip_src, ip_dst, verdict, l4_protocol, src_port, http_url, dns_query))"
    results = {}
    for name, data in shapes.items():
        (tmp_path / name).write_bytes(data)
        config = write_config(tmp_path / f"{name}.yaml", f"""
data_dir: {tmp_path / name}.state
sources: [{{type: file, paths: ["{tmp_path / name}"]}}]
sinks: [{{type: parquet, path: {tmp_path / name}.out}}]
""")
        proc = run(flowship("export", "--config", str(config)), tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr.decode()}"
        results[name] = parquet_rows(tmp_path / f"{name}.out", what=key)
        fingerprint = parquet_rows(tmp_path / f"{name}.out", what="sum(hash(time, ip_src, ip_dst, verdict, "
                                   "http_code, dns_rcode, src_pod, traffic_direction, is_reply))")
        results[name] = (results[name], fingerprint)
    assert len(set(map(str, results.values()))) == 1, results


def test_unresolvable_secret_references_are_config_errors(tmp_path):
    config = write_config(tmp_path / "c.yaml", """
sources: [{type: stdin}]
sinks:
  - type: loki
    url: http://127.0.0.1:9/push
    bearer_token: env:FLOWSHIP_TEST_SURELY_UNSET
  - type: elasticsearch
    url: http://127.0.0.1:9
    api_key: file:/nonexistent/key
""")
    for verb in ("validate", "export"):
        proc = run(flowship(verb, "--config", str(config)), tmp_path)
        assert proc.returncode == 6
        err = proc.stderr.decode()
        assert "c.yaml: sinks[0].bearer_token: environment variable FLOWSHIP_TEST_SURELY_UNSET is not set" in err
        assert "c.yaml: sinks[1].api_key: file /nonexistent/key is missing or unreadable" in err
        assert "Traceback" not in err
