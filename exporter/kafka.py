"""What the Kafka sink and the Kafka source share: connection and security keys, client logging.

:class:`KafkaConnectionConfig` holds the keys both write the same way (``brokers``,
``client_id``, ``security_protocol`` and the SASL/TLS keys); each component's config
extends it, so the keys sit directly in its section. Secrets (``sasl_username``,
``sasl_password``, ``ssl_key_password``) are :class:`flowship.secrets.Secret`, resolved only
when the librdkafka properties are built.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from flowship.components import Context
from flowship.secrets import Secret, reveal

SecurityProtocol = Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass
class KafkaConnectionConfig:
    """Where the brokers are and how to authenticate to them (sink and source alike)."""

    brokers: str | list[str] = "127.0.0.1:9092"
    client_id: str = "flowship"
    security_protocol: SecurityProtocol = "plaintext"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: Secret | None = None  # secrets as env:NAME or file:PATH
    sasl_password: Secret | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: Secret | None = None  # passphrase of the key

    def broker_list(self) -> str:
        return self.brokers if isinstance(self.brokers, str) else ",".join(self.brokers)

    def connection_problems(self) -> list[str]:
        if self.security_protocol.startswith("sasl") and not self.sasl_username:
            return ["sasl_username: required with a sasl_* security_protocol"]
        return []

    def client_settings(self) -> dict[str, Any]:
        """librdkafka's connection, SASL and TLS properties (secrets resolved now)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.broker_list(), "client.id": self.client_id,
                                "security.protocol": self.security_protocol}
        if self.security_protocol.startswith("sasl"):
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = reveal(self.sasl_username)
            conf["sasl.password"] = reveal(self.sasl_password)
        for prop, value in (("ssl.ca.location", self.ssl_ca_location),
                            ("ssl.certificate.location", self.ssl_certificate_location),
                            ("ssl.key.location", self.ssl_key_location)):
            if value:
                conf[prop] = value
        if self.ssl_key_password:
            conf["ssl.key.password"] = reveal(self.ssl_key_password)
        return conf


class Throttle:
    """At most one log line per key per ``interval`` seconds; says how many were held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None: stay quiet; otherwise the number of lines held back since the last one."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)


class _LibrdkafkaLog(logging.Handler):
    """librdkafka's own log lines, as structured log events (not raw text on stderr), throttled."""

    def __init__(self, log) -> None:  # noqa: ANN001 - a structlog logger
        super().__init__()
        self.log = log
        self.throttle = Throttle()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        held = self.throttle.allow(message[:80])
        if held is None:
            return
        level = "warning" if record.levelno >= logging.WARNING else "info"
        getattr(self.log, level)("kafka client log", message=message, repeated=held or None)


def client_logger(ctx: Context) -> logging.Logger:
    """A logging.Logger for confluent-kafka's ``logger`` setting, forwarding to the component's log."""
    logger = logging.getLogger(f"flowship.kafka.{ctx.name}")
    logger.propagate = False
    logger.handlers = [_LibrdkafkaLog(ctx.log)]
    logger.setLevel(logging.INFO)
    return logger


def admin_config(conf: dict[str, Any]) -> dict[str, Any]:
    keep = ("bootstrap.servers", "client.id", "security.protocol", "logger")
    return {k: v for k, v in conf.items() if k in keep or k.startswith(("sasl.", "ssl."))}
