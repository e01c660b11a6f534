"""The user-space slow link (bench/link.py) on loopback: it delays, keeps order and bytes, and
closes a pair when either side goes."""

import os
import socket
import threading
import time

import pytest

from bench.link import DelayProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def echo_server():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[:2]
    stop.set()
    thread.join(5)
    listener.close()


def echo(sock: socket.socket, payload: bytes, timeout_s: float = 20) -> bytes:
    """Send ``payload`` from a thread while reading as many bytes back (bounded in time)."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    received = bytearray()
    deadline = time.monotonic() + timeout_s
    while len(received) < len(payload) and time.monotonic() < deadline:
        received += sock.recv(1 << 20)
    sender.join(timeout_s)
    return bytes(received)


def test_every_byte_arrives_in_order_one_delay_each_way(echo_server):
    with DelayProxy(("127.0.0.1", 0), echo_server, delay_s=0.15) as proxy:
        payload = os.urandom(3 * 1024 * 1024)
        with socket.create_connection(proxy.address, timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            round_trip = time.monotonic() - started
            received = echo(sock, payload)
        assert received == payload
    assert 0.3 <= round_trip < 1.0, round_trip


def test_a_side_that_closes_closes_the_other(echo_server):
    with DelayProxy(("127.0.0.1", 0), echo_server, delay_s=0.05) as proxy:
        sock = socket.create_connection(proxy.address, timeout=10)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        sock.close()
        deadline = time.monotonic() + 5
        while proxy._pairs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proxy._pairs and proxy.connections_accepted == 1


def test_a_paced_link_carries_no_more_than_its_bandwidth_each_way(echo_server):
    payload = os.urandom(1024 * 1024)

    def echo_time(**rates) -> float:
        with DelayProxy(("127.0.0.1", 0), echo_server, delay_s=0.0, **rates) as proxy:
            with socket.create_connection(proxy.address, timeout=20) as sock:
                started = time.monotonic()
                assert echo(sock, payload) == payload
                return time.monotonic() - started

    up_only = echo_time(up_bytes_s=2e6)  # 1 MiB at 2 MB/s: at least 0.52 s; the echo back is unpaced
    both = echo_time(up_bytes_s=2e6, down_bytes_s=1e6)  # the slower direction, 1 MB/s, bounds it: >= 1.05 s
    assert 0.5 <= up_only < 3.0, up_only
    assert 1.0 <= both < 5.0, both
