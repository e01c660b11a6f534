"""Flow control of uploads over ZeroMQ (federation/uploads.py): real server and clients on loopback,
and a protocol-level client that breaks the rules."""

import json

import numpy as np
import pytest

from pyfed.wire import protocol
from pyfed.wire.protocol import Message, MessageType
from tests.integration.support import chunked_update as _chunked
from tests.integration.support import finish, free_port, mallory_round, start_client, start_server, update

pytestmark = pytest.mark.integration


def test_clients_upload_one_at_a_time_and_every_update_is_aggregated(tmp_path, processes, shards):
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "3", "--epochs", "2",
                          "--max-inflight-updates", "1", "--log-level", "DEBUG")
    clients = [start_client(processes, shards, address, i) for i in (1, 2, 3)]
    finish(processes, server, clients)
    summary = json.loads((logdir / "summary.json").read_text())
    assert [r["clients"] for r in summary["rounds"]] == [["site-1", "site-2", "site-3"]] * 2
    assert "max-inflight-updates 1" in server.log_path.read_text()
    for client in clients:
        assert client.log_path.read_text().count("update sent") == 2


def _one_round_with_mallory(tmp_path, processes, shards, act) -> tuple[str, dict]:
    """One round, one upload slot, two honest sites and mallory (support.mallory_round)."""
    return mallory_round(processes, shards, tmp_path / "logs", act, "--epochs", "20", "--max-inflight-updates", "1",
                         "--round-timeout", "120", "--min-upload-rate", "0.001")  # the allowance: the round timeout


def test_an_update_sent_without_a_grant_is_refused_and_the_round_carries_on(tmp_path, processes, shards):
    def act(mallory, fit, weights):
        assert mallory.error_code(update(fit.round, weights)) == "bad_reply"

    log, record = _one_round_with_mallory(tmp_path, processes, shards, act)
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"] == {"mallory": "answer refused: it sent its update without a grant (UPLOAD_READY "
                                            "first, then the UPDATE once granted)"}
    assert "Traceback" not in log


def test_a_client_that_dies_holding_the_only_upload_slot_frees_it(tmp_path, processes, shards):
    """Mallory asks first, is granted the only slot and its connection dies: the sites, waiting in
    line, get the slot in turn; nobody waits for a timeout."""
    def act(mallory, fit, weights):
        ready = Message(MessageType.UPLOAD_READY, round=fit.round, client_id="mallory",
                        body={"attempt": 1, "bytes": sum(w.nbytes for w in weights)})
        mallory.send(protocol.encode(ready))
        grant = mallory.receive(timeout_s=30)
        assert grant.type is MessageType.UPLOAD_GRANT
        mallory.socket.close(0)  # its connection dies with the slot

    log, record = _one_round_with_mallory(tmp_path, processes, shards, act)
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"]["mallory"].startswith("connection lost"), record["dropped"]
    assert record["duration_s"] < 60  # far below the 120 s round timeout
    assert "Traceback" not in log


def test_an_upload_request_that_does_not_fit_the_model_is_refused(tmp_path, processes, shards):
    def act(mallory, fit, weights):
        ready = Message(MessageType.UPLOAD_READY, round=fit.round, client_id="mallory",
                        body={"attempt": 1, "bytes": 10**12})
        assert mallory.error_code(protocol.encode(ready)) == "bad_reply"

    log, record = _one_round_with_mallory(tmp_path, processes, shards, act)
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"]["mallory"].startswith("answer refused: it declares an update of 1000000000000 bytes")


# --- updates in chunks (wire/chunks.py) ---------------------------------------------------------------

def _grant(mallory, fit, weights):
    ready = Message(MessageType.UPLOAD_READY, round=fit.round, client_id="mallory",
                    body={"attempt": 1, "bytes": sum(w.nbytes for w in weights)})
    mallory.send(protocol.encode(ready))
    assert mallory.receive(timeout_s=30).type is MessageType.UPLOAD_GRANT


def test_an_update_in_chunks_is_assembled_and_aggregated(tmp_path, processes, shards):
    def act(mallory, fit, weights):
        _grant(mallory, fit, weights)
        for frames in _chunked(fit, weights):
            mallory.send(frames)

    log, record = _one_round_with_mallory(tmp_path, processes, shards, act)
    assert record["clients"] == ["mallory", "site-1", "site-2"] and record["dropped"] == {}


@pytest.mark.parametrize("broken, reason", [
    ({"order": [1, 0, 2, 3, 4, 5]}, "sent a malformed message: chunk 1 arrived where chunk 0 of 6 was due (out of "
                                    "order, repeated or one missing)"),
    ({"order": [0, 2, 3, 4, 5]}, "sent a malformed message: chunk 2 arrived where chunk 1 of 6 was due (out of "
                                 "order, repeated or one missing)"),
    ({"resize": 0}, "sent a malformed message: chunk 0 has 32769 bytes; it must have 32768"),
    ({"count": 7}, "sent a malformed message: its update announces 7 chunks; an update of this model encoded none "
                   "travels in 6"),
])
def test_chunks_out_of_order_missing_oversized_or_miscounted_are_refused(tmp_path, processes, shards, broken,
                                                                        reason):
    def act(mallory, fit, weights):
        _grant(mallory, fit, weights)
        for frames in _chunked(fit, weights, **broken):
            mallory.send(frames)

    log, record = _one_round_with_mallory(tmp_path, processes, shards, act)
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"]["mallory"] == reason
    assert "Traceback" not in log


def test_chunks_without_a_grant_are_refused(tmp_path, processes, shards):
    def act(mallory, fit, weights):
        for frames in _chunked(fit, weights)[1:]:  # chunks, no header, no grant
            mallory.send(frames)

    log, record = _one_round_with_mallory(tmp_path, processes, shards, act)
    assert record["clients"] == ["site-1", "site-2"]
    assert record["dropped"]["mallory"] == ("sent a malformed message: a chunk of round 1 attempt 1, which it has "
                                            "no update in chunks under way for")


BIG_MODEL = """
import keras

def build():  # 64-80000-10: 6,000,010 parameters, 24 MB: its updates travel in 5 chunks (20.5 MB kernel: 2)
    model = keras.Sequential([keras.layers.Input((64,)), keras.layers.Dense(80000, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
"""


def test_real_clients_send_a_model_larger_than_a_chunk_in_chunks(tmp_path, processes, shards):
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    (tmp_path / "big.py").write_text(BIG_MODEL)
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "2", "--epochs", "1",
                          "--model", f"{tmp_path / 'big.py'}:build")
    clients = [start_client(processes, shards, address, i) for i in (1, 2)]
    finish(processes, server, clients)
    for client in clients:
        assert "update sent (24.0 MB, 5 chunks)" in client.log_path.read_text()
    record = json.loads((logdir / "summary.json").read_text())["rounds"][0]
    assert record["clients"] == ["site-1", "site-2"] and record["test_accuracy"] > 0.5
