"""DNS parsing of payload snippets (stdlib only) and query/response pairing.

:func:`parse_dns` reads a DNS message (RFC 1035) from a UDP payload, or from a
TCP payload with its 2-byte length prefix, and returns what Hubble shows for
DNS flows: the query name (lower-cased, with the trailing dot:
``isovalent.com.``), the question type, the rcode, the answer IPs (A/AAAA),
CNAME targets, the lowest TTL of those answers and the type of every answer.
It never raises: garbage, or a snippet cut before the question ends, gives a
:class:`ParseError`; a snippet cut inside the answers keeps the complete ones.

Conventions copied from Cilium's DNS proxy so that both kinds of flow look
alike: the TTL starts at 2^32-1 and is the minimum over A, AAAA and CNAME
answers (a response without such answers shows 4294967295); ``rrtypes`` has
one entry per answer record, in order; ``qtypes`` holds the first question's
type. Type names are the IANA mnemonics, ``TYPE{n}`` for unknown ones.

:class:`DnsPairer` pairs a response with its query by (connection key, DNS id)
and sets ``l7_latency_ns`` on the response.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from flowship.agent.l7_pairing import ParseError, batch_keys, rows_in_order
from flowship.model.schema import FLOW_SCHEMA

RR_TYPES: dict[int, str] = {
    1: "A", 2: "NS", 3: "MD", 4: "MF", 5: "CNAME", 6: "SOA", 7: "MB", 8: "MG", 9: "MR", 10: "NULL",
    11: "WKS", 12: "PTR", 13: "HINFO", 14: "MINFO", 15: "MX", 16: "TXT", 17: "RP", 18: "AFSDB",
    24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV", 35: "NAPTR", 36: "KX", 37: "CERT",
    39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC",
    48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP",
    59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS",
    99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR",
    253: "MAILB", 254: "MAILA", 255: "ANY", 256: "URI", 257: "CAA",
}

_MAX_QUESTIONS = 8
_MAX_RECORDS = 1024
_MAX_NAME = 255
_MAX_POINTERS = 32


def type_name(rrtype: int) -> str:
    return RR_TYPES.get(rrtype) or f"TYPE{rrtype}"


@dataclass(frozen=True, slots=True)
class DnsMessage:
    id: int
    response: bool
    opcode: int
    rcode: int
    query: str | None            # first question's name, lower-cased, with the trailing dot
    qtypes: tuple[str, ...]
    ips: tuple[str, ...]
    cnames: tuple[str, ...]
    ttl: int                     # min TTL of A/AAAA/CNAME answers, 2^32-1 if none
    rrtypes: tuple[str, ...]
    truncated: bool              # the snippet (or TC bit) cut the answers short


class _FormatError(Exception):
    pass


def _escape_label(raw: bytes) -> str:
    # Printable ASCII as is, the rest as \DDD (the zone-file form dig and Go use).
    out = []
    for b in raw:
        if b in (0x2E, 0x5C):  # "." and "\" inside a label
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def read_name(data: bytes, pos: int) -> tuple[str, int]:
    """A possibly compressed domain name at ``pos``: (name with trailing dot, position after it).

    Pointers must point strictly backwards and at most ``_MAX_POINTERS`` are
    followed, so a crafted loop ends; names longer than 255 bytes are rejected.
    """
    labels: list[str] = []
    length = 0
    end = -1
    hops = 0
    limit = pos  # a pointer must point before the name that uses it
    while True:
        if pos >= len(data):
            raise _FormatError("truncated")
        b = data[pos]
        if b & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise _FormatError("truncated")
            target = ((b & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            hops += 1
            if hops > _MAX_POINTERS or target >= limit:
                raise _FormatError("bad_pointer")
            limit = target
            pos = target
            continue
        if b & 0xC0:
            raise _FormatError("bad_label")  # 0x40/0x80: extended label types, obsolete
        if b == 0:
            pos += 1
            break
        if pos + 1 + b > len(data):
            raise _FormatError("truncated")
        length += b + 1
        if length > _MAX_NAME:
            raise _FormatError("name_too_long")
        labels.append(_escape_label(data[pos + 1:pos + 1 + b]))
        pos += 1 + b
    name = ".".join(labels) + "." if labels else "."
    return name, (end if end >= 0 else pos)


def parse_dns(data: bytes, *, tcp: bool = False) -> DnsMessage | ParseError:
    """Parse a DNS message; ``tcp=True`` when it starts with the 2-byte length."""
    try:
        return _parse(bytes(data), tcp)
    except _FormatError as bad:
        return ParseError(str(bad))
    except Exception:  # noqa: BLE001 - a parser over hostile bytes must not take the agent down
        return ParseError("internal")


def _parse(data: bytes, tcp: bool) -> DnsMessage | ParseError:
    if tcp:
        if len(data) < 2:
            return ParseError("truncated")
        declared = int.from_bytes(data[:2], "big")
        if declared < 12:
            return ParseError("not_dns")
        data = data[2:2 + declared]
    if len(data) < 12:
        return ParseError("truncated" if data else "empty")
    msg_id = int.from_bytes(data[0:2], "big")
    flags = int.from_bytes(data[2:4], "big")
    qd, an, ns, ar = (int.from_bytes(data[i:i + 2], "big") for i in (4, 6, 8, 10))
    response = bool(flags & 0x8000)
    opcode = (flags >> 11) & 0xF
    rcode = flags & 0xF
    if opcode > 6 or opcode == 3 or qd > _MAX_QUESTIONS or an + ns + ar > _MAX_RECORDS:
        return ParseError("not_dns")
    if not response and (qd == 0 or an > 0 and opcode == 0):
        return ParseError("not_dns")
    if flags & 0x0040:  # the Z bit must be zero
        return ParseError("not_dns")

    pos = 12
    query = None
    qtypes: list[str] = []
    for i in range(qd):
        name, pos = read_name(data, pos)
        if pos + 4 > len(data):
            raise _FormatError("truncated")
        qtype = int.from_bytes(data[pos:pos + 2], "big")
        pos += 4
        if i == 0:
            query = name.lower()
            qtypes.append(type_name(qtype))

    ips: list[str] = []
    cnames: list[str] = []
    rrtypes: list[str] = []
    ttl = 0xFFFFFFFF
    truncated = bool(flags & 0x0200)
    for _ in range(an):
        try:
            _, after = read_name(data, pos)
        except _FormatError as bad:
            if str(bad) != "truncated":
                raise
            truncated = True
            break
        if after + 10 > len(data):
            truncated = True
            break
        rrtype = int.from_bytes(data[after:after + 2], "big")
        rr_ttl = int.from_bytes(data[after + 4:after + 8], "big")
        rdlen = int.from_bytes(data[after + 8:after + 10], "big")
        rdata_at = after + 10
        if rdata_at + rdlen > len(data):
            truncated = True
            break
        rdata = data[rdata_at:rdata_at + rdlen]
        if rrtype == 1:
            if rdlen != 4:
                raise _FormatError("bad_rdata")
            ips.append(str(ipaddress.IPv4Address(rdata)))
            ttl = min(ttl, rr_ttl)
        elif rrtype == 28:
            if rdlen != 16:
                raise _FormatError("bad_rdata")
            ips.append(str(ipaddress.IPv6Address(rdata)))
            ttl = min(ttl, rr_ttl)
        elif rrtype == 5:
            target, _ = read_name(data[:rdata_at + rdlen], rdata_at)
            cnames.append(target.lower())
            ttl = min(ttl, rr_ttl)
        rrtypes.append(type_name(rrtype))
        pos = rdata_at + rdlen
    return DnsMessage(msg_id, response, opcode, rcode, query, tuple(qtypes), tuple(ips), tuple(cnames),
                      ttl, tuple(rrtypes), truncated)


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------

@dataclass
class DnsPairerStats:
    queries: int = 0
    responses: int = 0
    matched: int = 0
    unmatched_responses: int = 0
    expired_queries: int = 0
    evicted_queries: int = 0
    parse_errors: dict[str, int] = field(default_factory=dict)


@dataclass
class DnsColumns:
    """One entry per input row; rows that are not DNS hold None everywhere."""

    dns_query: list[str | None]
    dns_qtypes: list[list[str] | None]
    dns_rrtypes: list[list[str] | None]
    dns_ips: list[list[str] | None]
    dns_ttl: list[int | None]
    dns_cnames: list[list[str] | None]
    dns_rcode: list[int | None]
    dns_observation_source: list[str | None]
    l7_type: list[str | None]
    l7_latency_ns: list[int | None]
    parse_error: list[str | None]

    COLUMNS = ("dns_query", "dns_qtypes", "dns_rrtypes", "dns_ips", "dns_ttl", "dns_cnames", "dns_rcode",
               "dns_observation_source", "l7_type", "l7_latency_ns")

    @classmethod
    def empty(cls, n: int) -> DnsColumns:
        return cls(*([None] * n for _ in range(11)))

    def arrays(self) -> dict[str, pa.Array]:
        """Arrow arrays typed as the flow schema's columns of the same names."""
        return {name: pa.array(getattr(self, name), type=FLOW_SCHEMA.field(name).type) for name in self.COLUMNS}


