"""flowship.secrets.Secret: what the config parser builds for credential fields."""

from __future__ import annotations

import pytest

from flowship.config import ConfigError, load_text, parse, secret_problems
from flowship.secrets import Secret
from flowship.sinks.loki import LokiSinkConfig


def test_repr_and_str_never_show_a_value():
    literal = Secret("literal-Zx81-SECRET")
    assert "Zx81" not in repr(literal) and "Zx81" not in str(literal) and "Zx81" not in f"{literal}"
    assert repr(Secret("env:LOKI_TOKEN")) == "Secret('env:LOKI_TOKEN')"
    assert Secret("file:/run/token").reference == "file:/run/token" and literal.reference is None


def test_reveal_resolves_env_and_file_references(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWSHIP_TEST_SECRET", "from-env")
    (tmp_path / "token").write_text("from-file\n")
    assert Secret("env:FLOWSHIP_TEST_SECRET").reveal() == "from-env"
    assert Secret(f"file:{tmp_path / 'token'}").reveal() == "from-file"
    assert Secret("plain").reveal() == "plain"
    monkeypatch.delenv("FLOWSHIP_TEST_SECRET")
    with pytest.raises(ValueError, match="FLOWSHIP_TEST_SECRET is not set"):
        Secret("env:FLOWSHIP_TEST_SECRET").reveal()


def test_parser_builds_secrets_and_keeps_the_string_rules():
    config = parse(LokiSinkConfig, {"username": "u", "password": "env:PW", "headers": {"X-Token": 1234}}, "t")
    assert config.password == Secret("env:PW") and config.headers["X-Token"] == Secret("1234")
    assert config.bearer_token is None
    with pytest.raises(ConfigError) as err:
        parse(LokiSinkConfig, {"bearer_token": ["a"]}, "t.yaml", "sinks[0]")
    assert str(err.value) == "t.yaml: sinks[0].bearer_token: expected a string, got list ['a']"


def test_unresolved_references_are_named_by_key_path(monkeypatch):
    monkeypatch.delenv("FLOWSHIP_TEST_UNSET", raising=False)
    config = load_text("sources: [{type: stdin}]\nsinks:\n  - type: loki\n    headers: {X-Token: env:FLOWSHIP_TEST_UNSET}\n"
                       "  - type: kafka\n    sasl_password: file:/nonexistent/pw\n", "c.yaml")
    assert secret_problems(config) == [
        "c.yaml: sinks[0].headers.X-Token: environment variable FLOWSHIP_TEST_UNSET is not set",
        "c.yaml: sinks[1].sasl_password: file /nonexistent/pw is missing or unreadable"]
