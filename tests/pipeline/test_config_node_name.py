"""``node_name`` comes from the config, from the environment (``env:NODE_NAME``) or from the hostname."""

from __future__ import annotations

import socket

import pytest

from flowship.config import ConfigError, load_text

BODY = "sources: [{type: agent}]\nsinks: [{type: parquet, path: /tmp/flowship-node-name}]\n"


def test_default_is_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "not-read-without-a-reference")
    assert load_text(BODY, "f.yaml").node_name == socket.gethostname()


def test_env_reference_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "ip-10-0-3-7.ec2.internal")
    assert load_text("node_name: env:NODE_NAME\n" + BODY, "f.yaml").node_name == "ip-10-0-3-7.ec2.internal"
    assert load_text("node_name: worker-1\n" + BODY, "f.yaml").node_name == "worker-1"


def test_file_reference_is_resolved(tmp_path) -> None:
    (tmp_path / "name").write_text("worker-2\n")
    assert load_text(f"node_name: file:{tmp_path / 'name'}\n" + BODY, "f.yaml").node_name == "worker-2"


@pytest.mark.parametrize("value,message", [
    ("", "f.yaml: node_name: 'env:NODE_NAME' resolves to an empty string"),
    (None, "f.yaml: node_name: 'env:NODE_NAME': environment variable NODE_NAME is not set"),
])
def test_unresolved_reference_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str | None, message: str) -> None:
    if value is None:
        monkeypatch.delenv("NODE_NAME", raising=False)
    else:
        monkeypatch.setenv("NODE_NAME", value)
    with pytest.raises(ConfigError) as err:
        load_text("node_name: env:NODE_NAME\n" + BODY, "f.yaml")
    assert err.value.problems == [message]
