"""A slow network link in user space: a TCP proxy that delays every byte by a fixed time and, if
asked, paces each direction of each connection to a bandwidth (``up_bytes_s``: client to server,
``down_bytes_s``: server to client; a site's own uplink and downlink).

The kernels PyFed is tested on have no ``netem`` queueing discipline, so delay cannot be added with
``tc``; bandwidth can (``tbf``, see tests/multihost/testbed.py). This proxy accepts connections on
one address and opens one to the target for each; every chunk read from either side is written to
the other ``delay_s`` later, in order, as a link with that one-way latency would deliver it. When
either side closes or fails, both connections of the pair are closed, as a peer would see a reset.

Bounded: at most ``max_connections`` pairs (more are closed at once) and ``max_buffered_bytes`` in
flight per direction (a reader waits while its writer catches up, which is how TCP backs off).
"""

from __future__ import annotations

import collections
import socket
import threading
import time

CHUNK_BYTES = 64 * 1024


def close_quietly(sock: socket.socket) -> None:
    """Shut a connection down both ways (the peer sees it end) and close it, whatever state it is in."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class DelayProxy:
    """Forward ``listen`` -> ``target`` (each ``(host, port)``) with ``delay_s`` one-way delay."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float, *,
                 max_connections: int = 64, max_buffered_bytes: int = 8 * 1024 * 1024,
                 up_bytes_s: float | None = None, down_bytes_s: float | None = None):
        self.target, self.delay_s = target, delay_s
        self.rates = {"up": up_bytes_s, "down": down_bytes_s}  # per connection and direction; None: unlimited
        self.max_connections, self.max_buffered_bytes = max_connections, max_buffered_bytes
        self._listener = socket.create_server(listen, reuse_port=False)
        self._listener.settimeout(0.2)
        self.address = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self.connections_accepted = 0
        self._start(self._accept_loop, "accept")

    def _start(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"delay-proxy-{name}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._pairs) >= self.max_connections
            if full:
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                downstream.close()
                continue
            for sock in (downstream, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((downstream, upstream))
                self.connections_accepted += 1
            pair = (downstream, upstream)
            for source, sink, name in ((downstream, upstream, "up"), (upstream, downstream, "down")):
                self._pump(source, sink, pair, name)

    def _pump(self, source: socket.socket, sink: socket.socket, pair, name: str) -> None:
        """Two threads per direction: one reads and stamps chunks, one writes each when it is due."""
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        state = {"bytes": 0, "closed": False}
        ready = threading.Condition()

        def read() -> None:
            try:
                while True:
                    data = source.recv(CHUNK_BYTES)
                    if not data:
                        break
                    with ready:
                        while state["bytes"] > self.max_buffered_bytes and not state["closed"]:
                            ready.wait(0.2)
                        if state["closed"]:
                            return
                        queue.append((time.monotonic() + self.delay_s, data))
                        state["bytes"] += len(data)
                        ready.notify_all()
            except OSError:
                pass
            with ready:
                queue.append((time.monotonic() + self.delay_s, b""))  # end of stream, delivered in order
                ready.notify_all()

        rate = self.rates[name]
        paced_until = time.monotonic()

        def write() -> None:
            nonlocal paced_until
            try:
                while True:
                    with ready:
                        while not queue and not state["closed"]:
                            ready.wait(0.2)
                        if state["closed"]:
                            return
                        due, data = queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    with ready:
                        queue.popleft()
                        state["bytes"] -= len(data)
                        ready.notify_all()
                    if not data:
                        break
                    if rate:  # a link of this many bytes a second: a chunk arrives once it has crossed it
                        paced_until = max(paced_until, time.monotonic()) + len(data) / rate
                        pause = paced_until - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                    sink.sendall(data)
            except OSError:
                pass
            with ready:
                state["closed"] = True
                ready.notify_all()
            self._close(pair)

        self._start(read, f"{name}-read")
        self._start(write, f"{name}-write")

    def _close(self, pair) -> None:
        for sock in pair:
            close_quietly(sock)
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def close(self) -> None:
        """Stop accepting, close every connection, and wait (bounded) for the threads to end."""
        self._stopping.set()
        self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)
        deadline = time.monotonic() + 5
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
