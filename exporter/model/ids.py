"""Flow identifiers: Community ID v1, deterministic uuids, connection keys.

All three are computed per *distinct* value rather than per row: IP strings
are dictionary-encoded, connection tuples are de-duplicated with numpy, and
only the distinct values go through Python-level hashing. A batch of 100k
flows typically holds a few thousand connections, so this keeps the cost
columnar.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import socket

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IANA_PROTO: dict[str, int] = {
    "ICMPv4": 1,
    "IGMP": 2,
    "TCP": 6,
    "UDP": 17,
    "ICMPv6": 58,
    "VRRP": 112,
    "SCTP": 132,
}

# ICMP type -> counterpart type, from the Community ID spec; these pairs are
# treated as one bidirectional "connection" whose ports are (type, counterpart).
_ICMP4_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMP6_PAIRS = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135, 130: 131, 131: 130,
                144: 145, 145: 144}

def _pack(ip: str) -> bytes:
    """Text IP → network-order bytes (ValueError if it is not an address)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        raise ValueError(f"not an IP address: {ip!r}") from None


def _community_id_packed(saddr: bytes, daddr: bytes, proto: int, src_port: int, dst_port: int, seed: int,
                         icmp_pairs: dict[int, int] | None) -> str:
    one_way = False
    if icmp_pairs is not None:
        icmp_type, icmp_code = src_port, dst_port
        if icmp_type in icmp_pairs:
            src_port, dst_port = icmp_type, icmp_pairs[icmp_type]
        else:
            src_port, dst_port = icmp_type, icmp_code
            one_way = True
    if one_way:
        if saddr > daddr:
            saddr, daddr = daddr, saddr
    elif (saddr, src_port) > (daddr, dst_port):
        saddr, daddr = daddr, saddr
        src_port, dst_port = dst_port, src_port
    data = seed.to_bytes(2, "big") + saddr + daddr + bytes((proto, 0))
    if proto in _PORTED_PROTOS:
        data += src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


_PORTED_PROTOS = frozenset({1, 6, 17, 58, 132})


def community_id(
    src_ip: str, dst_ip: str, proto: int, src_port: int = 0, dst_port: int = 0, seed: int = 0,
    *, icmp: bool = False, icmp_v6: bool = False,
) -> str:
    """Community ID v1 of one flow tuple (see the corelight community-id spec).

    For ICMP, ``src_port``/``dst_port`` are the ICMP type and code; they are
    mapped to the spec's (type, counterpart-type) pseudo ports here.
    """
    pairs = _ICMP6_PAIRS if icmp_v6 else _ICMP4_PAIRS if icmp else None
    return _community_id_packed(_pack(src_ip), _pack(dst_ip), proto, src_port, dst_port, seed, pairs)


def _try_pack(ip: str) -> bytes | None:
    try:
        return _pack(ip)
    except ValueError:
        return None


