"""DNS message parsing and query/response pairing (agent/l7_dns.py).

Messages are built byte by byte per RFC 1035 here, and cross-checked against
dnspython (a test-only dependency) for messages it builds itself.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowship.agent.l7_dns import DnsMessage, DnsPairer, ParseError, parse_dns, read_name, type_name
from flowship.model.schema import FLOW_SCHEMA


def qname(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def header(msg_id: int, flags: int, qd: int, an: int, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", msg_id, flags, qd, an, ns, ar)


def rr(name: bytes, rrtype: int, ttl: int, rdata: bytes) -> bytes:
    return name + struct.pack("!HHIH", rrtype, 1, ttl, len(rdata)) + rdata


QUERY = header(0x1234, 0x0100, 1, 0) + qname("Isovalent.com") + struct.pack("!HH", 1, 1)

# www.isovalent.com CNAME isovalent.com; A 1.2.3.4 and 5.6.7.8; uses compression pointers.
_Q = qname("www.isovalent.com")
RESPONSE = (header(0x1234, 0x8180, 1, 3) + _Q + struct.pack("!HH", 1, 1)
            + rr(b"\xc0\x0c", 5, 300, b"\xc0\x10")              # CNAME -> pointer to "isovalent.com"
            + rr(b"\xc0\x10", 1, 60, bytes([1, 2, 3, 4]))
            + rr(b"\xc0\x10", 1, 45, bytes([5, 6, 7, 8])))


def test_query() -> None:
    assert parse_dns(QUERY) == DnsMessage(
        id=0x1234, response=False, opcode=0, rcode=0, query="isovalent.com.", qtypes=("A",), ips=(),
        cnames=(), ttl=0xFFFFFFFF, rrtypes=(), truncated=False)


def test_response_with_cname_and_pointers() -> None:
    msg = parse_dns(RESPONSE)
    assert msg.response and msg.rcode == 0
    assert msg.query == "www.isovalent.com."
    assert msg.cnames == ("isovalent.com.",)
    assert msg.ips == ("1.2.3.4", "5.6.7.8")
    assert msg.ttl == 45
    assert msg.rrtypes == ("CNAME", "A", "A")


def test_aaaa_nxdomain_and_nodata() -> None:
    q = qname("productpage.bookinfo.svc.cluster.local")
    nodata = header(7, 0x8180, 1, 0) + q + struct.pack("!HH", 28, 1)
    msg = parse_dns(nodata)
    assert (msg.query, msg.qtypes, msg.ips, msg.ttl, msg.rcode) == (
        "productpage.bookinfo.svc.cluster.local.", ("AAAA",), (), 4294967295, 0)
    nx = header(8, 0x8183, 1, 0, 1) + q + struct.pack("!HH", 1, 1) + rr(b"\xc0\x0c", 6, 30, b"\x00" * 22)
    assert parse_dns(nx).rcode == 3
    v6 = (header(9, 0x8180, 1, 1) + q + struct.pack("!HH", 28, 1)
          + rr(b"\xc0\x0c", 28, 30, bytes.fromhex("fd000000000000000000000000000001")))
    assert parse_dns(v6).ips == ("fd00::1",)


def test_tcp_length_prefix() -> None:
    framed = struct.pack("!H", len(RESPONSE)) + RESPONSE
    assert parse_dns(framed, tcp=True) == parse_dns(RESPONSE)
    # the prefix announces more than the snippet holds: the answers cut short are flagged
    cut = framed[:len(framed) - 3]
    msg = parse_dns(cut, tcp=True)
    assert msg.truncated and msg.ips == ("1.2.3.4",)
    assert parse_dns(b"\x00", tcp=True) == ParseError("truncated")
    assert parse_dns(b"\x00\x05abcde", tcp=True) == ParseError("not_dns")


def test_truncation_at_every_length() -> None:
    question_end = 12 + len(_Q) + 4
    full = parse_dns(RESPONSE)
    for n in range(len(RESPONSE) + 1):
        msg = parse_dns(RESPONSE[:n])
        if n == 0:
            assert msg == ParseError("empty")
        elif n < question_end:
            assert msg == ParseError("truncated"), n
        else:
            assert isinstance(msg, DnsMessage), n
            assert msg.query == "www.isovalent.com."
            assert msg.truncated == (n < len(RESPONSE))
            # complete answers only, in order
            assert full.rrtypes[:len(msg.rrtypes)] == msg.rrtypes
            assert full.ips[:len(msg.ips)] == msg.ips


def test_pointer_loops_and_bad_names() -> None:
    # a pointer to itself, a pointer forward, two pointers pointing at each other
    self_loop = header(1, 0x0100, 1, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    assert parse_dns(self_loop) == ParseError("bad_pointer")
    forward = header(1, 0x0100, 1, 0) + b"\xc0\x20" + b"\x00" * 40
    assert parse_dns(forward) == ParseError("bad_pointer")
    data = b"\x00" * 12 + b"\xc0\x0e" + b"\xc0\x0c"
    with pytest.raises(Exception, match="bad_pointer"):
        read_name(data, 14)
    too_long = header(1, 0x0100, 1, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00" + struct.pack("!HH", 1, 1)
    assert parse_dns(too_long) == ParseError("name_too_long")
    extended = header(1, 0x0100, 1, 0) + b"\x41abc"
    assert parse_dns(extended) == ParseError("bad_label")


def test_label_escaping_and_root() -> None:
    assert read_name(b"\x03a.b\x02\x00\xff\x00", 0) == ("a\\.b.\\000\\255.", 8)
    assert read_name(b"\x00", 0) == (".", 1)


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00",          # TLS
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                          # HTTP
    header(1, 0x7800, 1, 0) + QUERY[12:],                          # opcode 15
    header(1, 0x0100, 0, 0),                                        # a query with no question
    header(1, 0x0100, 200, 0) + QUERY[12:],                         # absurd counts
    header(1, 0x0140, 1, 0) + QUERY[12:],                           # Z bit set
])
def test_not_dns(data: bytes) -> None:
    assert parse_dns(data) == ParseError("not_dns")


def test_type_names() -> None:
    assert [type_name(t) for t in (1, 28, 5, 33, 65, 255, 65280)] == ["A", "AAAA", "CNAME", "SRV", "HTTPS", "ANY",
                                                                       "TYPE65280"]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([b"", QUERY[:12], RESPONSE[:12], RESPONSE[:40]]), st.binary(max_size=300), st.booleans())
def test_fuzz_never_raises(prefix: bytes, tail: bytes, tcp: bool) -> None:
    msg = parse_dns(prefix + tail, tcp=tcp)
    assert isinstance(msg, (DnsMessage, ParseError))
    assert msg != ParseError("internal")


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=12, max_value=len(RESPONSE) - 1), st.integers(min_value=0, max_value=255))
def test_fuzz_one_byte_changed(pos: int, value: int) -> None:
    data = bytearray(RESPONSE)
    data[pos] = value
    msg = parse_dns(bytes(data))
    assert isinstance(msg, (DnsMessage, ParseError)) and msg != ParseError("internal")


# -- cross-check with dnspython ---------------------------------------------------------------

def _dnspython():
    try:
        import dns.message
        import dns.rrset
    except ImportError:
        pytest.fail("dnspython is needed for this test: pip install dnspython (test-only dependency)")
    return dns


def test_against_dnspython() -> None:
    dns = _dnspython()
    query = dns.message.make_query("Api.Example.ORG", "AAAA", id=4242)
    msg = parse_dns(query.to_wire())
    assert (msg.id, msg.response, msg.query, msg.qtypes) == (4242, False, "api.example.org.", ("AAAA",))

    resp = dns.message.make_response(query)
    resp.answer.append(dns.rrset.from_text("api.example.org.", 120, "IN", "CNAME", "edge.example.net."))
    resp.answer.append(dns.rrset.from_text("edge.example.net.", 20, "IN", "AAAA", "2001:db8::1", "2001:db8::2"))
    resp.answer.append(dns.rrset.from_text("edge.example.net.", 5, "IN", "TXT", '"not an address"'))
    wire = resp.to_wire()
    msg = parse_dns(wire)
    assert msg.response and msg.id == 4242
    assert msg.cnames == ("edge.example.net.",)
    assert sorted(msg.ips) == ["2001:db8::1", "2001:db8::2"]  # dnspython writes an rdataset in set order
    assert msg.ttl == 20  # TXT answers do not count, as in Cilium
    assert msg.rrtypes == ("CNAME", "AAAA", "AAAA", "TXT")
    tcp = parse_dns(struct.pack("!H", len(wire)) + wire, tcp=True)
    assert tcp == msg
    nx = dns.message.make_response(query)
    nx.set_rcode(dns.rcode.NXDOMAIN)
    assert parse_dns(nx.to_wire()).rcode == 3


# -- pairing ------------------------------------------------------------------------------

def test_pairer_latency_and_columns() -> None:
    pairer = DnsPairer(observation_source="ebpf")
    other_id = bytearray(QUERY)
    other_id[0:2] = b"\x99\x99"
    out = pairer.process(
        np.array([5, 5, 6, 5, 5], dtype=np.uint64),
        np.array([1000, 1100, 1200, 1700, 1800]),
        [QUERY, bytes(other_id), b"junk", RESPONSE, None],
    )
    assert out.l7_type == ["REQUEST", "REQUEST", None, "RESPONSE", None]
    assert out.l7_latency_ns == [None, None, None, 700, None]
    assert out.parse_error[2] == "truncated"
    assert out.dns_query[3] == "www.isovalent.com."
    assert out.dns_ttl == [None, None, None, 45, None]
    assert out.dns_observation_source[0] == "ebpf"
    assert out.dns_ips[0] is None and out.dns_rcode[0] is None  # requests carry what Hubble's do
    assert pairer.stats.matched == 1 and pairer.pending == 1
    arrays = out.arrays()
    for name, arr in arrays.items():
        assert arr.type == FLOW_SCHEMA.field(name).type, name
    assert arrays["dns_ips"].to_pylist()[3] == ["1.2.3.4", "5.6.7.8"]
    assert arrays["dns_rrtypes"].to_pylist()[3] == ["CNAME", "A", "A"]

    again = pairer.process(np.array([5], dtype=np.uint64), np.array([1900]), [RESPONSE])
    assert again.l7_latency_ns == [None]  # the query was answered already
    assert pairer.stats.unmatched_responses == 1


def test_pairer_bounds_and_expiry() -> None:
    pairer = DnsPairer(max_pending=2, ttl_ns=1000)
    queries = []
    for i in range(3):
        q = bytearray(QUERY)
        q[0:2] = i.to_bytes(2, "big")
        queries.append(bytes(q))
    pairer.process(np.array([1, 1, 1], dtype=np.uint64), np.array([10, 20, 30]), queries)
    assert pairer.pending == 2 and pairer.stats.evicted_queries == 1
    pairer.process(np.array([2], dtype=np.uint64), np.array([1025]), [QUERY])
    assert pairer.stats.expired_queries == 1  # id 1 at ts 20 expired, id 2 at ts 30 kept
    assert pairer.pending == 2
