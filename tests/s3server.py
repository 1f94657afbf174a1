"""A versitygw (S3) server of a test module's own, through deploy/dev/servers with a private run directory.

Killing and restarting it never touches the shared development servers. Tests read back with
:meth:`S3Server.filesystem`, pyarrow's S3 filesystem with the server's root credentials.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pyarrow import fs

REPO = Path(__file__).resolve().parent.parent
SERVERS = REPO / "deploy" / "dev" / "servers"
ACCESS_KEY, SECRET_KEY = "flowship-test", "s3-test-secret-not-for-logs"


class S3Server:
    """A versitygw of this module's own, started and stopped (or killed) through deploy/dev/servers."""

    def __init__(self, run_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.run_dir = run_dir
        self.env = {**os.environ, "FLOWSHIP_RUN": str(run_dir), "FLOWSHIP_VERSITYGW_PORT": str(self.port),
                    "FLOWSHIP_S3_ACCESS_KEY": ACCESS_KEY, "FLOWSHIP_S3_SECRET_KEY": SECRET_KEY}
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def servers(self, verb: str) -> None:
        proc = subprocess.run([str(SERVERS), verb, "versitygw"], capture_output=True, text=True, timeout=900,
                              env=self.env, cwd=REPO)
        if proc.returncode != 0:
            pytest.fail(f"`deploy/dev/servers {verb} versitygw` (port {self.port}) failed:\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}", pytrace=False)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as in a crash or a network cut."""
        pid = int((self.run_dir / "versitygw" / "pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def filesystem(self) -> fs.S3FileSystem:
        return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=f"127.0.0.1:{self.port}",
                               scheme="http", region="us-east-1", allow_bucket_creation=True)

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name


def aws_env(**extra: str) -> dict[str, str]:
    """The environment of a flowship process reaching the server: its keys the AWS way, no metadata service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_EC2_METADATA_DISABLED": "true", **extra}

