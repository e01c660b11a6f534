"""CurveZMQ encryption and admission, with real processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import zmq

from pyfed.wire.protocol import ConnectionEvent
from pyfed.wire.security import CurveKeys, client_keys, generate_keys, load_key_pair, load_public_key
from pyfed.wire.transport import ClientTransport
from tests.integration.support import check_every_round_once, free_port

pytestmark = pytest.mark.integration


def test_keys_command_writes_pyzmq_certificates_and_never_overwrites(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyfed", "keys", "--out", str(tmp_path / "keys"), "--clients", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == ["client-1.key", "client-1.key_secret", "client-2.key", "client-2.key_secret",
                     "server.key", "server.key_secret"]
    server_public, server_secret = load_key_pair(tmp_path / "keys/server.key_secret")
    assert load_public_key(tmp_path / "keys/server.key") == server_public and len(server_secret) == 40
    assert oct((tmp_path / "keys/server.key_secret").stat().st_mode & 0o777) == "0o600"
    created, kept = generate_keys(tmp_path / "keys", 3)
    assert [p.name for p in created] == ["client-3.key_secret"] and len(kept) == 3
    assert load_key_pair(tmp_path / "keys/server.key_secret") == (server_public, server_secret)


def test_encrypted_federation_admits_listed_keys_only_and_binds_ids_to_keys(tmp_path, processes, shards):
    keys, strangers = tmp_path / "keys", tmp_path / "strangers"
    generate_keys(keys, 2)
    generate_keys(strangers, 1)
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = processes.pyfed("server", "--address", address, "--test-data", str(shards / "test.npz"),
                             "--logdir", str(logdir), "--rounds", "3", "--min-clients", "2", "--min-fit-clients", "2",
                             "--epochs", "20", "--curve-secret-key", str(keys / "server.key_secret"),
                             "--authorized-keys", str(keys), name="server")
    processes.wait_for_line(server, "listening on")
    assert "(CurveZMQ)" in server.log_path.read_text()

    def client(index: int, key_dir, name: str, *extra: str):
        return processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{index}.npz"),
                               "--client-id", f"site-{index}", "--curve-secret-key",
                               str(key_dir / f"client-{min(index, 2)}.key_secret"),
                               "--server-public-key", str(keys / "server.key"), *extra, name=name)

    # an unlisted key and a client without encryption are refused and never see the model
    stranger = processes.pyfed("client", "--server", address, "--data", str(shards / "client-3.npz"),
                               "--curve-secret-key", str(strangers / "client-1.key_secret"),
                               "--server-public-key", str(keys / "server.key"), name="stranger")
    plaintext = processes.pyfed("client", "--server", address, "--data", str(shards / "client-3.npz"),
                                name="plaintext")
    # (a plaintext client whose handshakes all fail with no reason tries for 60 s before it gives up)
    assert processes.wait(stranger, 60) == 1 and processes.wait(plaintext, 150) == 1
    for refused in (stranger, plaintext):
        text = refused.log_path.read_text()
        assert "refused the connection" in text and "joined as" not in text
    server_log = server.log_path.read_text()
    stranger_key = load_public_key(strangers / "client-1.key").decode()
    assert f"refused a connection: public key {stranger_key} is not in {keys}" in server_log
    # which handshake failure each side reports for the plaintext client depends on timing
    assert server_log.count("refused a connection: ") >= 2
    assert "one side without CURVE" in plaintext.log_path.read_text()
    assert "joined (" not in server_log

    first, second = client(1, keys, "site-1"), client(2, keys, "site-2")
    processes.wait_for_line(server, "round 2/3 started")
    os.kill(first.pid, signal.SIGKILL)
    processes.wait_for_line(server, "client site-1 dropped: connection lost")
    # client-2's key cannot take over site-1's id, even now that site-1 is gone
    impostor = processes.pyfed("client", "--server", address, "--data", str(shards / "client-1.npz"),
                               "--client-id", "site-1", "--curve-secret-key", str(keys / "client-2.key_secret"),
                               "--server-public-key", str(keys / "server.key"), name="impostor")
    assert processes.wait(impostor, 60) == 1
    assert "[id_bound_to_key]" in impostor.log_path.read_text()
    restarted = client(1, keys, "site-1-restarted")
    processes.wait_for_line(server, "client site-1 rejoined")
    assert processes.wait(server, 300) == 0, processes.tail(server)
    assert processes.wait(second, 60) == 0 and processes.wait(restarted, 60) == 0
    summary = check_every_round_once(logdir, 3)
    assert summary["final"]["test_accuracy"] >= 0.85


def test_key_and_flag_mistakes_are_one_line_errors(tmp_path):
    generate_keys(tmp_path, 1)
    cases = [
        (["server", "--test-data", "x.npz", "--curve-secret-key", str(tmp_path / "server.key")],
         "holds no secret key (use the .key_secret file"),
        (["server", "--curve-secret-key", str(tmp_path / "missing.key_secret")], "missing.key_secret: no such key file"),
        (["server", "--authorized-keys", str(tmp_path)], "--authorized-keys / AUTHORIZED_KEYS needs --curve-secret-key"),
        (["client", "--data", "x.npz", "--curve-secret-key", str(tmp_path / "client-1.key_secret")],
         "needs --server-public-key"),
    ]
    (tmp_path / "x.npz").write_bytes(b"")
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "pyfed", *args], capture_output=True, text=True, timeout=120,
                                cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1], (args, result.stderr)
        assert "Traceback" not in result.stderr


# --- handshakes that fail with no reason ------------------------------------------------------------


def handshake_events(transport: ClientTransport, timeout_s: float = 10.0) -> list[ConnectionEvent]:
    """The transport's events until a handshake has succeeded or failed twice (bounded in time)."""
    events: list[ConnectionEvent] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and events.count(ConnectionEvent.HANDSHAKE_FAILED) < 2 \
            and ConnectionEvent.CONNECTED not in events:
        events += [event for event, _ in transport.events()]
        time.sleep(0.05)
    return events


