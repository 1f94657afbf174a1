"""NETLINK_ROUTE framing shared by the interface watcher (attach.py) and address detection (enrich.py).

Messages are a ``struct nlmsghdr`` and a body padded to 4 bytes; attributes are ``struct rtattr`` and a value
padded the same way. Only what those two readers need: dump requests, splitting one read into messages, and
the attributes of one message.
"""

from __future__ import annotations

import os
import struct

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300

NLMSGHDR = struct.Struct("=IHHII")  # struct nlmsghdr: length, type, flags, sequence, port id
RTATTR = struct.Struct("=HH")  # struct rtattr: length, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def dump_request(mtype: int, seq: int, body: bytes) -> bytes:
    """A request to dump every object of a kind (RTM_GETLINK, RTM_GETADDR)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def messages(data: bytes, what: str) -> tuple[list[tuple[int, int, int]], bool]:
    """(type, body start, message end) of each message of one read, and whether a dump ended in it.

    An error message with a non-zero code raises OSError; ``what`` names the request in its text.
    """
    out: list[tuple[int, int, int]] = []
    done = False
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size:
            break
        body, end = off + NLMSGHDR.size, off + length
        if mtype == NLMSG_DONE:
            done = True
        elif mtype == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, body)
            if code:
                raise OSError(-code, f"{what}: {os.strerror(-code)}")
        else:
            out.append((mtype, body, end))
        off += _align(length)
    return out, done


def attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """Attribute type → value of the attributes between ``start`` and ``end``."""
    attrs: dict[int, bytes] = {}
    a = start
    while a + RTATTR.size <= end:
        alen, atype = RTATTR.unpack_from(data, a)
        if alen < RTATTR.size:
            break
        attrs[atype] = data[a + RTATTR.size : a + alen]
        a += _align(alen)
    return attrs
