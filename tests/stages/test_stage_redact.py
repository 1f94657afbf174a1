"""The redact stage: removal, keyed hashing, special fields, config errors."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from stage_helpers import make_flows

from flowship.config import ConfigError, load_text
from flowship.stages.redact import RedactConfig, RedactStage

KEY = b"correct horse battery staple"


def token(value: str, size: int = 16) -> str:
    return hmac.new(KEY, value.encode(), hashlib.sha256).digest()[:size].hex()


@pytest.fixture()
def key_env(monkeypatch) -> str:
    monkeypatch.setenv("FLOWSHIP_TEST_REDACT_KEY", KEY.decode())
    return "FLOWSHIP_TEST_REDACT_KEY"


def sample_flows():
    return make_flows([
        {"ip_src": "10.0.0.1", "ip_dst": "2001:db8::7", "ip_src_xlated": "192.168.1.1", "dns_ips": ["10.0.0.1", "1.2.3.4"],
         "http_url": "http://api:8080/v1/users?email=a@b.c&token=xyz", "http_user_agent": "curl/8.5",
         "http_headers": [{"key": "User-Agent", "value": "curl/8.5"}, {"key": "Authorization", "value": "Bearer s3cr3t"},
                          {"key": "Accept", "value": "*/*"}],
         "src_labels": ["k8s:app=api", "k8s:team=payments"], "src_pod": "api-7d9", "src_port": 41000,
         "l4_protocol": "TCP", "dst_port": 8080},
        {"ip_src": "2001:db8::7", "ip_dst": "10.0.0.1", "http_url": "/health", "src_labels": None, "src_pod": None,
         "l4_protocol": "TCP", "src_port": 8080, "dst_port": 41000},
    ])


def test_remove_mode(ctx):
    batch = sample_flows()
    stage = RedactStage(RedactConfig(fields=["ip", "http_url_query", "http_header_values", "src_pod", "src_port"]), ctx)
    out = stage.transform(batch)
    for column in ("ip_src", "ip_dst", "ip_src_xlated", "dns_ips", "src_pod", "src_port", "http_user_agent"):
        assert out.column(column).null_count == 2, column
    assert out.column("http_url").to_pylist() == ["http://api:8080/v1/users", "/health"]
    assert out.column("http_headers")[0].as_py() == [
        {"key": "User-Agent", "value": None}, {"key": "Authorization", "value": None}, {"key": "Accept", "value": None}]
    # untouched columns stay exactly as they were
    assert out.column("community_id").equals(batch.column("community_id"))
    assert out.column("dst_port").equals(batch.column("dst_port"))
    assert out.schema == batch.schema
    assert ctx.metrics.value("flowship_redact_values_total", field="ip") == 6  # 4 addresses, 1 xlated, 1 dns_ips list
    assert ctx.metrics.value("flowship_redact_values_total", field="src_pod") == 1


def test_hash_mode_is_keyed_deterministic_and_keeps_ip_family(ctx, key_env):
    batch = sample_flows()
    stage = RedactStage(RedactConfig(fields=["ip", "src_labels", "src_pod"], mode="hash", key_env=key_env,
                                      ip_format="token"), ctx)
    out = stage.transform(batch)
    src = out.column("ip_src").to_pylist()
    dst = out.column("ip_dst").to_pylist()
    assert src == [f"ip4:{token('10.0.0.1')}", f"ip6:{token('2001:db8::7')}"]
    assert dst == [src[1], src[0]]  # the same address gives the same token in every column: joins still work
    assert out.column("dns_ips").to_pylist() == [[src[0], f"ip4:{token('1.2.3.4')}"], None]
    assert out.column("src_labels").to_pylist() == [[token("k8s:app=api"), token("k8s:team=payments")], None]
    assert out.column("src_pod").to_pylist() == [token("api-7d9"), None]
    # a new stage instance (another process, a restart) gives the same tokens
    again = RedactStage(RedactConfig(fields=["ip"], mode="hash", key_env=key_env, ip_format="token"),
                        ctx).transform(batch)
    assert again.column("ip_src").to_pylist() == src


def test_hash_options_and_special_fields(ctx, key_env):
    batch = sample_flows()
    stage = RedactStage(RedactConfig(fields=["http_url_query", "http_header_values"], mode="hash", key_env=key_env,
                                     hash_bytes=8, encoding="base64", keep_headers=["accept", "User-Agent"]), ctx)
    out = stage.transform(batch)
    url = out.column("http_url").to_pylist()
    assert url[0].startswith("http://api:8080/v1/users?") and "email" not in url[0]
    assert len(url[0].split("?", 1)[1]) == 11  # 8 bytes, unpadded base64url
    assert url[1] == "/health"
    headers = out.column("http_headers")[0].as_py()
    assert headers[0] == {"key": "User-Agent", "value": "curl/8.5"}
    assert headers[1]["key"] == "Authorization" and headers[1]["value"] not in ("Bearer s3cr3t", None)
    assert headers[2] == {"key": "Accept", "value": "*/*"}
    assert out.column("http_user_agent").to_pylist() == ["curl/8.5", None]


def test_sliced_input(ctx, key_env):
    batch = sample_flows().slice(1, 1)
    out = RedactStage(RedactConfig(fields=["ip", "src_labels"], mode="hash", key_env=key_env, ip_format="token"),
                      ctx).transform(batch)
    assert out.column("ip_src").to_pylist() == [f"ip6:{token('2001:db8::7')}"]
    assert out.column("dns_ips").to_pylist() == [None]


def test_key_from_file(ctx, tmp_path):
    path = tmp_path / "redact.key"
    path.write_bytes(KEY + b"\n")
    out = RedactStage(RedactConfig(fields=["src_pod"], mode="hash", key_file=str(path)), ctx).transform(sample_flows())
    assert out.column("src_pod").to_pylist() == [token("api-7d9"), None]


def test_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWSHIP_NO_SUCH_KEY", raising=False)
    cases = {
        "fields: [ip]\n    mode: hash": "stages[0].key_file: hash mode needs a key: set key_file or key_env",
        "fields: [ip]\n    mode: hash\n    key_env: FLOWSHIP_NO_SUCH_KEY":
            "stages[0].key_env: environment variable FLOWSHIP_NO_SUCH_KEY is not set or empty",
        f"fields: [ip]\n    mode: hash\n    key_file: {tmp_path}/missing":
            f"stages[0].key_file: cannot read key_file '{tmp_path}/missing': No such file or directory",
        "fields: [time]": "stages[0].fields[0]: 'time' cannot be redacted: every flow needs its time",
        "fields: [uuid]": "stages[0].fields[0]: 'uuid' cannot be removed (never null); use mode: hash",
        "fields: [passwords]": "stages[0].fields[0]: unknown field 'passwords'",
        "fields: []": "stages[0].fields: expected at least one field to redact",
        "fields: [src_port]\n    mode: hash\n    key_env: HOME": "stages[0].fields[0]: 'src_port' is not a text column",
        "fields: [ip]\n    mode: scramble": "stages[0].mode: expected one of 'remove', 'hash', got 'scramble'",
    }
    for body, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_text(f"stages:\n  - type: redact\n    {body}\n", "f.yaml")
        assert any(p.startswith(f"f.yaml: {message}") for p in err.value.problems), (body, err.value.problems)
    with pytest.raises(ConfigError, match="stages\\[0\\].fields: required key is missing"):
        load_text("stages:\n  - type: redact\n", "f.yaml")
