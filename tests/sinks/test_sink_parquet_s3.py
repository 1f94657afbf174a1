"""Parquet on S3: a real S3 server (versitygw), the AWS credential chain, an outage and kill -9 mid-run.

The tests run a versitygw of their own (tests/s3server.py). Everything is read back the way a user would:
pyarrow's S3 filesystem lists the objects and reads each one as Parquet.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
import yaml
from flowgen_input import generate_lines
from pyarrow import fs
from s3server import ACCESS_KEY, SECRET_KEY, S3Server, aws_env

from flowship.config import ConfigError, parse
from flowship.sinks.parquet import ParquetSinkConfig, partition_dir

REPO = Path(__file__).resolve().parents[2]


def objects(server: S3Server, bucket: str) -> list[fs.FileInfo]:
    infos = server.filesystem().get_file_info(fs.FileSelector(bucket, recursive=True))
    return sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path)


def stored_uuids(server: S3Server, bucket: str) -> list[str]:
    """Every flow uuid in every object; reading each object whole proves none is partial."""
    s3fs = server.filesystem()
    out: list[str] = []
    for info in objects(server, bucket):
        assert info.path.endswith(".parquet"), f"an object that is not a published file: {info.path}"
        out.extend(pq.read_table(info.path, filesystem=s3fs, columns=["uuid"]).column("uuid").to_pylist())
    return out


def export_config(tmp_path: Path, server: S3Server, bucket: str, source: dict[str, Any], **sink: Any) -> Path:
    config = {
        "data_dir": str(tmp_path / "state"),
        "node_name": "node-a",
        "sources": [source],
        "sinks": [{"type": "parquet", "path": f"s3://{bucket}/archive", "layout": "aws", "cluster": "test",
                   "max_file_rows": 500, "max_file_age": "1s",
                   "s3": {"endpoint_url": server.endpoint, "initial_backoff": "100ms", "max_backoff": "1s"},
                   **sink}],
    }
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def spawn_export(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "flowship.cli", "--log-format", "json", "export", "--config",
                                 str(config), "--no-progress"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=fh, env=env, cwd=config.parent)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, proc: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"flowship exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-3000:]}")


def log_events(log: Path) -> list[dict]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]


# ---------------------------------------------------------------------------------------------
# configuration and layout
# ---------------------------------------------------------------------------------------------


def test_aws_layout_names_cluster_node_and_date_parts():
    hour = 1_700_000_000 // 3600  # 2023-11-14T22:00Z
    assert partition_dir("aws", "flows", hour, "prod-eu", "node-7") == \
        "flows/cluster=prod-eu/node=node-7/year=2023/month=11/day=14/hour=22"
    assert partition_dir("hourly", "flows", hour, "prod-eu", "node-7") == "flows/dt=2023-11-14/hour=22"


@pytest.mark.parametrize(("options", "message"), [
    ({"path": "s3://Bad_Bucket/x"}, "sinks[0].path: expected s3://BUCKET[/PREFIX] with a valid bucket name"),
    ({"path": "s3://flows", "s3": {"endpoint_url": "127.0.0.1:7070"}},
     "sinks[0].s3.endpoint_url: expected http(s)://host[:port] with no path"),
    ({"layout": "daily"}, "sinks[0].layout: expected one of hourly, aws; got 'daily'"),
    ({"cluster": "a/b"}, "sinks[0].cluster: expected a name without '/' or '='"),
])
def test_config_errors_name_the_key(options: dict, message: str):
    with pytest.raises(ConfigError) as err:
        parse(ParquetSinkConfig, options, "flowship.yaml", "sinks[0]")
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------
# delivery
# ---------------------------------------------------------------------------------------------


def test_export_to_s3_stores_every_flow_once_under_the_aws_layout(tmp_path: Path, s3: S3Server):
    bucket = s3.create_bucket("roundtrip")
    lines = generate_lines(tmp_path / "flows.jsonl", 3000)
    config = export_config(tmp_path, s3, bucket, {"type": "file", "paths": [str(tmp_path / "flows.jsonl")],
                                                  "follow": False})
    log = tmp_path / "export.log"
    proc = spawn_export(config, log, aws_env())
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    want = Counter(orjson.loads(line)["flow"]["uuid"] for line in lines)
    assert Counter(stored_uuids(s3, bucket)) == want
    keys = [info.path for info in objects(s3, bucket)]
    assert keys and all(k.startswith(f"{bucket}/archive/flows/cluster=test/node=node-a/year=") for k in keys)
    assert all("/month=" in k and "/day=" in k and "/hour=" in k and k.split("/")[-1].startswith("node-a-")
               for k in keys)
    assert SECRET_KEY not in log.read_text()
    # the archive answers flowship report where it lies
    report = subprocess.run([sys.executable, "-m", "flowship.cli", "report", "all", "--parquet",
                             f"s3://{bucket}/archive", "--s3-endpoint", s3.endpoint, "--limit", "0"],
                            capture_output=True, text=True, timeout=300, env=aws_env())
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Where the latency goes" in report.stdout and "Dropped / denied calls" in report.stdout
    missing = subprocess.run([sys.executable, "-m", "flowship.cli", "report", "drops", "--parquet",
                              "s3://no-such-bucket/x", "--s3-endpoint", s3.endpoint],
                             capture_output=True, text=True, timeout=300, env=aws_env())
    assert missing.returncode == 1 and "the bucket 'no-such-bucket' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_credentials_from_a_shared_profile(tmp_path: Path, s3: S3Server):
    """The AWS SDK's chain: no key in the environment, a named profile in a credentials file."""
    bucket = s3.create_bucket("profile")
    generate_lines(tmp_path / "flows.jsonl", 200)
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[archive]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    env = {k: v for k, v in aws_env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(credentials), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_PROFILE="archive")
    config = export_config(tmp_path, s3, bucket, {"type": "file", "paths": [str(tmp_path / "flows.jsonl")],
                                                  "follow": False})
    log = tmp_path / "export.log"
    assert spawn_export(config, log, env).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert len(set(stored_uuids(s3, bucket))) == 200


