"""ZeroMQ transport: the server's ROUTER socket and the clients' DEALER sockets.

Frames go out with ``copy=False`` (pyzmq hands the array memory to libzmq without a copy) and
come in as ``zmq.Frame`` objects whose buffers the protocol wraps without a copy. The server's
sends never block: a peer that is gone or whose queue is full makes ``send`` return False.
Byte counters let the server report traffic per round. Security options (CURVE) belong here too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import zmq

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000
LINGER_MS = 5_000


@functools.cache
def keep_receive_buffers() -> bool:
    """Ask glibc to reuse freed large buffers instead of returning them to the kernel.

    libzmq receives each large frame into a fresh malloc'd buffer. With glibc's defaults those
    buffers are mmapped or trimmed away after every message, so the next one page-faults its way
    into new memory: a client then received the 21.6 MB seed model at 59-69% of a raw socket's
    speed; with these two settings, at 91-129% (bench/wire.py). The cost is that up to 256 MB of
    freed heap stays with the process. Set PYFED_MALLOC_TUNING=0 to keep glibc's defaults.
    Returns whether the settings were applied (not on non-glibc platforms).
    """
    if os.environ.get("PYFED_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 256 * 2**20)) and bool(mallopt(m_mmap_threshold, 32 * 2**20))


def _frame_bytes(frames: Sequence[Any]) -> int:
    return sum(len(f) if isinstance(f, (bytes, zmq.Frame)) else memoryview(f).nbytes for f in frames)


def _heartbeats(socket: zmq.Socket) -> None:
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


def _close(socket: zmq.Socket, context: zmq.Context | None) -> None:
    if not socket.closed:
        socket.close()
    if context is not None and not context.closed:
        context.term()  # blocks until pending sends are flushed or LINGER_MS passes


class ServerTransport:
    """A bound ROUTER socket: receive (peer, frames), send frames to a peer without blocking."""

    def __init__(self, address: str, *, max_frame_bytes: int | None = None, context: zmq.Context | None = None):
        self.address = address
        keep_receive_buffers()
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to an unknown peer raises, not drops
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its id takes over
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.setsockopt(zmq.RCVHWM, 10_000)
        if max_frame_bytes:
            self.socket.setsockopt(zmq.MAXMSGSIZE, int(max_frame_bytes))
        _heartbeats(self.socket)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)

    def bind(self) -> str:
        """Bind; return the bound endpoint (useful with port 0 in tests)."""
        self.socket.bind(self.address)
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float) -> tuple[bytes, list[zmq.Frame]] | None:
        """The next (peer id, frames), or None if nothing arrives within ``timeout_s``."""
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return None
        parts = self.socket.recv_multipart(copy=False)
        self.bytes_received += _frame_bytes(parts)
        return parts[0].bytes, parts[1:]

    def send(self, peer: bytes, frames: Sequence[Any]) -> bool:
        """Queue ``frames`` for ``peer``; False (never a block) if the peer is gone or congested."""
        try:
            self.socket.send_multipart([peer, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("peer %s is not reachable or its queue is full; message dropped", peer.hex()[:12])
            return False
        except zmq.ZMQError as error:
            if error.errno == zmq.EHOSTUNREACH:
                log.debug("peer %s is not connected; message dropped", peer.hex()[:12])
                return False
            raise
        self.bytes_sent += _frame_bytes(frames)
        return True

    def close(self) -> None:
        """Close the socket; with our own context, wait (up to LINGER) until queued messages are out."""
        _close(self.socket, self._context if self._own_context else None)

    def __enter__(self) -> "ServerTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientTransport:
    """A DEALER socket connected to the server; ZeroMQ reconnects it by itself."""

    def __init__(self, address: str, *, context: zmq.Context | None = None):
        self.address = address
        keep_receive_buffers()
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        # A stable routing id per process: a reconnect after a network blip keeps the same peer id.
        self.socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections; send raises Again otherwise
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 200)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5_000)
        _heartbeats(self.socket)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self.socket.connect(address)

    def send(self, frames: Sequence[Any]) -> bool:
        """Send ``frames``; False if there is no connection to the server yet."""
        try:
            self.socket.send_multipart(list(frames), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next message's frames, or None after ``timeout_s``."""
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return None
        return self.socket.recv_multipart(copy=False)

    def close(self) -> None:
        """Close the socket; with our own context, wait (up to LINGER) until queued messages are out."""
        _close(self.socket, self._context if self._own_context else None)

    def __enter__(self) -> "ClientTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
