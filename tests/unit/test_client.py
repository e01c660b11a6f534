"""The client's stop request (SIGTERM) against a fake transport: no sockets."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pyfed.federation.client import Client, ClientStopped

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
