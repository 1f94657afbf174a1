"""Attach the tc programs to interfaces, follow interfaces that come and go, detach everything on close.

tcx links (bpf_link_create with BPF_TCX_INGRESS/EGRESS, kernel >= 6.6) are used where the kernel has
them: they are owned by a file descriptor, so a crashed agent leaves nothing behind. Otherwise a
clsact qdisc with direct-action filters (bpf_tc_*); we remove only the filters we added, and the
qdisc only if we created it.

All attach work runs on one worker thread. That thread first enters the target network namespace
when one is given (setns is per thread; ifindexes, tc and bpf_link_create resolve devices in the
caller's namespace), dumps the links over a NETLINK_ROUTE socket subscribed to RTMGRP_LINK, and then
keeps following link events so that interfaces created later (new pod veths) are attached and
vanished ones forgotten.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from flowship.agent import loader, netlink

AttachMode = Literal["auto", "tcx", "tc"]
T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
IFLA_IFNAME = 3
IFF_UP = 0x1
IFF_LOOPBACK = 0x8

_NO_TCX_ERRNOS = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: kernel-internal ENOTSUPP
_IFINFOMSG = struct.Struct("=BxHiII")


@dataclass
class Link:
    """One interface as netlink reports it."""

    index: int
    name: str
    flags: int


@dataclass
class Attachment:
    """What we installed on one interface, enough to remove exactly that."""

    ifindex: int
    name: str
    mode: Literal["tcx", "tc"]
    link_fds: list[int] = field(default_factory=list)  # tcx
    filters: list[tuple[int, int, int]] = field(default_factory=list)  # tc: (point, handle, priority)
    created_qdisc: bool = False


def netns_path(netns: str) -> Path:
    """A namespace name (as `ip netns` uses) or a path such as /proc/PID/ns/net."""
    return Path(netns) if "/" in netns else Path("/run/netns") / netns


def enter_netns(netns: str) -> None:
    """Move the calling thread into a network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)} (needs CAP_SYS_ADMIN)")
    finally:
        os.close(fd)


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own that entered the namespace (the caller's thread stays where it is);
    what it raises is raised here."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            enter_netns(netns)
            box["value"] = fn()
        except BaseException as exc:  # raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=body, name="netns-call")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def parse_link_messages(data: bytes) -> tuple[list[tuple[int, Link]], bool]:
    """(message type, Link) pairs of RTM_NEWLINK/DELLINK messages, and whether a dump ended."""
    out: list[tuple[int, Link]] = []
    found, done = netlink.messages(data, "netlink")
    for mtype, body, end in found:
        if mtype not in (RTM_NEWLINK, RTM_DELLINK):
            continue
        _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
        raw = netlink.attributes(data, body + _IFINFOMSG.size, end).get(IFLA_IFNAME, b"")
        out.append((mtype, Link(index, raw.split(b"\0", 1)[0].decode(), flags)))
    return out, done


class Attacher:
    """Keeps the ingress/egress programs attached to every interface that matches."""

    def __init__(
        self,
        ingress_fd: int,
        egress_fd: int,
        patterns: Sequence[str] | None = None,
        mode: AttachMode = "auto",
        netns: str | None = None,
        log: Any = None,
    ) -> None:
        self.log = log or structlog.get_logger().bind(component="agent.attach")
        self._ingress_fd = ingress_fd
        self._egress_fd = egress_fd
        self.patterns = list(patterns) if patterns else None
        self.mode: AttachMode = mode
        self.netns = netns
        self.errors: list[str] = []
        self._attached: dict[int, Attachment] = {}
        self._cond = threading.Condition()
        self._ready = False
        self._failure: BaseException | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="flowship-attach", daemon=True)

    # ---- public ----

    def start(self, timeout: float = 10.0) -> None:
        """Start following links; returns once the interfaces present now are handled."""
        self._thread.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._failure is not None, timeout):
                raise TimeoutError("interface attach did not finish in time")
        if self._failure is not None:
            raise self._failure

    def attached(self) -> dict[str, Attachment]:
        """Interfaces currently attached, by name."""
        with self._cond:
            return {a.name: a for a in self._attached.values()}

    def wait_attached(self, name: str, timeout: float = 5.0) -> bool:
        """Wait until an interface with this name is attached (e.g. a veth created after start)."""
        with self._cond:
            return self._cond.wait_for(lambda: any(a.name == name for a in self._attached.values()), timeout)

    def wait_detached(self, name: str, timeout: float = 5.0) -> bool:
        """Wait until no interface with this name is attached."""
        with self._cond:
            return self._cond.wait_for(lambda: all(a.name != name for a in self._attached.values()), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Detach from every interface and stop the worker."""
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1

    # ---- worker ----

    def _run(self) -> None:
        sock = None
        try:
            if self.netns:
                enter_netns(self.netns)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, RTMGRP_LINK))
            sock.send(netlink.dump_request(RTM_GETLINK, 1, _IFINFOMSG.pack(0, 0, 0, 0, 0)))
            dumped = False
            while not dumped:
                msgs, dumped = parse_link_messages(sock.recv(1 << 16))
                self._handle(msgs)
        except BaseException as exc:  # reported to start()
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
            self._detach_all()
            if sock is not None:
                sock.close()
            return
        with self._cond:
            self._ready = True
            self._cond.notify_all()
        try:
            while True:
                readable, _, _ = select.select([sock, self._stop_r], [], [])
                if self._stop_r in readable:
                    break
                try:
                    data = sock.recv(1 << 16)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # missed events: resynchronise with a dump
                        self._resync(sock)
                        continue
                    raise
                self._handle(parse_link_messages(data)[0])
        except Exception as exc:  # keep what is attached detachable; report
            self.log.error("interface watcher stopped", error=str(exc))
            self.errors.append(f"watcher: {exc}")
        finally:
            self._detach_all()
            sock.close()

    def _resync(self, sock: socket.socket) -> None:
        sock.send(netlink.dump_request(RTM_GETLINK, 2, _IFINFOMSG.pack(0, 0, 0, 0, 0)))
        present: set[int] = set()
        done = False
        while not done:
            msgs, done = parse_link_messages(sock.recv(1 << 16))
            present.update(link.index for t, link in msgs if t == RTM_NEWLINK)
            self._handle(msgs)
        for ifindex in list(self._attached):
            if ifindex not in present:
                self._forget(ifindex)

    def _wanted(self, link: Link) -> bool:
        if self.patterns is None:
            return bool(link.flags & IFF_UP) and not link.flags & IFF_LOOPBACK
        return any(fnmatch.fnmatchcase(link.name, p) for p in self.patterns)

    def _handle(self, msgs: list[tuple[int, Link]]) -> None:
        for mtype, link in msgs:
            current = self._attached.get(link.index)
            if mtype == RTM_DELLINK:
                if current:
                    self._forget(link.index)
                continue
            wanted = self._wanted(link)
            if current and not wanted:
                self._detach(current, device_gone=False)
                with self._cond:
                    del self._attached[link.index]
                    self._cond.notify_all()
            elif current and current.name != link.name:
                with self._cond:
                    current.name = link.name
                    self._cond.notify_all()
            elif wanted and not current:
                try:
                    att = self._attach(link)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # already gone again
                        continue
                    self.log.warning("attach failed", interface=link.name, ifindex=link.index, error=str(exc))
                    self.errors.append(f"attach to {link.name} (ifindex {link.index}) failed: {exc}")
                    continue
                with self._cond:
                    self._attached[link.index] = att
                    self._cond.notify_all()
                self.log.info("interface attached", interface=link.name, ifindex=link.index, mode=att.mode)

    def _attach(self, link: Link) -> Attachment:
        if self.mode in ("auto", "tcx"):
            try:
                return self._attach_tcx(link)
            except OSError as exc:
                if self.mode == "tcx" or exc.errno not in _NO_TCX_ERRNOS:
                    raise
                self.log.info("tcx unavailable, using clsact", error=str(exc))
                self.mode = "tc"
        return self._attach_tc(link)

    def _attach_tcx(self, link: Link) -> Attachment:
        att = Attachment(link.index, link.name, "tcx")
        try:
            att.link_fds.append(loader.link_create(self._ingress_fd, link.index, loader.BPF_TCX_INGRESS))
            att.link_fds.append(loader.link_create(self._egress_fd, link.index, loader.BPF_TCX_EGRESS))
        except OSError:
            self._detach(att, device_gone=False)
            raise
        return att

    def _attach_tc(self, link: Link) -> Attachment:
        att = Attachment(link.index, link.name, "tc")
        try:
            att.created_qdisc = loader.tc_hook_create(link.index)
            for point, fd in ((loader.BPF_TC_INGRESS, self._ingress_fd), (loader.BPF_TC_EGRESS, self._egress_fd)):
                handle, prio = loader.tc_attach(link.index, point, fd)
                att.filters.append((point, handle, prio))
        except OSError:
            self._detach(att, device_gone=False)
            raise
        return att

    def _detach(self, att: Attachment, device_gone: bool) -> None:
        for fd in att.link_fds:
            os.close(fd)
        att.link_fds.clear()
        if not device_gone:
            for point, handle, prio in att.filters:
                try:
                    loader.tc_detach(att.ifindex, point, handle, prio)
                except OSError as exc:
                    self.errors.append(f"detach from {att.name}: {exc}")
            if att.created_qdisc:
                try:
                    loader.tc_hook_destroy(att.ifindex)
                except OSError as exc:
                    self.errors.append(f"remove clsact from {att.name}: {exc}")
        att.filters.clear()

    def _forget(self, ifindex: int) -> None:
        att = self._attached.get(ifindex)
        if att is None:
            return
        self._detach(att, device_gone=True)
        with self._cond:
            del self._attached[ifindex]
            self._cond.notify_all()
        self.log.info("interface gone", interface=att.name, ifindex=ifindex)

    def _detach_all(self) -> None:
        for att in list(self._attached.values()):
            self._detach(att, device_gone=False)
        with self._cond:
            self._attached.clear()
            self._cond.notify_all()
