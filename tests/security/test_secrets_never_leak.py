"""Credentials never leave the process: not in logs, errors, dead letters, state files, metrics or validate output.

One ``flowship export --log-level debug`` runs against the real dev servers
with a credential for every sink and source that takes one — half of them
from environment variables, half from files — and with paths that fail on
purpose: a Loki URL on a closed port (retries, then dead letters), a Loki
push the server refuses with 400 and an index that refuses every document
(dead letters with the server's reasons), Kafka producers and a consumer
whose SASL or TLS handshake the plaintext broker refuses (client errors
logged over and over). Everything the process wrote is then searched for
each secret in every form it could take (text, hex, URL-encoded, base64 at
any alignment, which covers ``Basic base64(user:password)``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import orjson
import pytest
from security_helpers import (
    Export,
    closed_port,
    delete_topics,
    devservers,
    files_under,
    find_leaks,
    flowship,
    run_env,
)

from flowship import registry
from flowship.model.hubble_decode import decode_lines

# Distinctive values: each appears nowhere unless it leaked.
SECRETS = {
    "loki bearer token (env)": "lokiBearer-7Qz9Rm-SECRET-b1f0e2",
    "loki user (file)": "lokiUser-Kx82Jd-ID-a7c3",
    "loki password (file)": "lokiPass-Wm3rTx-SECRET-5c2e91",
    "loki gateway header (env)": "lokiGateway-Fe18Vb-SECRET-62d0aa",
    "loki bearer token (file)": "lokiBearer2-Ys40Nk-SECRET-e9e9e1",
    "elasticsearch api key (env)": "esApiKey-Hh47Lp-SECRET-9d1a03",
    "elasticsearch user (file)": "esUser-Bq62Ma-ID-1f2e",
    "elasticsearch password (file)": "esPass-Tt55Qv-SECRET-0b7c44",
    "kafka sink sasl user (env)": "kafkaUser-Lr03Sd-ID-8b8b",
    "kafka sink sasl password (env)": "kafkaPass-Pq61Zn-SECRET-3e8d57",
    "kafka source sasl password (file)": "kafkaSrcPass-Jd20Wc-SECRET-77aa01",
    "kafka tls key passphrase (file)": "tlsKeyPass-Ur84Ge-SECRET-c0ffee",
    "redact hmac key (env)": "redactKey-Nb39Fs-SECRET-4d4d4d",
    "http bearer token (env)": "httpBearer-Vc72Ko-SECRET-a4b4c4",
    "http header (env)": "httpHeader-Gz15Wq-SECRET-d5e5f5",
    "http user (file)": "httpUser-Qe66Ri-ID-0a0b",
    "http password (file)": "httpPass-Mn48Xu-SECRET-1c2d3e",
    "elasticsearch proxy header (env)": "esProxy-Rt27Hy-SECRET-f6a7b8",
}
ENV = {
    "FLOWSHIP_TEST_LOKI_TOKEN": SECRETS["loki bearer token (env)"],
    "FLOWSHIP_TEST_LOKI_GATEWAY": SECRETS["loki gateway header (env)"],
    "FLOWSHIP_TEST_ES_API_KEY": SECRETS["elasticsearch api key (env)"],
    "FLOWSHIP_TEST_KAFKA_USER": SECRETS["kafka sink sasl user (env)"],
    "FLOWSHIP_TEST_KAFKA_PASSWORD": SECRETS["kafka sink sasl password (env)"],
    "FLOWSHIP_TEST_REDACT_KEY": SECRETS["redact hmac key (env)"],
    "FLOWSHIP_TEST_HTTP_TOKEN": SECRETS["http bearer token (env)"],
    "FLOWSHIP_TEST_HTTP_HEADER": SECRETS["http header (env)"],
    "FLOWSHIP_TEST_ES_PROXY": SECRETS["elasticsearch proxy header (env)"],
}
FILES = {
    "loki-user": SECRETS["loki user (file)"],
    "loki-password": SECRETS["loki password (file)"],
    "loki-token": SECRETS["loki bearer token (file)"],
    "es-user": SECRETS["elasticsearch user (file)"],
    "es-password": SECRETS["elasticsearch password (file)"],
    "kafka-source-password": SECRETS["kafka source sasl password (file)"],
    "tls-key-passphrase": SECRETS["kafka tls key passphrase (file)"],
    "http-user": SECRETS["http user (file)"],
    "http-password": SECRETS["http password (file)"],
}


def json_lines(data: bytes) -> list[dict]:
    """The JSON log lines (librdkafka writes its own lines to the same stderr, sometimes mid-line)."""
    out = []
    for line in data.splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return out


def write_secret_files(root: Path) -> Path:
    directory = root / "secrets"
    directory.mkdir()
    for name, value in FILES.items():
        (directory / name).write_text(value + "\n")  # trailing newline, as editors and kubectl write them
    return directory


def tls_client_key(root: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, encrypted with the secret passphrase."""
    key, cert = root / "client.key", root / "client.crt"
    proc = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=flowship-test",
                           "-keyout", str(key), "-out", str(cert),
                           "-passout", "pass:" + SECRETS["kafka tls key passphrase (file)"]],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"openssl could not make a test key (apt-get install openssl):\n{proc.stderr}", pytrace=False)
    assert b"ENCRYPTED" in key.read_bytes()
    return key, cert


