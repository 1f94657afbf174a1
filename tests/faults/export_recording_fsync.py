"""``flowship export`` that records every fsync under a directory, so a test can simulate a power cut.

A power cut keeps what was fsync'd and may lose the rest. This runs the
CLI's ``export`` unchanged, except that ``os.fsync`` appends
``<path>\\t<size>`` to ``FSYNC_LOG`` (opened O_APPEND; each line is written
with one ``write`` after the real fsync returned and before the caller goes
on, so it survives a ``kill -9`` and never names more than was on disk) for
every file under ``FSYNC_WATCH``. After killing the process, the test cuts
each file back to its last recorded size: what a power cut could leave.

    FSYNC_WATCH=DIR FSYNC_LOG=FILE python3 tests/faults/export_recording_fsync.py --config FILE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flowship import cli  # noqa: E402

WATCH = os.path.realpath(os.environ["FSYNC_WATCH"]) + os.sep
LOG_FD = os.open(os.environ["FSYNC_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_real_fsync = os.fsync


def _recording_fsync(fd: int) -> None:
    _real_fsync(fd)
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    if path.startswith(WATCH):
        os.write(LOG_FD, f"{path}\t{os.fstat(fd).st_size}\n".encode())


os.fsync = _recording_fsync

if __name__ == "__main__":
    sys.exit(cli.main(["--log-format", "json", "export", "--no-progress", *sys.argv[1:]]))
