"""A TCP proxy in front of the broker that can go silent: while paused it neither reads
nor forwards, nor answers new connections (they wait in the listen backlog), so both
ends see a connection that is open and quiet, as with packets dropped and no FIN."""

from __future__ import annotations

import selectors
import socket
import threading


class PausableProxy:
    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()  # cleared while paused
        self._flowing.set()
        self._closed = threading.Event()
        self._cut = threading.Event()
        self._pause_on: bytes | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._clients: set[socket.socket] = set()  # the ends the client connected
        self._thread = threading.Thread(target=self._serve, name="proxy", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._pause_on = None
        self._flowing.set()

    def pause_when_client_sends(self, pattern: bytes) -> None:
        """Go silent right after forwarding the first client write that holds `pattern`
        (an AMQP method's class and method ids, say): the broker gets the request, the
        client never hears the answer."""
        self._pause_on = pattern

    def cut(self) -> None:
        """Close every proxied connection (both ends see it closed); new ones are taken."""
        self._cut.set()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        for sock in [self._listener, *self._peers]:
            sock.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        while not self._closed.is_set():
            if self._cut.is_set():
                self._cut.clear()
                for sock in self._peers:
                    selector.unregister(sock)
                    sock.close()
                self._peers.clear()
                self._clients.clear()
            if not self._flowing.wait(0.05):  # paused: hold every byte until resumed or closed
                continue
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept(selector)
                elif not self._forward(sock, selector):
                    break  # paused: hold whatever else this select found

    def _accept(self, selector: selectors.BaseSelector) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(self._target)
        self._peers[client], self._peers[upstream] = upstream, client
        self._clients.add(client)
        selector.register(client, selectors.EVENT_READ)
        selector.register(upstream, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket, selector: selectors.BaseSelector) -> bool:
        """Pass on what `sock` has; False if that armed pause has just begun."""
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        other = self._peers.get(sock)
        if data and other is not None:
            try:
                other.sendall(data)
            except OSError:
                pass
            else:
                pattern = self._pause_on
                if pattern is not None and sock in self._clients and pattern in data:
                    self._pause_on = None
                    self.pause()
                    return False
                return True
        for end in (sock, other):  # one side closed: close both
            if end is not None and end in self._peers:
                selector.unregister(end)
                self._peers.pop(end)
                self._clients.discard(end)
                end.close()
        return True