def http(method: str, url: str, body: object = None) -> tuple[int, object]:
    return devservers.http_json(method, url, body)


def prepare_opensearch(es: str, run_id: str) -> dict[str, str]:
    """A data stream that accepts flows, and an index that refuses every document (strict mapping)."""
    from flowship.model import ecs_fields

    names = {"template": f"flowship-sec-{run_id}", "stream": f"logs-flowship.sec{run_id}-default",
             "strict": f"flowship-sec-{run_id}-strict"}
    status, answer = http("PUT", f"{es}/_index_template/{names['template']}", {
        "index_patterns": [f"logs-flowship.sec{run_id}-*"], "priority": 777, "data_stream": {},
        "template": {"mappings": {"properties": ecs_fields.es_properties()}}})
    assert status == 200, answer
    status, answer = http("PUT", f"{es}/{names['strict']}", {
        "mappings": {"dynamic": "strict", "properties": {"@timestamp": {"type": "date_nanos"}}}})
    assert status == 200, answer
    return names


def cleanup_opensearch(es: str, names: dict[str, str]) -> None:
    http("DELETE", f"{es}/_data_stream/{names['stream']}")
    http("DELETE", f"{es}/{names['strict']}")
    http("DELETE", f"{es}/_index_template/{names['template']}")


def config_text(tmp: Path, run_id: str, inputs: Path, secrets_dir: Path, key: Path, cert: Path,
                es_names: dict[str, str], kafka: str, es: str, vl: str) -> str:
    down = f"http://127.0.0.1:{closed_port()}"
    fast_retry = "{max_attempts: 2, initial_backoff: 50ms, max_backoff: 100ms}"
    return f"""
data_dir: {tmp / 'state'}
shutdown_timeout: 30s
sources:
  - type: file
    paths: ["{inputs}"]
    follow: true
  - type: kafka
    name: kafka-in-sasl
    brokers: "{kafka}"
    topic: flowship-sec-{run_id}-in
    group_id: flowship-sec-{run_id}
    security_protocol: sasl_plaintext
    sasl_mechanism: SCRAM-SHA-512
    sasl_username: flowship-reader
    sasl_password: file:{secrets_dir / 'kafka-source-password'}
    drain_timeout: 2s
stages:
  - type: redact
    mode: hash
    key_env: FLOWSHIP_TEST_REDACT_KEY
    fields: [ip]
    ip_format: address  # hashed addresses stay valid for the ip-typed ECS fields
sinks:
  - type: loki
    name: loki-bearer
    url: {vl}/insert/loki/api/v1/push
    bearer_token: env:FLOWSHIP_TEST_LOKI_TOKEN
    static_labels: {{job: flowship-sec-{run_id}}}
    batch: {{timeout: 200ms}}
  - type: loki
    name: loki-basic-down
    url: {down}/insert/loki/api/v1/push
    username: file:{secrets_dir / 'loki-user'}
    password: file:{secrets_dir / 'loki-password'}
    batch: {{timeout: 200ms}}
    retry: {fast_retry}
    buffer: {{type: disk, fsync: batch}}
  - type: loki
    name: loki-rejected
    url: {vl}/insert/loki/api/v1/push
    bearer_token: file:{secrets_dir / 'loki-token'}
    headers:
      X-Gateway-Token: env:FLOWSHIP_TEST_LOKI_GATEWAY
      Content-Type: application/json
    static_labels: {{job: flowship-sec-{run_id}-rejected}}
    batch: {{timeout: 200ms}}
    retry: {fast_retry}
  - type: http
    name: http-bearer
    url: {vl}/insert/jsonline?_time_field=time&extra_fields=job=flowship-sec-{run_id}-http
    bearer_token: env:FLOWSHIP_TEST_HTTP_TOKEN
    headers: {{X-Gateway-Token: env:FLOWSHIP_TEST_HTTP_HEADER}}
    batch: {{timeout: 200ms}}
  - type: http
    name: http-basic-down
    url: {down}/ingest
    username: file:{secrets_dir / 'http-user'}
    password: file:{secrets_dir / 'http-password'}
    batch: {{timeout: 200ms}}
    retry: {fast_retry}
  - type: elasticsearch
    name: es-apikey
    url: {es}
    api_key: env:FLOWSHIP_TEST_ES_API_KEY
    headers: {{X-Proxy-Token: env:FLOWSHIP_TEST_ES_PROXY}}
    data_stream: {es_names['stream']}
    aggregates_data_stream: logs-flowship.sec{run_id}agg-default
    template: skip
    batch: {{timeout: 200ms}}
  - type: elasticsearch
    name: es-basic-strict
    url: {es}
    username: file:{secrets_dir / 'es-user'}
    password: file:{secrets_dir / 'es-password'}
    mode: index
    index: {es_names['strict']}
    template: skip
    batch: {{timeout: 200ms}}
    retry: {fast_retry}
  - type: kafka
    name: kafka-plain
    brokers: "{kafka}"
    topic: flowship-sec-{run_id}
  - type: kafka
    name: kafka-sasl
    brokers: "{kafka}"
    topic: flowship-sec-{run_id}
    security_protocol: sasl_plaintext
    sasl_mechanism: PLAIN
    sasl_username: env:FLOWSHIP_TEST_KAFKA_USER
    sasl_password: env:FLOWSHIP_TEST_KAFKA_PASSWORD
    message_timeout: 2s
    flush_timeout: 3s
  - type: kafka
    name: kafka-tls
    brokers: "{kafka}"
    topic: flowship-sec-{run_id}
    security_protocol: ssl
    ssl_ca_location: {cert}
    ssl_certificate_location: {cert}
    ssl_key_location: {key}
    ssl_key_password: file:{secrets_dir / 'tls-key-passphrase'}
    message_timeout: 2s
    flush_timeout: 3s
"""


