"""Helpers the integration tests share: starting servers and clients, a hand-driven peer, and
checks of what a run left behind (summary.json, TensorBoard events). No test module imports another."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zmq

from pyfed.wire import protocol
from pyfed.wire.protocol import Message, MessageType
from tests.conftest import free_port  # noqa: F401  (re-exported: one import line for the tests)


def start_server(processes, shards: Path, logdir: Path, address: str, *args: str, name: str = "server", **kwargs):
    server = processes.pyfed("server", "--address", address, "--test-data", str(shards / "test.npz"),
                             "--logdir", str(logdir), *args, name=name, **kwargs)
    processes.wait_for_line(server, "listening on")
    return server


def start_client(processes, shards: Path, address: str, index: int, *args: str, name: str | None = None):
    return processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{index}.npz"),
                           "--client-id", f"site-{index}", *args, name=name or f"site-{index}")


def three_clients(processes, shards: Path, tmp_path: Path, rounds: int, min_fit_clients: int, epochs: int = 20):
    """A server waiting for three clients and the three clients (site-1..3)."""
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", str(rounds), "--min-clients", "3",
                          "--min-fit-clients", str(min_fit_clients), "--epochs", str(epochs))
    return logdir, address, server, {i: start_client(processes, shards, address, i) for i in (1, 2, 3)}


def curve_client(processes, address: str, shards: Path, keys: Path, index: int, *, name: str | None = None):
    """Client site-<index> on shard <index> with key pair client-<index> from ``keys`` (made by ``pyfed keys``)."""
    return processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{index}.npz"),
                           "--client-id", f"site-{index}", "--curve-secret-key", str(keys / f"client-{index}.key_secret"),
                           "--server-public-key", str(keys / "server.key"), name=name or f"site-{index}")


def finish(processes, server, clients, server_timeout_s: float = 300) -> None:
    """The server ends the run with status 0, then every client exits 0."""
    assert processes.wait(server, server_timeout_s) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)


def freeze_mid_training(processes, client, rounds: Iterable[int], timeout_s: float = 300) -> int:
    """The first of ``rounds`` in which ``client`` is caught training: SIGSTOP it once its log says
    "round r: training", and once it is stopped, check that its log does not yet say "round r: trained"
    (the line that ends its training, after which it may upload). Then it is stopped mid-training and
    nothing of round r can leave it until it is continued (SIGCONT) or killed: a condition the run
    cannot pass first, on a machine however fast. A client that had already trained is continued and
    tried again in the next round. Returns the round it is stopped in."""
    for server_round in rounds:
        processes.wait_for_line(client, f"round {server_round}: training", timeout_s)
        os.kill(client.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(client.pid) != "T":
            assert time.monotonic() < deadline, f"{client.log_path.name} did not stop"
            time.sleep(0.01)
        if f"round {server_round}: trained" not in client.log_path.read_text(errors="replace"):
            return server_round
        os.kill(client.pid, signal.SIGCONT)  # it finished first: the next round
    raise AssertionError(f"{client.log_path.name} finished training before it could be stopped in rounds {rounds}")


def _state(pid: int) -> str:
    """A process's state letter (T: stopped), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def seconds_until(process, text: str, timeout_s: float = 60) -> float:
    """Seconds from now until ``text`` appears in the process's log."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if text in process.log_path.read_text(errors="replace"):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen in {process.log_path.name} within {timeout_s}s")


def scalar_steps(run_dir):
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Tensors(tag)] for tag in accumulator.Tags()["tensors"]}


def run_dir(logdir: Path) -> Path:
    """The folder of the run ``logdir/summary.json`` describes: its TensorBoard events (``server``, ``clients``)."""
    return logdir / json.loads((logdir / "summary.json").read_text())["run_name"]


def check_every_round_once(logdir: Path, rounds: int) -> dict:
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))
    steps = scalar_steps(run_dir(logdir) / "server")
    for tag in ("test/accuracy", "round/participants"):
        assert steps[tag] == list(range(1, rounds + 1)), (tag, steps[tag])
    return summary


class Peer:
    """A hand-driven DEALER: what a malicious or broken client can send."""

    def __init__(self, context: zmq.Context, address: str, curve: tuple[Path, Path] | None = None):
        """``curve``: (this peer's .key_secret, the server's .key): connect with CurveZMQ."""
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            from pyfed.wire.security import load_key_pair, load_public_key

            public, secret = load_key_pair(curve[0])
            self.socket.curve_publickey, self.socket.curve_secretkey = public, secret
            self.socket.curve_serverkey = load_public_key(curve[1])
        self.socket.connect(address)

    def send(self, frames) -> None:
        self.socket.send_multipart(list(frames))

    def receive(self, timeout_s: float = 30, skip=(MessageType.EVALUATE, MessageType.FIT)) -> Message:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                message = protocol.decode(self.socket.recv_multipart())
                if message.type not in skip:
                    return message
        raise AssertionError("no reply from the server")

    def error_code(self, frames) -> str:
        self.send(frames)
        reply = self.receive()
        assert reply.type is MessageType.ERROR, reply
        return reply.body["code"]

    def upload(self, frames, declared: int | None = None) -> None:
        """Send an UPDATE as a client does: ask for a slot (UPLOAD_READY, declaring its arrays' bytes,
        or ``declared``), wait for the grant, then send it."""
        header = json.loads(bytes(frames[0]))
        size = sum(len(f) for f in frames[1:]) if declared is None else declared
        ready = Message(MessageType.UPLOAD_READY, round=header["round"], client_id=header["client_id"],
                        body={"attempt": header["body"]["attempt"], "bytes": size})
        self.send(protocol.encode(ready))
        grant = self.receive(timeout_s=60, skip=(MessageType.EVALUATE, MessageType.FIT))
        assert grant.type is MessageType.UPLOAD_GRANT and grant.round == header["round"], grant
        self.send(frames)

    def upload_error_code(self, frames) -> str:
        """:meth:`upload`, then the code of the ERROR it gets back."""
        self.upload(frames)
        reply = self.receive()
        assert reply.type is MessageType.ERROR, reply
        return reply.body["code"]

    def secure_aggregation(self, client_id: str, stages, fit: Message, change=None, num_examples: int = 100,
                           timeout_s: float = 300) -> Message:
        """Take part in secure aggregation as a client does, from ``fit`` on, answering each stage with
        ``stages`` (a ClientStages, or a lying subclass) and each later FIT likewise with a zero change;
        returns the FINISH (a LEAVE is sent back). ``change``: what it masks (default: no change)."""
        from pyfed.federation.secure_aggregation import flatten_change

        def begin(fit: Message) -> None:
            weights = [np.array(a) for a in fit.arrays]
            body = stages.begin(fit.body["run"], fit.round, fit.body["attempt"], fit.body["secagg"],
                                flatten_change(weights, weights) if change is None else change, num_examples,
                                {"fit_s": 0.1, "history": {}})
            self.send(protocol.encode(Message(MessageType.SECAGG_KEYS, round=fit.round, client_id=client_id, body=body)))

        begin(fit)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.socket.poll(100):
                continue
            message = protocol.decode(self.socket.recv_multipart())
            if message.type is MessageType.FINISH:
                self.leave(client_id)
                return message
            if message.type is MessageType.FIT and "secagg" in message.body:
                begin(message)
            elif message.type in (MessageType.SECAGG_ROSTER, MessageType.SECAGG_BOXES, MessageType.SECAGG_UNMASK):
                try:
                    kind, body, arrays = stages.answer(message.type, message.round, message.body)
                except Exception:  # noqa: BLE001 - a request this client refuses, as a real client does
                    continue
                self.send(protocol.encode(Message(kind, round=message.round, client_id=client_id, body=body,
                                                  arrays=arrays)))
        raise AssertionError(f"no FINISH within {timeout_s}s")

    def leave_when_finished(self, server, client_id: str = "mallory", timeout_s: float = 300) -> None:
        """Answer the server's FINISH with a LEAVE, as a client does (unless this peer's socket is closed
        or the server has exited); everything else it is sent meanwhile is ignored."""
        deadline = time.monotonic() + timeout_s
        while not self.socket.closed and server.poll() is None and time.monotonic() < deadline:
            if self.socket.poll(100) and protocol.decode(self.socket.recv_multipart()).type is MessageType.FINISH:
                self.leave(client_id)
                return

    def leave(self, client_id: str) -> None:
        self.send(protocol.encode(Message(MessageType.LEAVE, client_id=client_id, body={"reason": "done"})))

    def join(self, client_id: str, num_examples: int = 100) -> Message:
        self.send(protocol.encode(Message(MessageType.JOIN, client_id=client_id, body={"num_examples": num_examples})))
        welcome = self.receive()
        assert welcome.type is MessageType.WELCOME, welcome
        return welcome


def update(round_: int, arrays, client_id: str = "mallory", num_examples: int = 100, attempt: int = 1,
           history: dict | None = None) -> list:
    return protocol.encode(Message(MessageType.UPDATE, round=round_, client_id=client_id, arrays=arrays,
                                   body={"attempt": attempt, "num_examples": num_examples, "fit_s": 0.1,
                                         "history": history or {}}))


def mallory_round(processes, shards: Path, logdir: Path, act, *server_args: str,
                  name: str = "server", honest_sites: tuple[int, ...] = (1, 2)) -> tuple[str, dict]:
    """One round with honest sites (two, unless ``honest_sites`` says otherwise) and mallory, a
    hand-driven peer that does ``act(mallory, fit, weights)`` when asked to train; returns the server's
    log and the round's record."""
    address = f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients",
                          str(len(honest_sites) + 1), *server_args, name=name)
    context = zmq.Context()
    try:
        mallory = Peer(context, address)
        weights = [np.array(a) for a in mallory.join("mallory").arrays]
        honest = [start_client(processes, shards, address, i, name=f"{name}-site-{i}") for i in honest_sites]
        fit = mallory.receive(timeout_s=120, skip=())
        assert fit.type is MessageType.FIT, fit
        act(mallory, fit, weights)
        mallory.leave_when_finished(server)  # the server need not wait out its grace for mallory's LEAVE
        finish(processes, server, honest)
    finally:
        context.destroy(linger=0)
    return server.log_path.read_text(), json.loads((logdir / "summary.json").read_text())["rounds"][0]