def _dict_indices(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Dictionary-encode a column: (int32 indices with -1 for null, distinct values)."""
    encoded = pc.dictionary_encode(column)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return indices, encoded.dictionary.to_pylist()


def _uint(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


@functools.lru_cache(maxsize=1 << 16)
def _stable_hash64(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread 64-bit mix (numpy, wraps mod 2^64)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def connection_hashes(batch: pa.RecordBatch) -> np.ndarray:
    """A direction-independent 64-bit hash of each flow's connection.

    Both directions of a TCP/UDP connection, and its L7 flows, get the same
    value; the value is the same in every process and across restarts, so it
    drives connection-consistent sampling and Kafka partitioning.
    """
    src_idx, src_vals = _dict_indices(batch.column("ip_src"))
    dst_idx, dst_vals = _dict_indices(batch.column("ip_dst"))
    src_h = np.array([_stable_hash64(v) for v in src_vals] + [0], dtype=np.uint64)[src_idx]
    dst_h = np.array([_stable_hash64(v) for v in dst_vals] + [0], dtype=np.uint64)[dst_idx]
    proto_idx, proto_vals = _dict_indices(batch.column("l4_protocol"))
    proto = np.array([IANA_PROTO.get(v, 255) for v in proto_vals] + [0], dtype=np.uint64)[proto_idx]
    sport = _uint(batch, "src_port").astype(np.uint64)
    dport = _uint(batch, "dst_port").astype(np.uint64)
    is_icmp = np.isin(proto, np.array([1, 58], dtype=np.uint64))
    if is_icmp.any():
        # An ICMP request and its reply belong together: key ICMP by addresses only.
        sport = np.where(is_icmp, np.uint64(0), sport)
        dport = np.where(is_icmp, np.uint64(0), dport)
    a = mix64(src_h ^ (sport << np.uint64(1)))
    b = mix64(dst_h ^ (dport << np.uint64(1)))
    lo = np.minimum(a, b)
    hi = np.maximum(a, b)
    return mix64(lo ^ mix64(hi ^ proto))


def community_ids(batch: pa.RecordBatch, seed: int = 0) -> pa.Array:
    """Community ID v1 for every row that has both IPs (null otherwise)."""
    n = batch.num_rows
    if n == 0:
        return pa.array([], type=pa.string())
    src_idx, src_vals = _dict_indices(batch.column("ip_src"))
    dst_idx, dst_vals = _dict_indices(batch.column("ip_dst"))
    proto_idx, proto_vals = _dict_indices(batch.column("l4_protocol"))
    sport = _uint(batch, "src_port")
    dport = _uint(batch, "dst_port")
    itype = _uint(batch, "icmp_type")
    icode = _uint(batch, "icmp_code")
    keys = np.stack([src_idx, dst_idx, proto_idx, sport, dport, itype, icode], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    src_packed = [_try_pack(v) for v in src_vals]
    dst_packed = [_try_pack(v) for v in dst_vals]
    protos = [IANA_PROTO.get(v, 0) for v in proto_vals]
    out: list[str | None] = []
    for s, d, p, sp, dp, it, ic in uniq.tolist():
        saddr = src_packed[s] if s >= 0 else None
        daddr = dst_packed[d] if d >= 0 else None
        if saddr is None or daddr is None or len(saddr) != len(daddr):
            out.append(None)  # no addresses (or not IPs): no id rather than a failure
            continue
        num = protos[p] if p >= 0 else 0
        if num == 1:
            out.append(_community_id_packed(saddr, daddr, num, it, ic, seed, _ICMP4_PAIRS))
        elif num == 58:
            out.append(_community_id_packed(saddr, daddr, num, it, ic, seed, _ICMP6_PAIRS))
        else:
            out.append(_community_id_packed(saddr, daddr, num, sp, dp, seed, None))
    return pa.array(out, type=pa.string()).take(pa.array(inverse.reshape(-1)))


_UUID_COLUMNS = (
    "time", "node_name", "verdict", "flow_type", "ip_src", "ip_dst", "l4_protocol", "src_port",
    "dst_port", "icmp_type", "tcp_flags", "is_reply", "traffic_direction", "trace_point",
    "l7_type", "http_method", "http_url", "http_code", "dns_query", "dns_rcode", "interface_index",
    "flow_event", "bytes", "packets",
)


def digest_uuid(hexdigest: str) -> str:
    """Format 32 hex digits of a hash as a uuid (version 8 "custom" layout, RFC 9562)."""
    h = hexdigest
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def content_uuid(parts: bytes) -> str:
    """A uuid derived from some bytes: same input, same id, in every process."""
    return digest_uuid(hashlib.blake2b(parts, digest_size=16).hexdigest())


def content_uuids(batch: pa.RecordBatch, rows: np.ndarray) -> list[str]:
    """Deterministic uuids for the given row indices, from the flow's content."""
    sub = batch.select(list(_UUID_COLUMNS)).take(pa.array(rows, type=pa.int64()))
    columns = []
    for col in sub.columns:
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        columns.append(col.to_pylist())
    out = []
    for values in zip(*columns, strict=False):
        out.append(content_uuid("\x1f".join("" if v is None else str(v) for v in values).encode()))
    return out


def complete(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Fill the columns every flow must have: uuid, community_id, sample_rate.

    Existing values are kept (a Hubble uuid stays the flow's id); only empty
    ones are computed.
    """
    if batch.num_rows == 0:
        return batch
    names = batch.schema.names
    columns = list(batch.columns)

    uuid_col = batch.column("uuid")
    missing = pc.or_kleene(pc.is_null(uuid_col), pc.equal(uuid_col, "")).fill_null(True)
    missing_rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    if len(missing_rows):
        values = uuid_col.to_pylist()
        for row, generated in zip(missing_rows.tolist(), content_uuids(batch, missing_rows), strict=False):
            values[row] = generated
        columns[names.index("uuid")] = pa.array(values, type=pa.string())

    cid = batch.column("community_id")
    if cid.null_count:
        computed = community_ids(batch)
        columns[names.index("community_id")] = pc.coalesce(cid, computed)

    rate = batch.column("sample_rate")
    if rate.null_count:
        columns[names.index("sample_rate")] = rate.fill_null(pa.scalar(1, pa.uint32()))
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)
