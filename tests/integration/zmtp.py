"""ZMTP 3 on the wire, for tests that play a misbehaving network or peer on loopback.

* :class:`RawPeer` speaks plaintext ZMTP (the NULL mechanism) from a bare TCP socket, so it can
  stream a multipart message of any length without holding it, as an attacker would.
* :class:`FitDroppingProxy` sits between a client and the server, forwards both directions, can
  drop the next FIT the server sends, and can cut every connection through it (the client
  reconnects through it again), as a flaky network would. It records what it forwarded, as an
  eavesdropper would.

Only plaintext ZMTP is parsed (RFC 23): with CURVE the frames' flags are encrypted.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterable

from bench.link import close_quietly

GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
MORE, LONG, COMMAND = 0x01, 0x02, 0x04


def frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    flags = (MORE if more else 0) | (COMMAND if command else 0)
    if len(body) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def ready_command(socket_type: bytes = b"DEALER") -> bytes:
    name, value = b"Socket-Type", socket_type
    return frame(b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value, command=True)


def recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class RawPeer:
    """A plaintext ZMTP DEALER from a bare socket: greeting, READY, then whatever frames we like."""

    def __init__(self, port: int, timeout_s: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock.sendall(GREETING + ready_command())
        recv_exact(self.sock, 64)  # the server's greeting

    def stream(self, frames: Iterable[bytes]) -> int:
        """Send ``frames`` as one message (all but the last with MORE); return the bytes sent before the
        server cut the connection (or all of them)."""
        sent, previous = 0, None
        try:
            for body in frames:
                if previous is not None:
                    sent += self._send(frame(previous, more=True))
                previous = body
            if previous is not None:
                sent += self._send(frame(previous))
        except OSError:
            pass
        return sent

    def _send(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def close(self) -> None:
        self.sock.close()


class FitDroppingProxy:
    """A TCP proxy on loopback in front of ``server_port`` that can drop FITs and cut links."""

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_fits = 0
        self.dropped = 0
        self.connections = 0
        self.upstream: list[bytearray] = []  # per connection, what the client sent
        self.downstream = bytearray()
        self._live: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def drop_next_fit(self) -> None:
        with self._lock:
            self.drop_fits += 1

    def cut(self) -> None:
        """Close every connection through the proxy, as a link going down would."""
        with self._lock:
            live, self._live = self._live, []
        for sock in live:
            close_quietly(sock)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.server_port))
            record = bytearray()
            with self._lock:
                self._live += [client, server]
                self.connections += 1
                self.upstream.append(record)
            threading.Thread(target=self._pump, args=(client, server, record), daemon=True).start()
            threading.Thread(target=self._pump_messages, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, record: bytearray) -> None:
        try:
            while data := source.recv(1 << 16):
                record += data
                target.sendall(data)
        except OSError:
            pass

    def _pump_messages(self, source: socket.socket, target: socket.socket) -> None:
        """Server to client, a whole message at a time, so that one can be left out."""
        try:
            left = 64  # the greeting, passed on as it comes: each side sends part of it, then waits for the other's
            while left:
                chunk = source.recv(left)
                if not chunk:
                    return
                self.downstream += chunk
                target.sendall(chunk)
                left -= len(chunk)
            message: list[bytes] = []
            while True:
                head = recv_exact(source, 1)
                flags = head[0]
                size_bytes = recv_exact(source, 8 if flags & LONG else 1)
                size = struct.unpack(">Q", size_bytes)[0] if flags & LONG else size_bytes[0]
                raw = head + size_bytes + recv_exact(source, size)
                if flags & COMMAND:
                    self.downstream += raw
                    target.sendall(raw)
                    continue
                message.append(raw)
                if flags & MORE:
                    continue
                with self._lock:  # the header frame (JSON) starts within its first 9 bytes of framing
                    drop = self.drop_fits > 0 and b'"type":"fit"' in message[0][:220]
                    if drop:
                        self.drop_fits -= 1
                        self.dropped += 1
                if not drop:
                    self.downstream += b"".join(message)
                    target.sendall(b"".join(message))
                message = []
        except (OSError, ConnectionError):
            pass