def test_a_missing_bucket_stops_the_start_with_its_name(tmp_path: Path, s3: S3Server):
    generate_lines(tmp_path / "flows.jsonl", 10)
    config = export_config(tmp_path, s3, "no-such-bucket", {"type": "file", "paths": [str(tmp_path / "flows.jsonl")],
                                                           "follow": False})
    log = tmp_path / "export.log"
    code = spawn_export(config, log, aws_env()).wait(timeout=120)
    assert code != 0
    assert "S3 bucket 'no-such-bucket' does not exist" in log.read_text()


def test_wrong_credentials_stop_the_start_and_are_not_logged(tmp_path: Path, s3: S3Server):
    bucket = s3.create_bucket("wrongkey")
    generate_lines(tmp_path / "flows.jsonl", 10)
    config = export_config(tmp_path, s3, bucket, {"type": "file", "paths": [str(tmp_path / "flows.jsonl")],
                                                  "follow": False})
    log = tmp_path / "export.log"
    code = spawn_export(config, log, aws_env(AWS_SECRET_ACCESS_KEY="wrong-secret-value")).wait(timeout=120)
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert f"S3 bucket '{bucket}' cannot be reached" in text
    assert "wrong-secret-value" not in text


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------


def append(path: Path, lines: list[bytes]) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\n".join(lines) + b"\n")


def test_server_outage_mid_run_loses_nothing_and_leaves_no_partial_object(tmp_path: Path, s3: S3Server):
    bucket = s3.create_bucket("outage")
    lines = generate_lines(tmp_path / "all.jsonl", 6000)
    source = tmp_path / "flows.jsonl"
    append(source, lines[:2000])
    config = export_config(tmp_path, s3, bucket, {"type": "file", "paths": [str(source)], "follow": True})
    log = tmp_path / "export.log"
    proc = spawn_export(config, log, aws_env())
    try:
        wait_for("the first 2,000 flows on S3", lambda: len(stored_uuids(s3, bucket)) >= 2000, 120, proc, log)
        s3.kill()
        append(source, lines[2000:])
        wait_for("a failed upload being retried",
                 lambda: any(e.get("event", "").startswith("S3 upload failed") for e in log_events(log)),
                 120, proc, log)
        time.sleep(2)  # several retries against the dead server
        s3.servers("start")
        wait_for("all 6,000 flows on S3", lambda: len(stored_uuids(s3, bucket)) >= 6000, 180, proc, log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    want = Counter(orjson.loads(line)["flow"]["uuid"] for line in lines)
    assert Counter(stored_uuids(s3, bucket)) == want  # every flow, once: a retry rewrites the same object
    retried = [e for e in log_events(log) if e.get("event", "").startswith("S3 upload failed")]
    assert retried and all(e["object"].startswith(f"s3://{bucket}/archive/flows/cluster=test/") for e in retried)


def test_kill9_mid_run_loses_nothing_on_s3(tmp_path: Path, s3: S3Server):
    bucket = s3.create_bucket("kill9")
    lines = generate_lines(tmp_path / "flows.jsonl", 20000)
    config = export_config(tmp_path, s3, bucket, {"type": "file", "paths": [str(tmp_path / "flows.jsonl")],
                                                  "follow": False}, max_file_rows=1000)
    log = tmp_path / "export.log"
    first = spawn_export(config, log, aws_env())
    try:
        wait_for("some objects stored", lambda: len(objects(s3, bucket)) >= 2, 120, first, log)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    before = len(stored_uuids(s3, bucket))
    assert before < len(lines), "the first run finished before the kill: the test proves nothing"
    second = spawn_export(config, log, aws_env())
    assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    stored = Counter(stored_uuids(s3, bucket))
    want = {orjson.loads(line)["flow"]["uuid"] for line in lines}
    assert set(stored) == want  # at least once: a flow stored but not checkpointed before the kill is read again
    assert sum(stored.values()) - len(want) <= before