def test_secrets_never_leak(tmp_path, run_id, fixture_files, kafka_server, opensearch_server, victorialogs_server,
                            exports):
    inputs = tmp_path / "flows.jsonl"
    inputs.write_bytes(b"".join(p.read_bytes() for p in fixture_files if "5-http" in p.name or "10-flows" in p.name))
    flows = decode_lines(inputs.read_bytes()).batch.num_rows
    assert flows == 15
    secrets_dir = write_secret_files(tmp_path)
    key, cert = tls_client_key(tmp_path)
    es_names = prepare_opensearch(opensearch_server, run_id)
    config = tmp_path / "flowship.yaml"
    config.write_text(config_text(tmp_path, run_id, inputs, secrets_dir, key, cert, es_names, kafka_server,
                                  opensearch_server, victorialogs_server))
    try:
        export = Export(config, tmp_path, ENV).start()
        exports.append(export)

        def settled(text: str) -> bool:
            delivered = {s: export.metric(text, "flowship_sink_flows_total", sink=s)
                         for s in ("loki-bearer", "es-apikey", "kafka-plain", "http-bearer")}
            dead = {s: export.metric(text, "flowship_sink_dead_letter_total", sink=s)
                    for s in ("loki-basic-down", "loki-rejected", "es-basic-strict", "http-basic-down")}
            log = export.stderr()
            return (all(v == flows for v in delivered.values()) and all(v == flows for v in dead.values())
                    and all(f'"component": "{s}"' in log for s in ("kafka-sasl", "kafka-tls"))
                    and "SASL SCRAM-SHA-512 mechanism handshake failed" in log)  # the consumer's, refused

        metrics = export.wait_until(settled, "deliveries, dead letters and Kafka client errors")
        # a second scrape after the retry counters moved once more
        metrics += export.metrics_text()
        code = export.stop()
    finally:
        cleanup_opensearch(opensearch_server, es_names)
        delete_topics(kafka_server, [f"flowship-sec-{run_id}", f"flowship-sec-{run_id}-in"])
    stdout, stderr = export.stdout_path.read_bytes(), export.stderr_path.read_bytes()
    logs = json_lines(stderr)

    # The failing paths really failed, and said so in the logs.
    events = {(e.get("component"), e.get("event")) for e in logs}
    assert ("loki-basic-down", "request failed, retrying") in events
    assert ("loki-basic-down", "records dead-lettered") in events
    assert ("http-basic-down", "request failed, retrying") in events
    assert ("loki-rejected", "records dead-lettered") in events
    assert ("es-basic-strict", "records dead-lettered") in events
    assert ("kafka-sasl", "kafka client error") in events
    assert ("kafka-tls", "kafka client error") in events
    assert b'"component": "kafka-in-sasl"' in stderr
    assert b"SASL SCRAM-SHA-512 mechanism handshake failed" in stderr  # the consumer's handshake, refused
    dead = {p.name: [orjson.loads(line) for line in p.read_bytes().splitlines()]
            for p in (tmp_path / "state" / "dead-letter").glob("*.jsonl")}
    assert {name: len(rows) for name, rows in dead.items()} == {
        "loki-basic-down.jsonl": flows, "loki-rejected.jsonl": flows, "es-basic-strict.jsonl": flows,
        "http-basic-down.jsonl": flows}
    assert {r["reason"] for r in dead["loki-basic-down.jsonl"]} == {"retries_exhausted"}
    assert {r["reason"] for r in dead["http-basic-down.jsonl"]} == {"retries_exhausted"}
    assert {r["reason"] for r in dead["loki-rejected.jsonl"]} == {"bad_request"}
    assert {r["reason"] for r in dead["es-basic-strict.jsonl"]} == {"strict_dynamic_mapping_exception"}
    assert (tmp_path / "state" / "buffers" / "loki-basic-down").is_dir()
    # the Kafka sinks with refused credentials never deliver: the exit code says flows were left undelivered
    assert code == 4, stderr.decode()[-3000:]

    places = {"stdout": stdout, "stderr": stderr, "metrics": metrics.encode(),
              **files_under(tmp_path / "state")}
    assert len(places) >= 6
    key_material = key.read_bytes().splitlines()[5].decode()  # a line of the (encrypted) private key itself
    assert find_leaks({**SECRETS, "tls private key material": key_material}, places) == []


