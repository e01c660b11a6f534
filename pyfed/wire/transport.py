"""ZeroMQ transport: the server's ROUTER socket and the clients' DEALER sockets.

Frames go out with ``copy=False`` (pyzmq hands the array memory to libzmq without a copy) and
come in as ``zmq.Frame`` objects whose buffers the protocol wraps without a copy. The server's
sends never block: a peer that is gone or whose queue is full makes ``send`` return False.
Byte counters let the server report traffic per round.

Both ends watch their socket's monitor: the server learns within the heartbeat timeout that a
peer's connection died (SIGKILL, a stalled process, a cut cable), and which peer that was, from
the file descriptor its messages arrived on; a client learns that the server went away and came
back, so it can rejoin. With :class:`CurveKeys` every connection is CurveZMQ-encrypted and the
server admits clients through a ZAP handler (see :mod:`pyfed.wire.security`).

What a peer can make the server hold is bounded: a connection that does not finish its
handshake within ``HANDSHAKE_IVL_MS`` is closed; ``MAXMSGSIZE`` bounds each frame; and, because
libzmq buffers every frame of a multipart message before the application sees any of it, a
:class:`ReceiveGuard` thread watches how many bytes each connection has sent that have not yet
arrived as messages and cuts a connection that goes over one message's budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import struct
import sys
import threading
import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from pyfed.wire.protocol import ConnectionEvent, Delivery
from pyfed.wire.security import Admission, CurveKeys, start_authenticator

log = logging.getLogger(__name__)


#: What libzmq reads ahead of the server for one connection (RCVHWM): at most this many whole messages,
#: each at most a chunk (wire/chunks.py); beyond it the connection waits (TCP backpressure).
RECEIVE_AHEAD_MESSAGES = 4


HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000
#: A connection must finish its ZMTP (and CURVE) handshake this fast or be closed (libzmq's default
#: is 30 s): an idle TCP connection holds a server descriptor this long and no longer.
HANDSHAKE_IVL_MS = 5_000
LINGER_MS = 5_000
LOSS_SETTLE_S = 1.0
#: Heartbeats and framing a live connection sends between messages: allowed on top of the budget.
GUARD_DRIFT_BYTES_PER_S = 512
GUARD_SLACK_BYTES = 256 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open descriptors to its hard limit; return (before, after).

    Each client connection holds one descriptor, so the soft limit (often 1024) caps how many
    clients, and how many idle connections from strangers, the server can hold at once.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def trim_freed_memory() -> None:
    """Give freed heap memory back to the operating system (after a large message was refused)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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
        libc = _libc()
        mallopt = libc.mallopt
    except AttributeError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 256 * 2**20)) and bool(mallopt(m_mmap_threshold, 32 * 2**20))


# --- per-connection descriptors: what the kernel says a peer sent, and cutting it off -------------

_TCP_INFO = 11  # Linux getsockopt(IPPROTO_TCP, TCP_INFO)
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (Linux >= 4.1) in struct tcp_info


class TcpBytesReceived:
    """``reader(fd)``: the bytes the kernel has received on TCP socket ``fd`` since it was opened
    (``tcpi_bytes_received``), or None if unknown. One reused buffer: ~1.8 us a call instead of
    ~3.3 us with a buffer made per call, which is most of a guard tick over a thousand connections.
    Not thread-safe: one reader per thread."""

    def __init__(self) -> None:
        libc = _libc()
        self._getsockopt = libc.getsockopt if libc is not None else None
        self._buffer = ctypes.create_string_buffer(256)
        self._length = ctypes.c_uint32(256)
        self._length_ref = ctypes.byref(self._length)
        self._value = ctypes.c_uint64.from_buffer(self._buffer, _TCPI_BYTES_RECEIVED)

    def __call__(self, fd: int) -> int | None:
        if self._getsockopt is None:
            return None
        self._length.value = len(self._buffer)
        if (self._getsockopt(fd, 6, _TCP_INFO, self._buffer, self._length_ref) != 0
                or self._length.value < _TCPI_BYTES_RECEIVED + 8):
            return None
        return self._value.value


def peer_address(fd: int) -> bytes | None:
    """The raw peer address of socket ``fd`` (to tell a reused descriptor from the one we meant)."""
    libc = _libc()
    if libc is None:
        return None
    buffer = ctypes.create_string_buffer(128)
    length = ctypes.c_uint32(128)
    if libc.getpeername(fd, buffer, ctypes.byref(length)) != 0:
        return None
    return buffer.raw[: length.value]


