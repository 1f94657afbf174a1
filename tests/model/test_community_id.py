"""Community ID v1 against the spec's published baseline vectors (corelight/community-id-spec)."""

from __future__ import annotations

import pytest

from flowship.model.ids import community_id, community_ids
from flowship.model.schema import flows_from_rows

# baseline/baseline_deflt.json of the spec repository (seed 0): proto, saddr, daddr, sport, dport, id.
# For ICMP the spec lists the (type, counterpart-or-code) pseudo ports.
BASELINE = [
    (58, "fe80::200:86ff:fe05:80da", "fe80::260:97ff:fe07:69ea", 135, 136, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY="),
    (58, "fe80::260:97ff:fe07:69ea", "fe80::200:86ff:fe05:80da", 136, 135, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY="),
    (58, "fe80::260:97ff:fe07:69ea", "fe80::200:86ff:fe05:80da", 135, 136, "1:zavyT/cezQr1fmImYCwYnMXbgck="),
    (58, "fe80::200:86ff:fe05:80da", "fe80::260:97ff:fe07:69ea", 136, 135, "1:zavyT/cezQr1fmImYCwYnMXbgck="),
    (58, "3ffe:501:1800:2345::2", "3ffe:507:0:1:200:86ff:fe05:80da", 3, 0, "1:2ObVBgIn28oZvibYZhZMBgh7WdQ="),
    (58, "3ffe:501:410:0:2c0:dfff:fe47:33e", "3ffe:507:0:1:200:86ff:fe05:80da", 1, 4, "1:hLZd0XGWojozrvxqE0dWB1iM6R0="),
    (58, "3ffe:507:0:1:200:86ff:fe05:80da", "3ffe:501:0:1001::2", 128, 129, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg="),
    (58, "3ffe:501:0:1001::2", "3ffe:507:0:1:200:86ff:fe05:80da", 129, 128, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg="),
    (58, "fe80::200:86ff:fe05:80da", "ff02::2", 133, 134, "1:hO+sN4H+MG5MY/8hIrXPqc4ZQz0="),
    (58, "fe80::260:97ff:fe07:69ea", "ff02::1", 134, 133, "1:pkvHqCL88/tg1k4cPigmZXUtL00="),
    (1, "192.168.0.89", "192.168.0.1", 8, 0, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
    (1, "192.168.0.1", "192.168.0.89", 0, 8, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
    (1, "10.0.0.1", "10.0.0.2", 11, 0, "1:YHxtAirCG//0OzkcVAukqKQN9xM="),
    (6, "2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a", 63943, 25, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    (6, "2607:f8b0:400c:c03::1a", "2001:470:e5bf:dead:4957:2174:e82c:4887", 25, 63943, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    (132, "192.168.170.8", "192.168.170.56", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
    (132, "192.168.170.56", "192.168.170.8", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
    (6, "128.232.110.120", "66.35.250.204", 34855, 80, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (6, "66.35.250.204", "128.232.110.120", 80, 34855, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (17, "192.168.1.52", "8.8.8.8", 54585, 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (17, "8.8.8.8", "192.168.1.52", 53, 54585, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (46, "10.1.12.1", "10.1.12.2", None, None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="),
    (46, "10.1.12.2", "10.1.12.1", None, None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="),
]
_PAIRED = {8, 0, 13, 14, 15, 16, 10, 9, 17, 18, 128, 129, 133, 134, 135, 136, 130, 131, 144, 145}


def _icmp_fields(sport: int, dport: int) -> tuple[int, int]:
    """The packet's (type, code) behind the spec's pseudo ports."""
    return (sport, 0) if sport in _PAIRED else (sport, dport)


@pytest.mark.parametrize("proto,saddr,daddr,sport,dport,expected", BASELINE)
def test_spec_baseline_vectors(proto, saddr, daddr, sport, dport, expected):
    if proto in (1, 58):
        icmp_type, icmp_code = _icmp_fields(sport, dport)
        got = community_id(saddr, daddr, proto, icmp_type, icmp_code, icmp=proto == 1, icmp_v6=proto == 58)
    else:
        got = community_id(saddr, daddr, proto, sport or 0, dport or 0)
    assert got == expected


def test_batch_computation_matches_scalar_for_every_vector():
    names = {1: "ICMPv4", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
    rows, expected = [], []
    for proto, saddr, daddr, sport, dport, cid in BASELINE:
        if proto not in names:
            continue
        row = {"time": 1, "ip_src": saddr, "ip_dst": daddr, "l4_protocol": names[proto]}
        if proto in (1, 58):
            row["icmp_type"], row["icmp_code"] = _icmp_fields(sport, dport)
        else:
            row["src_port"], row["dst_port"] = sport, dport
        rows.append(row)
        expected.append(cid)
    batch = flows_from_rows(rows)
    assert community_ids(batch).to_pylist() == expected
    assert batch.column("community_id").to_pylist() == expected


def test_flows_without_ips_have_no_community_id():
    batch = flows_from_rows([{"time": 1, "l4_protocol": "TCP", "src_port": 1, "dst_port": 2}])
    assert batch.column("community_id").to_pylist() == [None]