def test_validate_output_has_no_secrets(tmp_path, run_id):
    secrets_dir = write_secret_files(tmp_path)
    key, cert = tmp_path / "client.key", tmp_path / "client.crt"
    names = {"stream": f"logs-flowship.sec{run_id}-default", "strict": f"flowship-sec-{run_id}-strict"}
    config = tmp_path / "flowship.yaml"
    config.write_text(config_text(tmp_path, run_id, tmp_path / "in.jsonl", secrets_dir, key, cert, names,
                                  "127.0.0.1:9092", "http://127.0.0.1:9200", "http://127.0.0.1:9428"))
    proc = subprocess.run(flowship("validate", "--config", str(config)), capture_output=True, timeout=60,
                          env=run_env(ENV))
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout.decode().split("\n", 1)[1])
    assert len(report["sinks"]) == 10 and len(report["sources"]) == 2
    assert find_leaks(SECRETS, {"stdout": proc.stdout, "stderr": proc.stderr}) == []


def test_credentials_in_a_url_are_refused_without_echoing_them(tmp_path):
    password = "urlPass-Gg71Cx-SECRET-00ff11"
    config = tmp_path / "flowship.yaml"
    config.write_text(f"""
sources: [{{type: stdin}}]
sinks:
  - {{type: loki, url: "http://flowship:{password}@127.0.0.1:9428/insert/loki/api/v1/push"}}
  - {{type: elasticsearch, url: ["http://127.0.0.1:9200", "https://flowship:{password}@search.example:9200"]}}
""")
    for verb in ("validate", "export"):
        proc = subprocess.run(flowship(verb, "--config", str(config)), capture_output=True, timeout=60,
                              env=run_env(), stdin=subprocess.DEVNULL)
        assert proc.returncode == 6, proc.stderr.decode()  # invalid configuration
        text = proc.stderr.decode()
        assert text.count("remove the user name and password from the URL") == 2
        assert "sinks[0].url" in text and "sinks[1].url" in text
        assert find_leaks({"url password": password}, {"stdout": proc.stdout, "stderr": proc.stderr}) == []