def describe_address(raw: bytes | None) -> str:
    """'1.2.3.4:5678' (or '[::1]:5678') for a raw sockaddr from :func:`peer_address`."""
    if not raw or len(raw) < 8:
        return "an unknown address"
    family, port = struct.unpack_from("=H", raw, 0)[0], int.from_bytes(raw[2:4], "big")
    if family == 2:
        return f"{'.'.join(str(b) for b in raw[4:8])}:{port}"
    if family == 10 and len(raw) >= 24:
        import ipaddress
        return f"[{ipaddress.IPv6Address(raw[8:24])}]:{port}"
    return "an unknown address"


def shutdown_descriptor(fd: int) -> bool:
    """Shut down TCP socket ``fd`` in both directions: libzmq sees the peer gone, closes the
    connection and drops whatever it had buffered from it. True if the call succeeded."""
    libc = _libc()
    return libc is not None and libc.shutdown(fd, 2) == 0  # SHUT_RDWR


@dataclass
class _Watched:
    address: bytes | None
    baseline: int = 0
    since: float = 0.0
    delivered: bool = False


class ReceiveGuard:
    """Cuts any connection that has sent more than ``budget_bytes`` the server has not received.

    libzmq keeps every frame of a multipart message until its last frame arrives, so a peer that
    sends frame after frame (each under ``MAXMSGSIZE``) would otherwise grow the server without
    bound before the application could look at the message. This thread reads each connection's
    received-byte counter from the kernel (``TCP_INFO``) every ``interval_s``; the transport tells
    it when a message from a connection was delivered, which resets that connection's count. A
    connection whose count goes past the budget (the messages libzmq may read ahead of the server,
    RECEIVE_AHEAD_MESSAGES, and one more, each of the largest legal kind, plus heartbeats) is shut
    down. Linux only; elsewhere it does nothing.
    """

    def __init__(self, budget_bytes: int, interval_s: float = 0.01):
        self.budget_bytes = int(budget_bytes)
        self.interval_s = interval_s
        self.cuts = 0
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._log = RateLimitedLog(log)
        self.enabled = sys.platform.startswith("linux") and _libc() is not None
        self._thread = threading.Thread(target=self._run, name="pyfed-receive-guard", daemon=True)
        if self.enabled:
            self._thread.start()

    def watch(self, fd: int) -> None:
        """A connection was accepted on ``fd``: count everything it sent from its first byte."""
        with self._lock:
            self._watched[fd] = _Watched(peer_address(fd), since=time.monotonic())

    def forget(self, fd: int) -> None:
        with self._lock:
            self._watched.pop(fd, None)

    def delivered(self, fd: int) -> None:
        """A whole message from ``fd`` reached the application: what it sent so far is accounted for."""
        with self._lock:
            watched = self._watched.get(fd)
            if watched is not None:
                watched.delivered = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        # a tick costs a few microseconds a connection: with many, tick less often (at most ~10% of a core)
        bytes_received = TcpBytesReceived()
        while not self._stop.wait(max(self.interval_s, 30e-6 * len(self._watched))):
            now = time.monotonic()
            with self._lock:
                watched_now = list(self._watched.items())
            for fd, watched in watched_now:
                # the lock is held per connection, not for the whole scan: a message delivered
                # meanwhile (``delivered``, from the transport's thread) never waits for a whole scan
                with self._lock:
                    if self._watched.get(fd) is not watched:
                        continue  # closed (or its descriptor reused) since the scan began
                    received = bytes_received(fd)
                    if received is None:
                        continue
                    if watched.delivered or received < watched.baseline:
                        watched.baseline, watched.since, watched.delivered = received, now, False
                        continue
                    pending = received - watched.baseline
                    if pending > self.budget_bytes + GUARD_DRIFT_BYTES_PER_S * (now - watched.since):
                        self._cut(fd, watched, pending)

    def _cut(self, fd: int, watched: _Watched, pending: int) -> None:
        address = peer_address(fd)
        if address != watched.address:  # the descriptor now belongs to another connection
            self._watched[fd] = _Watched(address, since=time.monotonic())
            return
        del self._watched[fd]
        if shutdown_descriptor(fd):
            self.cuts += 1
            self._log.warning("cut the connection from %s: it sent %.1f MB without completing a message "
                              "(at most %.1f MB allowed)", describe_address(address), pending / 1e6,
                              self.budget_bytes / 1e6)
            threading.Timer(0.5, trim_freed_memory).start()  # libzmq frees the partial message on close


