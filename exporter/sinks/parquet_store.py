"""Where the ``parquet`` sink puts finished files: a local directory or an S3 bucket.

Both stores take a function that writes the file and make the result visible in one step, so a reader
never sees a part of a file and the sink acknowledges a file's flows only once the store has it durably:

- :class:`LocalStore` writes ``.<name>.tmp``, fsyncs it, renames it into place and fsyncs the directory.
- :class:`S3Store` writes the file into memory, then uploads it with pyarrow's S3 filesystem (PutObject, or a multipart upload for big files);
  S3 makes an object visible only when its upload completes, and a success answer means it is stored.
  A failed upload is retried under the same key with backoff until it succeeds: a retry after an answer
  that was lost in transit rewrites the same bytes, so it never leaves two copies or a partial object.

Credentials for S3 come the AWS way, through the AWS SDK's default chain that pyarrow uses: the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` environment, the shared config and credentials files
(``AWS_PROFILE``), web identity (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``, as EKS's IRSA sets them)
and the instance metadata service. The config never holds a key, so none can be logged.

Beside publishing, both stores list, read, rename and delete what is under their root through one pyarrow
filesystem interface: ``flowship compact`` (:mod:`flowship.compact`) works on either through them.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowship.config import Duration
from flowship.sinks.delivery import backoff_seconds

S3_SCHEME = "s3://"
# Writes a whole Parquet file into the file object it is given.
FileWriter = Callable[[Any], None]


@dataclass
class S3Config:
    """Options of an ``s3://`` path; all optional for AWS itself."""

    endpoint_url: str = ""  # S3-compatible server, e.g. http://127.0.0.1:7070; empty = AWS
    region: str = ""  # empty: AWS_REGION / the profile's region, else us-east-1
    role_arn: str = ""  # assume this role on top of the default credentials
    request_timeout: Duration = Duration(30.0)
    initial_backoff: Duration = Duration(0.5)
    max_backoff: Duration = Duration(30.0)

    def validate(self) -> list[str]:
        problems = []
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                problems.append("endpoint_url: expected http(s)://host[:port] with no path, "
                                f"got {self.endpoint_url!r}")
        if (isinstance(self.initial_backoff, float) and isinstance(self.max_backoff, float)
                and self.initial_backoff > self.max_backoff):
            problems.append("initial_backoff: must not exceed max_backoff")
        return problems


def s3_location(path: str) -> tuple[str, str] | None:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes); None for a local path."""
    if not path.startswith(S3_SCHEME):
        return None
    bucket, _, prefix = path[len(S3_SCHEME):].partition("/")
    return bucket, prefix.strip("/")


def s3_path_problem(path: str) -> str | None:
    """What is wrong with an ``s3://`` path, for config validation."""
    location = s3_location(path)
    if location is None:
        return None
    bucket = location[0]
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in "-." for c in bucket):
        return f"path: expected s3://BUCKET[/PREFIX] with a valid bucket name, got {path!r}"
    return None


def s3_filesystem(config: S3Config, max_attempts: int = 3) -> Any:
    """pyarrow's S3 filesystem for ``config``, with credentials from the AWS default chain."""
    from pyarrow import fs  # the S3 part of Arrow initializes the AWS SDK: only when a sink needs it

    options: dict[str, Any] = {
        "request_timeout": float(config.request_timeout),
        "connect_timeout": min(10.0, float(config.request_timeout)),
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    }
    if config.endpoint_url:
        parts = urlsplit(config.endpoint_url)
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme
        options["region"] = config.region or "us-east-1"
    elif config.region:
        options["region"] = config.region
    if config.role_arn:
        options["role_arn"] = config.role_arn
    return fs.S3FileSystem(**options)


@dataclass
class StoredFile:
    key: str  # relative to the store's root, with / separators
    size: int