def chunked_update(fit, weights, order=None, resize=None, count=None) -> list[list]:
    """Mallory's update in chunks (the digits model: one chunk an array), as a client sends it, or
    with its chunks reordered, one resized, or a wrong count announced."""
    messages = protocol.encode_update(Message(MessageType.UPDATE, round=fit.round, client_id="mallory",
                                              arrays=weights,
                                              body={"attempt": 1, "num_examples": 100, "fit_s": 0.1, "history": {}}),
                                      chunk_bytes=1)  # a chunk of 1 byte is "larger than a chunk" for any model
    head, chunks = messages[0], messages[1:]
    # the client above split per byte; the server's chunks are 16 MiB, so one per array here: rebuild them
    chunks = [protocol.encode(Message(MessageType.UPDATE_CHUNK, round=fit.round, client_id="mallory",
                                      body={"attempt": 1, "index": i},
                                      arrays=[np.frombuffer(np.ascontiguousarray(w).tobytes()
                                                            + (b"\0" if resize == i else b""), np.uint8)]))
              for i, w in enumerate(weights)]
    header = json.loads(bytes(head[0]))
    header["body"]["chunks"] = count if count is not None else len(weights)
    return [[json.dumps(header).encode()], *[chunks[i] for i in (order or range(len(chunks)))]]
