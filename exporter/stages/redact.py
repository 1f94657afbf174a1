"""The ``redact`` stage: remove or keyed-hash personal and secret data in flows.

``mode: remove`` sets the chosen columns to null; ``mode: hash`` replaces
each value with HMAC-SHA256(key, value) truncated to ``hash_bytes`` and
written as hex or unpadded base64url. The same value always gives the same
token (in every column, every process, every run with the same key), so
flows can still be joined and counted by the redacted value, but the value
cannot be recovered without the key.

Besides plain column names, three special fields exist:

* ``http_url_query`` — the query string (and fragment) of ``http_url``:
  removed (the path stays), or replaced by ``?`` + its hash.
* ``http_header_values`` — values of ``http_headers`` (and the
  ``http_user_agent`` column) except the headers named in ``keep_headers``.
* ``ip`` — ``ip_src``, ``ip_dst``, ``ip_src_xlated`` and the ``dns_ips`` list,
  and the addresses written inside text: the host (or any address) in
  ``http_url``, addresses in ``summary``, and ``cidr:`` labels. Hashed
  addresses keep their family visible: ``ip4:<token>`` / ``ip6:<token>``
  (``ip:<token>`` for a value that is not an address), or, with
  ``ip_format: address``, an IPv6 address in the documentation prefix
  ``2001:db8:4::/48`` (IPv4) or ``2001:db8:6::/48`` (IPv6) followed by 80
  bits of the keyed hash, which stays valid for columns typed as IP
  addresses (Elasticsearch ``ip``). Removed addresses inside text become
  ``redacted``.

``summary`` (Hubble's one-line description, which repeats the URL and
addresses) is scrubbed of the URL queries and addresses the chosen special
fields cover, so it never carries what the columns no longer do.

Work is done once per distinct value (dictionary encoding), so a batch of
64k flows hashes only its few thousand distinct addresses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowship.components import Stage
from flowship.model.schema import FLOW_SCHEMA

SPECIAL_FIELDS = ("http_url_query", "http_header_values", "ip")
IP_COLUMNS = ("ip_src", "ip_dst", "ip_src_xlated")
IP_LIST_COLUMNS = ("dns_ips",)
_NOT_REDACTABLE = {"time": "every flow needs its time"}
_NOT_NULLABLE = {f.name for f in FLOW_SCHEMA if not f.nullable}
LABEL_COLUMNS = ("src_labels", "dst_labels")
REMOVED = "redacted"  # what an address inside text becomes in remove mode
MEMO_ENTRIES = 1 << 17  # tokens remembered across batches (addresses and values repeat); then forgotten
# Hashed addresses as addresses: RFC 3849 documentation prefix, then 4 or 6 for the family.
_ADDRESS_PREFIX = {4: bytes.fromhex("20010db80004"), 6: bytes.fromhex("20010db80006")}
# Runs of characters an address is written with; each run is checked with inet_pton.
_ADDRESS_RUN = re.compile(r"[0-9A-Fa-f:.]{3,}")
_IPV4_IN_RUN = re.compile(r"(?<![0-9])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")
# A URL (or path) with a query or fragment, inside free text.
_URL_WITH_QUERY = re.compile(r"(?:[a-zA-Z][a-zA-Z0-9+.-]*://|/)[^\s?#]*[?#]\S*")


def load_key(key_file: str | None, key_env: str | None) -> bytes:
    """The HMAC key from a file (trailing newline ignored) or an environment variable."""
    if key_file and key_env:
        raise ValueError("set key_file or key_env, not both")
    if key_file:
        try:
            key = Path(key_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read key_file {key_file!r}: {exc.strerror}") from None
        if not key:
            raise ValueError(f"key_file {key_file!r} is empty")
        return key
    if key_env:
        value = os.environ.get(key_env)
        if not value:
            raise ValueError(f"environment variable {key_env} is not set or empty")
        return value.encode()
    raise ValueError("hash mode needs a key: set key_file or key_env")


@dataclass
class RedactConfig:
    """``type: redact`` — null out or hash columns."""

    fields: list[str]
    mode: Literal["remove", "hash"] = "remove"
    key_file: str | None = None
    key_env: str | None = None
    hash_bytes: int = 16
    encoding: Literal["hex", "base64"] = "hex"
    keep_headers: list[str] = field(default_factory=list)
    ip_format: Literal["token", "address"] = "address"  # hash mode: "ip4:<token>" or an address in 2001:db8::/32

    def validate(self) -> list[str]:
        problems = []
        for i, name in enumerate(self.fields or []):
            if name in SPECIAL_FIELDS:
                continue
            if name not in FLOW_SCHEMA.names:
                problems.append(f"fields[{i}]: unknown field {name!r} (a flow column or one of: "
                                f"{', '.join(SPECIAL_FIELDS)})")
            elif name in _NOT_REDACTABLE:
                problems.append(f"fields[{i}]: {name!r} cannot be redacted: {_NOT_REDACTABLE[name]}")
            elif self.mode == "remove" and name in _NOT_NULLABLE:
                problems.append(f"fields[{i}]: {name!r} cannot be removed (never null); use mode: hash")
            elif self.mode == "hash" and not _hashable(FLOW_SCHEMA.field(name).type):
                problems.append(f"fields[{i}]: {name!r} is not a text column, so it cannot be hashed; "
                                "redact it in a stage with mode: remove")
        if not self.fields:
            problems.append("fields: expected at least one field to redact")
        if isinstance(self.hash_bytes, int) and not 4 <= self.hash_bytes <= 32:
            problems.append(f"hash_bytes: expected an integer 4..32, got {self.hash_bytes}")
        if self.mode == "hash":
            try:
                load_key(self.key_file, self.key_env)
            except ValueError as exc:
                where = "key_env" if self.key_env and not self.key_file else "key_file"
                problems.append(f"{where}: {exc}")
        return problems


def _hashable(tp: pa.DataType) -> bool:
    return (pa.types.is_string(tp) or (pa.types.is_list(tp) and pa.types.is_string(tp.value_type))
            or (pa.types.is_list(tp) and pa.types.is_struct(tp.value_type)))


def _address(value: str) -> tuple[int, str] | None:
    """(4 or 6, canonical text) of an IP address literal; None for anything else."""
    family = socket.AF_INET6 if ":" in value else socket.AF_INET
    try:
        return (6 if family == socket.AF_INET6 else 4), socket.inet_ntop(family, socket.inet_pton(family, value))
    except (OSError, ValueError):
        return None


def _remembered(memo: dict[str, str], value: str, fn: Callable[[str], str]) -> str:
    out = memo.get(value)
    if out is None:
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        out = memo[value] = fn(value)
    return out


def _map_distinct(array: pa.Array, fn: Callable[[str], str | None]) -> pa.Array:
    """Apply ``fn`` to each distinct string of ``array`` (nulls stay null)."""
    if len(array) == 0:
        return array
    encoded = pc.dictionary_encode(array)
    mapped = pa.array([fn(v) for v in encoded.dictionary.to_pylist()], type=pa.string())
    return mapped.take(encoded.indices)


def _list_parts(array: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(offsets starting at 0, the child values those offsets address)."""
    offsets = array.offsets
    first = offsets[0].as_py()
    last = offsets[-1].as_py()
    return pc.subtract(offsets, first), array.values.slice(first, last - first)


