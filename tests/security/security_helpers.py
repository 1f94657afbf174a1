"""Helpers of the security tests: a running ``flowship export``, leak searches, the dev servers."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "sinks"))

import devservers  # noqa: E402, F401  (tests/sinks/devservers.py: start if needed, never stop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: connection refused)."""
    return free_port()


def flowship(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowship.cli", "--log-format", "json", "--log-level", "debug", *args]


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **(extra or {})}


# ---------------------------------------------------------------------------------------------
# Where a secret may hide
# ---------------------------------------------------------------------------------------------

def leak_forms(secret: str) -> dict[str, bytes]:
    """The secret as text, hex, URL-encoded, and every base64 fragment that encodes it.

    Base64 of ``user:password`` (basic auth) or of anything else containing the
    secret holds, whatever the secret's offset, one of the three alignment
    fragments computed here: characters encoding only the secret's own bits.
    """
    raw = secret.encode()
    forms = {"text": raw, "hex": raw.hex().encode(), "urlencoded": urllib.parse.quote(secret, safe="").encode()}
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        first = -(-8 * shift // 6)
        last = 8 * (shift + len(raw)) // 6
        fragment = encoded[first:last]
        forms[f"base64+{shift}"] = fragment
        forms[f"base64url+{shift}"] = fragment.translate(bytes.maketrans(b"+/", b"-_"))
    return forms


def find_leaks(secrets: dict[str, str], places: dict[str, bytes]) -> list[str]:
    """``"<place>: <secret name> (<form>)"`` for every secret form found in every place."""
    found = []
    for secret_name, value in secrets.items():
        for form_name, form in leak_forms(value).items():
            for place, data in places.items():
                if form in data:
                    found.append(f"{place}: {secret_name} ({form_name})")
    return found


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root.parent)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# A running export
# ---------------------------------------------------------------------------------------------

@dataclass
class Export:
    """``flowship export`` in the background, its output in files, /metrics on a loopback port."""

    config: Path
    workdir: Path
    env: dict[str, str]
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "export.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "export.stderr"

    def start(self) -> Export:
        self.proc = subprocess.Popen(
            flowship("export", "--config", str(self.config), "--no-progress",
                     "--metrics", f"127.0.0.1:{self.metrics_port}"),
            cwd=self.workdir, env=run_env(self.env), stdin=subprocess.DEVNULL,
            stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"))
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, text: str, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def wait_until(self, done: Callable[[str], bool], what: str, timeout: float = 120.0) -> str:
        """Poll /metrics until ``done(text)``; fail with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"flowship export exited ({self.proc.returncode}) before {what}:\n"
                            + "\n".join(self.stderr().splitlines()[-30:]), pytrace=False)
            try:
                text = self.metrics_text()
            except OSError:
                text = ""
            if text and done(text):
                return text
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"timed out waiting for {what}; last metrics:\n"
                    + "\n".join(line for line in text.splitlines() if line.startswith("flowship_sink"))
                    + "\nlog tail:\n" + "\n".join(self.stderr().splitlines()[-30:]), pytrace=False)

    def stop(self, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"flowship export did not stop within {timeout:g}s of SIGTERM:\n"
                            + "\n".join(self.stderr().splitlines()[-30:]), pytrace=False)
        return self.proc.returncode


def delete_topics(brokers: str, topics: list[str]) -> None:
    """Remove a test's topics from the shared broker (best effort: a missing topic is fine)."""
    from confluent_kafka.admin import AdminClient

    futures = AdminClient({"bootstrap.servers": brokers}).delete_topics(topics, operation_timeout=10)
    for future in futures.values():
        try:
            future.result(timeout=15)
        except Exception:  # noqa: BLE001, S110 - already gone, or never created
            pass