def test_start_failures_name_the_problem_not_the_secret(tmp_path, victorialogs_server):
    """An unreachable Elasticsearch at start and an unset variable: the error says which, never a value."""
    secrets_dir = write_secret_files(tmp_path)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("")
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(f"""
data_dir: {tmp_path / 'state'}
sources: [{{type: file, paths: ["{inputs}"]}}]
sinks:
  - type: loki
    url: {victorialogs_server}/insert/loki/api/v1/push
    bearer_token: env:FLOWSHIP_TEST_LOKI_TOKEN
  - type: elasticsearch
    url: http://127.0.0.1:{closed_port()}
    username: file:{secrets_dir / 'es-user'}
    password: file:{secrets_dir / 'es-password'}
""")
    proc = subprocess.run(flowship("export", "--config", str(unreachable), "--no-progress"), capture_output=True,
                          timeout=120, env=run_env(ENV), stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert b"cannot reach http://127.0.0.1:" in proc.stderr
    assert find_leaks(SECRETS, {"stdout": proc.stdout, "stderr": proc.stderr}) == []

    unset = tmp_path / "unset.yaml"
    unset.write_text(unreachable.read_text().replace("env:FLOWSHIP_TEST_LOKI_TOKEN", "env:FLOWSHIP_TEST_UNSET_TOKEN"))
    env = dict(ENV)
    proc = subprocess.run(flowship("export", "--config", str(unset), "--no-progress"), capture_output=True,
                          timeout=120, env=run_env(env), stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert b"FLOWSHIP_TEST_UNSET_TOKEN is not set" in proc.stderr
    assert find_leaks(SECRETS, {"stdout": proc.stdout, "stderr": proc.stderr}) == []


def test_leak_search_finds_basic_auth_headers():
    """The search itself: a basic-auth header or a base64 blob holding the secret is found at any offset."""
    import base64

    secret = SECRETS["loki password (file)"]
    for prefix in ("u:", "us:", "use:", "user-name:"):
        header = b"Authorization: Basic " + base64.b64encode((prefix + secret).encode())
        assert find_leaks({"p": secret}, {"log": header}), prefix
    assert find_leaks({"p": secret}, {"log": secret.encode().hex().encode()}) == ["log: p (hex)"]
    assert find_leaks({"p": secret}, {"log": b"nothing to see"}) == []


def secret_value_fields(cls: type) -> list[str]:
    """Options of a config class whose value is a credential (a reference to one, like ``key_file``, is not)."""
    return [f.name for f in dataclasses.fields(cls)
            if re.search(r"password|passphrase|token|secret|api_key", f.name) or f.name == "headers"]


def test_config_reprs_hide_secret_fields():
    from flowship.secrets import Secret

    literal = Secret("literalSecret-Qa11-SECRET")
    configs = []
    for kind in ("sources", "stages", "sinks"):
        for name in registry.names(kind):
            cls = registry.config_class(kind, name)
            if fields := secret_value_fields(cls):
                values = {f: ({"X-Token": literal} if f == "headers" else literal) for f in fields}
                configs.append(cls(**values))
    assert {type(c).__name__ for c in configs} >= {
        "LokiSinkConfig", "ElasticsearchSinkConfig", "KafkaSinkConfig", "KafkaSourceConfig"}
    for config in configs:
        assert literal.reveal() not in repr(config)


def test_metrics_endpoint_serves_what_the_test_scrapes(tmp_path):
    """Guard for the leak test: /metrics answers while an export runs (a follow-mode file source)."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {tmp_path / 'state'}\nsources: [{{type: file, paths: [\"{inputs}\"], follow: true}}]\n"
                      f"sinks: [{{type: file, path: {tmp_path / 'out.jsonl'}}}]\n")
    export = Export(config, tmp_path, {}).start()
    try:
        text = export.wait_until(lambda t: "flowship_queue_capacity_batches" in t, "/metrics", timeout=60)
        assert export.metric(text, "flowship_queue_capacity_batches", queue="input") == 8
    finally:
        assert export.stop() == 0