def _rebuild_list(array: pa.Array, offsets: pa.Array, values: pa.Array) -> pa.Array:
    mask = array.is_null() if array.null_count else None
    return pa.ListArray.from_arrays(offsets, values, type=array.type, mask=mask)


class RedactStage(Stage):
    """Applies the configured redactions column by column."""

    def __init__(self, config: RedactConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self._key = load_key(config.key_file, config.key_env) if config.mode == "hash" else b""
        self._keep = {h.lower() for h in config.keep_headers}
        self._tokens: dict[str, str] = {}
        self._ip_tokens: dict[str, str] = {}
        self._texts: dict[str, str] = {}
        self._counter = ctx.metrics.counter("flowship_redact_values_total",
                                            "Values a redact stage removed or hashed, by field.",
                                            ["stage", "field"])

    # -------------------------------------------------------------------------------- tokens
    def token(self, value: str) -> str:
        return _remembered(self._tokens, value, self._token)

    def _token(self, value: str) -> str:
        digest = hmac.new(self._key, value.encode(), hashlib.sha256).digest()[: self.config.hash_bytes]
        if self.config.encoding == "hex":
            return digest.hex()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def ip_token(self, value: str) -> str:
        return _remembered(self._ip_tokens, value, self._ip_token)

    def _ip_token(self, value: str) -> str:
        address = _address(value)
        if address is None:
            return f"ip:{self.token(value)}"
        version, canonical = address
        if self.config.ip_format == "address":
            digest = hmac.new(self._key, canonical.encode(), hashlib.sha256).digest()[:10]
            return socket.inet_ntop(socket.AF_INET6, _ADDRESS_PREFIX[version] + digest)
        return f"ip{version}:{self.token(canonical)}"

    def _address_in_text(self, value: str, in_authority: bool) -> str:
        if self.config.mode == "remove":
            return REMOVED
        out = self.ip_token(value)
        # a URL host that was an IPv4 address: bracket the token so the port stays apart from it
        return f"[{out}]" if in_authority and ":" not in value else out

    def scrub_addresses(self, text: str) -> str:
        """Every IPv4/IPv6 address written in ``text`` replaced by its token (or ``redacted``)."""
        return _remembered(self._texts, text, self._scrub_addresses)

    def _scrub_addresses(self, text: str) -> str:
        def one(match: re.Match) -> str:
            run = match.group()
            start = match.start()
            authority = text[max(0, start - 2):start] == "//" or text[start - 1:start] == "@"
            for candidate in (run, run.rstrip(".:")):
                if candidate and _address(candidate) is not None:
                    return self._address_in_text(candidate, authority) + run[len(candidate):]
            return _IPV4_IN_RUN.sub(lambda m: self._address_in_text(m.group(), authority and m.start() == 0)
                                    if _address(m.group()) is not None else m.group(), run)

        return _ADDRESS_RUN.sub(one, text)

    def scrub_queries(self, text: str) -> str:
        """URL queries (and fragments) inside free text, handled as ``http_url_query`` handles ``http_url``."""
        if self.config.mode == "remove":
            return _URL_WITH_QUERY.sub(lambda m: re.sub(r"[?#].*$", "", m.group()), text)
        return _URL_WITH_QUERY.sub(lambda m: self.query_token(m.group()), text)

    def cidr_label(self, label: str) -> str:
        """``cidr:<address>/<bits>`` labels (Cilium writes IPv6 with ``-`` for ``:``) with the address hashed."""
        if not label.startswith("cidr:"):
            return label
        address, slash, bits = label[5:].partition("/")
        if _address(address) is None and _address(address.replace("-", ":")) is not None:
            address = address.replace("-", ":")
        if _address(address) is None:
            return label
        replaced = REMOVED if self.config.mode == "remove" else self.ip_token(address)
        return f"cidr:{replaced}{slash}{bits}"

    def query_token(self, url: str) -> str:
        cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
        if cut < 0:
            return url
        return f"{url[:cut]}?{self.token(url[cut + 1:])}"

    def _scrub_summary(self, text: str) -> str:
        if "http_url_query" in self.config.fields:
            text = self.scrub_queries(text)
        if "ip" in self.config.fields:
            text = self.scrub_addresses(text)
        return text

    # ------------------------------------------------------------------------------ columns
    def _strings(self, array: pa.Array, fn: Callable[[str], str]) -> pa.Array:
        if self.config.mode == "remove":
            return pa.nulls(len(array), array.type)
        return _map_distinct(array, fn)

    def _string_list(self, array: pa.Array, fn: Callable[[str], str]) -> pa.Array:
        if self.config.mode == "remove":
            return pa.nulls(len(array), array.type)
        offsets, values = _list_parts(array)
        return _rebuild_list(array, offsets, _map_distinct(values, fn))

    def _headers(self, array: pa.Array, only_values: bool) -> pa.Array:
        if not only_values and self.config.mode == "remove":
            return pa.nulls(len(array), array.type)
        offsets, values = _list_parts(array)
        keys = pc.struct_field(values, "key")
        vals = pc.struct_field(values, "value")
        if self._keep:
            keep = pc.is_in(pc.utf8_lower(keys), value_set=pa.array(sorted(self._keep), pa.string()))
        else:
            keep = pa.array(np.zeros(len(values), dtype=bool))
        if self.config.mode == "remove":
            replaced = pa.nulls(len(vals), pa.string())
        else:
            replaced = _map_distinct(vals, self.token)
        new_values = pc.if_else(keep.fill_null(False), vals, replaced)
        struct = pa.StructArray.from_arrays([keys, new_values], fields=list(array.type.value_type))
        return _rebuild_list(array, offsets, struct)

    def transform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_rows == 0:
            return batch
        names = batch.schema.names
        columns = dict(zip(names, batch.columns, strict=True))
        counts: dict[str, int] = {}

        def count(field_name: str, array: pa.Array) -> None:
            counts[field_name] = counts.get(field_name, 0) + len(array) - array.null_count

        fields = self.config.fields
        # URL queries first, so a query's token is the same in http_url and in summary
        for name in sorted(fields, key=lambda n: n == "ip"):
            if name == "ip":
                for col in IP_COLUMNS:
                    count(name, columns[col])
                    columns[col] = self._strings(columns[col], self.ip_token)
                for col in IP_LIST_COLUMNS:
                    count(name, columns[col])
                    columns[col] = self._string_list(columns[col], self.ip_token)
                if "http_url" not in fields:
                    columns["http_url"] = _map_distinct(columns["http_url"], self.scrub_addresses)
                for col in LABEL_COLUMNS:
                    if col in fields or columns[col].null_count == len(columns[col]):
                        continue
                    offsets, values = _list_parts(columns[col])
                    if pc.any(pc.starts_with(values, "cidr:")).as_py():
                        columns[col] = _rebuild_list(columns[col], offsets, _map_distinct(values, self.cidr_label))
            elif name == "http_url_query":
                url = columns["http_url"]
                count(name, url)
                if self.config.mode == "remove":
                    columns["http_url"] = pc.replace_substring_regex(url, r"[?#].*$", "")
                else:
                    columns["http_url"] = _map_distinct(url, self.query_token)
            elif name == "http_header_values":
                count(name, columns["http_headers"])
                columns["http_headers"] = self._headers(columns["http_headers"], only_values=True)
                if "user-agent" not in self._keep:
                    count(name, columns["http_user_agent"])
                    columns["http_user_agent"] = self._strings(columns["http_user_agent"], self.token)
            else:
                array = columns[name]
                count(name, array)
                tp = array.type
                if pa.types.is_list(tp) and pa.types.is_struct(tp.value_type):
                    columns[name] = self._headers(array, only_values=False)
                elif pa.types.is_list(tp):
                    columns[name] = self._string_list(array, self.token)
                elif pa.types.is_string(tp):
                    columns[name] = self._strings(array, self.token)
                else:
                    columns[name] = pa.nulls(len(array), tp)
        if "summary" not in fields and ("ip" in fields or "http_url_query" in fields):
            columns["summary"] = _map_distinct(columns["summary"], self._scrub_summary)
        for field_name, n in counts.items():
            if n:
                self._counter.labels(self.ctx.name, field_name).inc(n)
        return pa.RecordBatch.from_arrays([columns[n] for n in names], schema=batch.schema)