class RateLimitedLog:
    """Logs at most ``burst`` rejections per ``window_s``, then one line counting the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 20, window_s: float = 10.0):
        self.log, self.burst, self.window_s = logger, burst, window_s
        self._window_start, self._count, self._suppressed = 0.0, 0, 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start > self.window_s:
            if self._suppressed:
                self.log.warning("%d more such messages were not logged", self._suppressed)
            self._window_start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            self.log.warning(message, *args)
        else:
            self._suppressed += 1


def _frame_bytes(frames: Sequence[Any]) -> int:
    return sum(len(f) if isinstance(f, (bytes, zmq.Frame)) else memoryview(f).nbytes for f in frames)


def _heartbeats(socket: zmq.Socket) -> None:
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


#: libzmq's codes for a failed handshake, as people should read them.
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed (key not admitted)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol or security mechanism mismatch (one side without CURVE?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (one side without CURVE, a wrong server key, "
                                          "not a ZeroMQ peer, or the connection closed during the handshake)",
}
MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
SERVER_MONITORED = MONITORED | zmq.EVENT_ACCEPTED


def _monitor_events(monitor: zmq.Socket) -> list[tuple[int, int]]:
    """Every pending (event, value) from a monitor socket, without blocking."""
    events = []
    while monitor.poll(0):
        event = parse_monitor_message(monitor.recv_multipart())
        events.append((int(event["event"]), int(event["value"])))
    return events


def _close(socket: zmq.Socket, context: zmq.Context | None, monitor: zmq.Socket | None = None) -> None:
    if monitor is not None and not socket.closed:
        socket.disable_monitor()
        monitor.close(0)
    if not socket.closed:
        socket.close()
    if context is not None and not context.closed:
        context.term()  # blocks until pending sends are flushed or LINGER_MS passes


class ServerTransport:
    """A bound ROUTER socket: receive (peer, frames), send frames to a peer without blocking."""

    def __init__(self, address: str, *, max_frame_bytes: int | None = None, context: zmq.Context | None = None,
                 curve: CurveKeys | None = None, admission: Admission | None = None,
                 max_message_bytes: int | None = None):
        self.address = address
        keep_receive_buffers()
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.socket = self._context.socket(zmq.ROUTER)
        self._authenticator = None
        if curve is not None:
            self._authenticator = start_authenticator(self._context, admission or Admission(None, curve.public))
            self.socket.curve_secretkey = curve.secret
            self.socket.curve_publickey = curve.public
            self.socket.curve_server = True
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to an unknown peer raises, not drops
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its id takes over
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_AHEAD_MESSAGES)
        self.socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        self.max_frame_bytes = int(max_frame_bytes or -1)
        if max_frame_bytes:
            self.socket.setsockopt(zmq.MAXMSGSIZE, int(max_frame_bytes))
        _heartbeats(self.socket)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.encrypted = curve is not None
        # a connection may have the messages libzmq read ahead, whole, and one more on its way
        self.guard = (ReceiveGuard((RECEIVE_AHEAD_MESSAGES + 1) * max_message_bytes + GUARD_SLACK_BYTES)
                      if max_message_bytes else None)
        self._monitor = self.socket.get_monitor_socket(SERVER_MONITORED)
        self._peer_by_fd: dict[int, bytes] = {}
        self._fd_by_peer: dict[bytes, int] = {}
        self.peer_keys: dict[bytes, str] = {}  # peer -> its CURVE public key (z85), when encrypted
        self._lost: dict[bytes, tuple[int, int, float]] = {}  # peer -> (its closed descriptor, generation, when)
        self._generation: dict[int, int] = {}  # descriptor -> connections accepted on it so far
        self.handshake_failures = 0
        self._drops = RateLimitedLog(log)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def bind(self) -> str:
        """Bind; return the bound endpoint (useful with port 0 in tests)."""
        self.socket.bind(self.address)
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float) -> tuple[bytes, list[zmq.Frame]] | None:
        """The next (peer id, frames), or None if nothing arrives within ``timeout_s``.

        Connection events are read first, so a lost connection is pinned to the peer that used it
        before a new connection can reuse its file descriptor; a message from that peer on a
        connection accepted since (even on the same descriptor number) means it is back.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            self._read_monitor()
            if self.socket in ready:
                break
            if time.monotonic() >= deadline:
                return None
        parts = self.socket.recv_multipart(copy=False)
        self.bytes_received += _frame_bytes(parts)
        peer = parts[0].bytes
        try:
            fd = parts[-1].get(zmq.SRCFD)
        except zmq.ZMQError:  # a legacy ZMTP/1.0 peer (or raw bytes parsed as one) has no descriptor
            fd = None
        if fd is not None and self._fd_by_peer.get(peer) != fd:
            self._peer_by_fd.pop(self._fd_by_peer.get(peer, -1), None)
            self._fd_by_peer[peer], self._peer_by_fd[fd] = fd, peer
        if peer in self._lost and fd is not None and (fd, self._generation.get(fd, 0)) != self._lost[peer][:2]:
            del self._lost[peer]  # it is back on a new connection (maybe on the same, reused, descriptor number)
        if fd is not None and self.guard is not None:
            self.guard.delivered(fd)
        if self.encrypted:
            try:
                self.peer_keys[peer] = parts[-1].get("User-Id")
            except zmq.ZMQError:
                self.peer_keys.pop(peer, None)
        return peer, parts[1:]

    def _read_monitor(self) -> None:
        for event, value in _monitor_events(self._monitor):
            if event == zmq.EVENT_ACCEPTED:
                self._generation[value] = self._generation.get(value, 0) + 1
                if self.guard is not None:
                    self.guard.watch(value)
                continue
            if event == zmq.EVENT_DISCONNECTED:
                if self.guard is not None:
                    self.guard.forget(value)
                peer = self._peer_by_fd.pop(value, None)
                if peer is not None:
                    self._fd_by_peer.pop(peer, None)
                    self._lost[peer] = (value, self._generation.get(value, 0), time.monotonic())
                else:
                    self._drops.warning("a connection closed before delivering any message (a frame over the "
                                        "%d-byte limit, a broken handshake, or a peer that went away)",
                                        self.max_frame_bytes)
            elif event in HANDSHAKE_FAILURES:
                self.handshake_failures += 1
                self._drops.warning("refused a connection: %s [code %#x; %d refused so far]",
                                    HANDSHAKE_FAILURES[event], value, self.handshake_failures)

    def lost_peers(self, *, idle: bool) -> list[bytes]:
        """Peers whose connection closed or missed heartbeats, and did not come back.

        A peer's last messages may still be queued behind the event (a LEAVE just before it
        exits), so a loss is reported once the socket is ``idle`` or after LOSS_SETTLE_S.
        """
        now = time.monotonic()
        lost = [peer for peer, (_, _, seen) in self._lost.items() if idle or now - seen >= LOSS_SETTLE_S]
        for peer in lost:
            del self._lost[peer]
            self.peer_keys.pop(peer, None)
        return lost

    def disconnect(self, peer: bytes) -> bool:
        """Close ``peer``'s connection (libzmq has no call for one peer of a ROUTER, so the socket is
        shut down under it). False if the peer has no known live connection."""
        self._read_monitor()  # a connection that already closed must not be mistaken for a reused descriptor
        fd = self._fd_by_peer.get(peer)
        if fd is None or not shutdown_descriptor(fd):
            return False
        return True

    def send(self, peer: bytes, frames: Sequence[Any]) -> Delivery:
        """Queue ``frames`` for ``peer`` (never a block); false if the peer is gone or congested."""
        try:
            self.socket.send_multipart([peer, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drops.warning("peer %s is not reachable or its queue is full; message dropped", peer.hex()[:12])
            return Delivery.CONGESTED
        except zmq.ZMQError as error:
            if error.errno == zmq.EHOSTUNREACH:
                log.debug("peer %s is not connected; message dropped", peer.hex()[:12])
                return Delivery.UNREACHABLE
            raise
        self.bytes_sent += _frame_bytes(frames)
        return Delivery.SENT

    def close(self) -> None:
        """Close the socket; with our own context, wait (up to LINGER) until queued messages are out."""
        if self.guard is not None:
            self.guard.stop()
        _close(self.socket, None, self._monitor)
        if self._authenticator is not None:  # its ZAP socket must close before the context can end
            self._authenticator.stop()
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self) -> "ServerTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientTransport:
    """A DEALER socket connected to the server; ZeroMQ reconnects it by itself."""

    def __init__(self, address: str, *, context: zmq.Context | None = None, curve: CurveKeys | None = None):
        self.address = address
        keep_receive_buffers()
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        if curve is not None:
            self.socket.curve_secretkey = curve.secret
            self.socket.curve_publickey = curve.public
            self.socket.curve_serverkey = curve.server_public
        # A stable routing id per process: a reconnect after a network blip keeps the same peer id.
        self.socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections; send raises Again otherwise
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 200)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5_000)
        self.socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        _heartbeats(self.socket)
        self._monitor = self.socket.get_monitor_socket(MONITORED)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self.socket.connect(address)

    def events(self) -> list[tuple[ConnectionEvent, str]]:
        """Connection events since the last call, each with a detail (why a handshake was refused)."""
        names = {zmq.EVENT_HANDSHAKE_SUCCEEDED: ConnectionEvent.CONNECTED, zmq.EVENT_DISCONNECTED: ConnectionEvent.DISCONNECTED}
        return [(names[event], "") if event in names
                else (ConnectionEvent.HANDSHAKE_FAILED if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                      else ConnectionEvent.REFUSED, f"{HANDSHAKE_FAILURES[event]} [code {value:#x}]")
                for event, value in _monitor_events(self._monitor)]

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
        _close(self.socket, self._context if self._own_context else None, self._monitor)

    def __enter__(self) -> "ClientTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