class ArchiveOps:
    """What a store offers besides ``put``: listing, reading, renaming and deleting under its root."""

    fs: Any  # a pyarrow.fs.FileSystem
    base: str  # the root in that filesystem's terms

    def path(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def list_files(self, under: str = "") -> list[StoredFile]:
        """Every file below ``under`` (a key prefix), sorted by key."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.path(under), recursive=True, allow_not_found=True))
        cut = len(self.base) + 1
        return sorted((StoredFile(i.path[cut:], i.size or 0) for i in infos if i.type == fs.FileType.File),
                      key=lambda f: f.key)

    def exists(self, key: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(key)).type == fs.FileType.File

    def open_input(self, key: str) -> Any:
        """A random-access file (S3: ranged reads), e.g. for ``pyarrow.parquet.ParquetFile``."""
        return self.fs.open_input_file(self.path(key))

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(self.path(key)) as src:
            return src.read()

    def delete(self, key: str) -> None:
        self.fs.delete_file(self.path(key))

    def delete_tree(self, under: str) -> None:
        """Everything below a key prefix (a partition directory)."""
        self.fs.delete_dir(self.path(under))

    def rename(self, src: str, dst: str) -> None:
        self.fs.move(self.path(src), self.path(dst))


class LocalStore(ArchiveOps):
    """Files under a directory, published by fsync + rename."""

    def __init__(self, root: str, fsync: bool, log: Any) -> None:
        from pyarrow import fs

        self.root = Path(root)
        self.fsync = fsync
        self.log = log
        self.fs = fs.LocalFileSystem()
        self.base = str(self.root.absolute())

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("**/.*.parquet.tmp"):
            self.log.warning("removing unpublished file from an earlier run", file=str(leftover))
            leftover.unlink(missing_ok=True)

    def put(self, key: str, write: FileWriter) -> int:
        """Writes the file under a hidden name, makes it durable, then gives it its name; returns its size."""
        final = self.root / key
        directory = final.parent
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{final.name}.tmp"
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        self._sync_dir(directory)
        return final.stat().st_size

    def _sync_dir(self, directory: Path) -> None:
        if self.fsync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def rename(self, src: str, dst: str) -> None:
        """Atomic on one filesystem, and durable once the directory is synced."""
        os.replace(self.root / src, self.root / dst)
        self._sync_dir((self.root / dst).parent)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)
        self._sync_dir((self.root / key).parent)

    def close(self) -> None:
        pass


class S3Store(ArchiveOps):
    """Objects under ``s3://bucket/prefix``, each uploaded whole and retried until stored.

    ``rename`` is a server-side copy then a delete (S3 has no rename): the copy is complete before the
    original goes, so a crash between the two leaves both, never neither.
    """

    def __init__(self, path: str, config: S3Config, log: Any, on_retry: Any = None) -> None:
        location = s3_location(path)
        assert location is not None
        self.bucket, self.prefix = location
        self.config = config
        self.log = log
        self.on_retry = on_retry  # called with the error kind for each failed attempt (metrics)
        self._rng = random.Random()
        # Retrying here, not in the SDK, keeps one policy (forever, with backoff) and one log line a try.
        self.fs = s3_filesystem(config, max_attempts=1)
        self.base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def describe(self, key: str) -> str:
        return f"{S3_SCHEME}{self.path(key)}"

    def start(self) -> None:
        """Fails the start when the bucket cannot be reached, so a wrong name or endpoint is said at once."""
        from pyarrow import fs

        try:
            info = self.fs.get_file_info(self.bucket)
        except OSError as exc:
            raise RuntimeError(f"S3 bucket {self.bucket!r} cannot be reached: {exc}") from exc
        if info.type == fs.FileType.NotFound:
            raise RuntimeError(f"S3 bucket {self.bucket!r} does not exist (flowship does not create buckets)")

    def put(self, key: str, write: FileWriter) -> int:
        """Uploads the file as one object, retrying until S3 has stored it; returns its size."""
        import pyarrow as pa

        buffer = pa.BufferOutputStream()
        write(buffer)
        data = buffer.getvalue()
        target = self.path(key)
        attempt = 0
        while True:
            try:
                with self.fs.open_output_stream(target, metadata={"Content-Type": "application/vnd.apache.parquet"}) as out:
                    out.write(data)
                return data.size
            except OSError as exc:
                # Until it is stored: the runtime's shutdown_timeout bounds a stop, and flows never acknowledged
                # are read again from the source's checkpoint on the next start.
                delay = backoff_seconds(attempt, float(self.config.initial_backoff), float(self.config.max_backoff),
                                        self._rng)
                attempt += 1
                if self.on_retry is not None:
                    self.on_retry("s3_error")
                self.log.warning("S3 upload failed; retrying the same object", object=self.describe(key),
                                 attempt=attempt, retry_in_s=round(delay, 2), error=str(exc)[:300])
                time.sleep(delay)

    def close(self) -> None:
        pass
