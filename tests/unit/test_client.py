"""The client's stop request (SIGTERM) and its handling of failed handshakes, against a fake
transport: no sockets."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pyfed.federation.client import HANDSHAKE_GRACE_S, Client, ClientError, ClientStopped
from pyfed.wire.protocol import ConnectionEvent

pytestmark = pytest.mark.unit


class SilentTransport:
    """Never connected to anything: no events, no messages."""

    def __init__(self):
        self.receives = 0

    def events(self):
        return []

    def recv(self, timeout_s):
        self.receives += 1
        return None


def idle_client() -> tuple[Client, SilentTransport]:
    client = Client("tcp://127.0.0.1:1", np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    client._transport = transport = SilentTransport()
    return client, transport


def test_a_stop_request_is_not_swallowed_by_a_broad_except():
    client, _ = idle_client()
    with pytest.raises(ClientStopped, match="SIGTERM"):
        try:
            client.request_stop("SIGTERM")
        except Exception:  # what logging's Handler.emit and many libraries do
            pass


def test_a_swallowed_stop_request_still_stops_the_client_at_its_next_wait():
    client, transport = idle_client()
    assert client._receive(timeout_s=0) is None  # no request yet: waits as usual
    try:
        client.request_stop("SIGTERM")
    except BaseException:  # raised inside a __del__, Python only reports it
        pass
    with pytest.raises(ClientStopped, match="SIGTERM"):
        client._receive(timeout_s=0)
    with pytest.raises(ClientStopped, match="SIGTERM"):
        client._sleep(1.0)
    assert transport.receives == 1


def test_a_stopped_client_exits_cleanly_and_tells_the_server_only_once_admitted(monkeypatch, caplog):
    sent = []

    class FakeTransport(SilentTransport):
        def __init__(self, *args, **kwargs):
            super().__init__()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def send(self, frames):
            sent.append(frames)
            if len(sent) == 1:  # the JOIN went out; the operator stops the client while it waits
                raise_stop()
            return True

    monkeypatch.setattr("pyfed.federation.client.ClientTransport", FakeTransport)
    client = Client("tcp://127.0.0.1:1", np.zeros((4, 2), np.float32), np.zeros(4, np.int64))

    def raise_stop():
        try:
            client.request_stop("SIGTERM")
        except ClientStopped:
            pass  # swallowed where it was raised; the remembered request must still stop the client

    with caplog.at_level(logging.INFO, logger="pyfed.client"):
        assert client.run() == 0
    assert "stopping (SIGTERM)" in caplog.text
    assert "told the server" not in caplog.text  # it was never admitted: no LEAVE
    assert len(sent) == 1


# --- a failed handshake -----------------------------------------------------------------------------


class EventsTransport(SilentTransport):
    """Hands out the connection events it is given, one batch per call."""

    def __init__(self):
        super().__init__()
        self.batches: list[list] = []

    def events(self):
        return self.batches.pop(0) if self.batches else []


NO_DETAIL = (ConnectionEvent.HANDSHAKE_FAILED, "handshake failed (...) [code 0x20]")


def clocked_client(monkeypatch) -> tuple[Client, EventsTransport, list[float]]:
    now = [1000.0]
    monkeypatch.setattr("pyfed.federation.client.time.monotonic", lambda: now[0])
    client = Client("tcp://127.0.0.1:1", np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    client._transport = transport = EventsTransport()
    return client, transport, now


def test_a_handshake_failing_with_no_reason_is_tried_again_for_the_grace_then_refused(monkeypatch, caplog):
    """A wrong server key and a connection closed mid-handshake (a server restarting behind a port
    proxy) look the same: the client keeps trying for HANDSHAKE_GRACE_S, saying so once, then gives up."""
    client, transport, now = clocked_client(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pyfed.client"):
        for step_s in (0.0, 0.3, HANDSHAKE_GRACE_S / 2, HANDSHAKE_GRACE_S / 2 - 1):
            now[0] += step_s
            transport.batches.append([NO_DETAIL])
            client._handle_events()
    assert caplog.text.count("trying again for up to 60s (the server may be restarting)") == 1
    now[0] += 1.0
    transport.batches.append([NO_DETAIL])
    with pytest.raises(ClientError, match=r"refused the connection: handshake failed .*\[code 0x20\], for 60s; "
                                          r"check --curve-secret-key / --server-public-key"):
        client._handle_events()


def test_a_handshake_that_succeeds_starts_the_grace_afresh(monkeypatch):
    client, transport, now = clocked_client(monkeypatch)
    transport.batches.append([NO_DETAIL])
    client._handle_events()
    now[0] += HANDSHAKE_GRACE_S - 1
    transport.batches.append([NO_DETAIL, (ConnectionEvent.CONNECTED, ""), (ConnectionEvent.DISCONNECTED, "")])
    client._handle_events()
    now[0] += 2.0  # past the first failure's grace, but a handshake succeeded in between
    transport.batches.append([NO_DETAIL])
    client._handle_events()
    now[0] += HANDSHAKE_GRACE_S
    transport.batches.append([NO_DETAIL])
    with pytest.raises(ClientError, match="refused the connection"):
        client._handle_events()


def test_a_handshake_the_server_refuses_with_a_reason_stops_the_client_at_once(monkeypatch):
    client, transport, _ = clocked_client(monkeypatch)
    transport.batches.append([(ConnectionEvent.REFUSED, "authentication failed (key not admitted) [code 0x190]")])
    with pytest.raises(ClientError, match=r"refused the connection: authentication failed \(key not admitted\)"):
        client._handle_events()
