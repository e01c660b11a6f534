"""Transport settings that are process-wide."""

import os
import subprocess
import sys
import pytest

pytestmark = pytest.mark.unit


def _applied(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", "from pyfed.wire.transport import keep_receive_buffers as k; print(k())"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60).stdout.strip()


def test_malloc_tuning_is_applied_on_glibc_and_can_be_turned_off():
    assert _applied({}) == "True"  # this project's machines run glibc (Debian)
    assert _applied({"PYFED_MALLOC_TUNING": "0"}) == "False"


def test_the_guards_reader_counts_what_the_kernel_received_on_a_connection():
    import socket
    import time

    from pyfed.wire.transport import TcpBytesReceived

    read = TcpBytesReceived()
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            assert read(accepted.fileno()) == 0
            client.sendall(b"x" * 1000)
            accepted.recv(10)
            for _ in range(100):  # loopback hands the rest over at once; bounded all the same
                if read(accepted.fileno()) == 1000:
                    break
                time.sleep(0.01)
            assert read(accepted.fileno()) == 1000  # counted by the kernel, read by the application or not
            r, w = os.pipe()
            try:
                assert read(r) is None  # not a TCP socket
            finally:
                os.close(r), os.close(w)


def test_the_server_tells_a_message_for_a_peer_that_is_gone_from_one_it_queued():
    from pyfed.wire.protocol import Delivery
    from pyfed.wire.transport import ServerTransport

    with ServerTransport("tcp://127.0.0.1:0") as server:
        server.bind()
        assert server.send(b"\x00no-such-peer", [b"hello"]) is Delivery.UNREACHABLE
    assert not Delivery.UNREACHABLE and not Delivery.CONGESTED and Delivery.SENT  # only SENT is a delivery
