"""A local TCP relay for the agent tests: accepts on a free port and connects every client to an upstream.

What happens to the bytes is the subclass's ``pump`` (record them, or stop forwarding as a
partition does); the accepting and the two pump threads per connection are the same for all.
"""

from __future__ import annotations

import socket
import threading


class TcpRelay:
    """Listens on 127.0.0.1:<port>; each connection gets ``pump(src, dst, direction)`` both ways.

    ``direction`` is 0 for client→upstream and 1 for the way back. Subclasses set their own
    state before calling ``__init__``: the accept loop starts there.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for src, dst, direction in ((client, server, 0), (server, client, 1)):
                t = threading.Thread(target=self.pump, args=(src, dst, direction), daemon=True)
                t.start()
                self.threads.append(t)

    def pump(self, src: socket.socket, dst: socket.socket, direction: int) -> None:
        raise NotImplementedError