def test_a_wrong_server_key_and_a_connection_closed_mid_handshake_fail_alike(tmp_path):
    """Why the client does not give up on the first failed handshake: libzmq reports a wrong server
    key exactly as a connection closed during the handshake (Docker's port proxy while the server's
    container restarts): HANDSHAKE_FAILED_NO_DETAIL, broken pipe. A key the server refuses is told
    apart (REFUSED, tested above with real processes)."""
    keys = tmp_path / "keys"
    generate_keys(keys, 1)
    server_public, server_secret = load_key_pair(keys / "server.key_secret")
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.curve_server, router.curve_secretkey, router.curve_publickey = True, server_secret, server_public
    closer, stop = socket.socket(), threading.Event()
    try:
        router.setsockopt(zmq.LINGER, 0)
        curve_port = router.bind_to_random_port("tcp://127.0.0.1")
        mine = client_keys(keys / "client-1.key_secret", keys / "server.key")
        wrong = CurveKeys(mine.public, mine.secret, zmq.curve_keypair()[0])
        with ClientTransport(f"tcp://127.0.0.1:{curve_port}", curve=wrong) as transport:
            assert handshake_events(transport).count(ConnectionEvent.HANDSHAKE_FAILED) == 2
        closer.bind(("127.0.0.1", 0))
        closer.listen()
        acceptor = threading.Thread(target=accept_and_close, args=(closer, stop), daemon=True)
        acceptor.start()
        with ClientTransport(f"tcp://127.0.0.1:{closer.getsockname()[1]}", curve=mine) as transport:
            assert handshake_events(transport).count(ConnectionEvent.HANDSHAKE_FAILED) == 2
        stop.set()
        acceptor.join(timeout=5)
        with ClientTransport(f"tcp://127.0.0.1:{curve_port}", curve=mine) as transport:  # the right key connects
            assert ConnectionEvent.CONNECTED in handshake_events(transport)
    finally:
        stop.set()
        closer.close()
        router.close()
        context.term()


def accept_and_close(listener: socket.socket, stop: threading.Event, most_s: float = 120.0) -> None:
    """Accept connections and close each at once, as a port proxy with nothing behind it, until
    ``stop`` is set (or ``most_s`` passes)."""
    listener.settimeout(0.1)
    deadline = time.monotonic() + most_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        connection.close()


def test_a_client_rides_out_failed_handshakes_while_its_server_comes_back(tmp_path, processes, shards):
    """A proxy that closes every connection (the server's container restarting) fails the client's
    handshakes with no reason: the client says it keeps trying, and joins once the server is back."""
    keys = tmp_path / "keys"
    generate_keys(keys, 1)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proxy = socket.socket()
    proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    proxy.bind(("127.0.0.1", port))
    proxy.listen()
    stop = threading.Event()
    acceptor = threading.Thread(target=accept_and_close, args=(proxy, stop), daemon=True)
    acceptor.start()
    try:
        client = processes.pyfed("client", "--server", address, "--data", str(shards / "client-1.npz"),
                                 "--client-id", "site-1", "--curve-secret-key", str(keys / "client-1.key_secret"),
                                 "--server-public-key", str(keys / "server.key"), name="site-1")
        processes.wait_for_line(client, "trying again for up to 60s (the server may be restarting)", timeout_s=60)
    finally:
        stop.set()
        acceptor.join(timeout=5)
        proxy.close()
    server = processes.pyfed("server", "--address", address, "--test-data", str(shards / "test.npz"),
                             "--logdir", str(tmp_path / "logs"), "--rounds", "1", "--min-clients", "1",
                             "--curve-secret-key", str(keys / "server.key_secret"), "--authorized-keys", str(keys),
                             name="server")
    assert processes.wait(server, 180) == 0, processes.tail(server)
    assert processes.wait(client, 60) == 0, processes.tail(client)
    assert "client site-1 joined" in server.log_path.read_text()
    assert "refused the connection" not in client.log_path.read_text()