class DnsPairer:
    """Pairs DNS responses with queries by (connection key, id); bounded and expiring."""

    def __init__(self, *, max_pending: int = 65536, ttl_ns: int = 30_000_000_000,
                 observation_source: str = "ebpf") -> None:
        self.max_pending = max_pending
        self.ttl_ns = ttl_ns
        self.observation_source = observation_source
        self.stats = DnsPairerStats()
        self._pending: OrderedDict[tuple[int, int], int] = OrderedDict()  # -> query timestamp

    @property
    def pending(self) -> int:
        return len(self._pending)

    def process(self, conn: np.ndarray, ts_ns: np.ndarray, payloads: Sequence[bytes | None], *,
                tcp: np.ndarray | Sequence[bool] | None = None) -> DnsColumns:
        """Parse and pair one batch of rows in capture order.

        ``tcp`` marks rows whose payload carries the TCP length prefix.
        """
        out = DnsColumns.empty(len(payloads))
        conn_l, ts_l = batch_keys(conn, ts_ns)
        tcp_l = np.asarray(tcp, dtype=bool).tolist() if tcp is not None else None
        errors = self.stats.parse_errors
        for i in rows_in_order(len(payloads), ts_l, self.expire):
            payload = payloads[i]
            if not payload:
                continue
            msg = parse_dns(payload, tcp=bool(tcp_l[i]) if tcp_l is not None else False)
            if isinstance(msg, ParseError):
                out.parse_error[i] = msg.reason
                errors[msg.reason] = errors.get(msg.reason, 0) + 1
                continue
            key = (conn_l[i], msg.id)
            out.dns_query[i] = msg.query
            out.dns_qtypes[i] = list(msg.qtypes)
            out.dns_observation_source[i] = self.observation_source
            if not msg.response:
                self.stats.queries += 1
                out.l7_type[i] = "REQUEST"
                self._pending.pop(key, None)
                self._pending[key] = ts_l[i]
                while len(self._pending) > self.max_pending:
                    self._pending.popitem(last=False)
                    self.stats.evicted_queries += 1
                continue
            self.stats.responses += 1
            out.l7_type[i] = "RESPONSE"
            out.dns_rrtypes[i] = list(msg.rrtypes)
            out.dns_ips[i] = list(msg.ips)
            out.dns_ttl[i] = msg.ttl
            out.dns_cnames[i] = list(msg.cnames)
            out.dns_rcode[i] = msg.rcode
            sent = self._pending.pop(key, None)
            if sent is None:
                self.stats.unmatched_responses += 1
            else:
                self.stats.matched += 1
                out.l7_latency_ns[i] = max(0, ts_l[i] - sent)
        return out

    def expire(self, now_ns: int) -> int:
        """Forget queries older than the TTL (no answer seen); returns how many."""
        dropped = 0
        limit = now_ns - self.ttl_ns
        while self._pending:
            key, sent = next(iter(self._pending.items()))
            if sent >= limit:
                break
            del self._pending[key]
            dropped += 1
        self.stats.expired_queries += dropped
        return dropped
