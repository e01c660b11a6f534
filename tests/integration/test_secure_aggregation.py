"""Secure aggregation end to end in a simulation: the same model as plain FedAvg within the
quantisation error, and clients lost at any stage either survived or the attempt retried."""

import keras
import numpy as np
import pytest

from pyfed.federation.secure_aggregation import SecureAggregation
from pyfed.federation.simulation import Simulation
from pyfed.learning.data import load_dataset, split_dataset
from pyfed.learning.model import default_model
from pyfed.wire.protocol import FitPlan, MessageType

pytestmark = pytest.mark.integration


def simulate(secure_aggregation, clients=5, rounds=2, drop_rate=0.0, spy=None, **options):
    x, y = load_dataset("digits")
    shards, test = split_dataset(x, y, clients, seed=0)
    keras.utils.set_random_seed(0)
    model = default_model((64,), 10, 0.003)
    simulation = Simulation(model, shards, rounds=rounds, plan=FitPlan(1, 32, 0.003), test_data=test, seed=0,
                            progress=False, drop_rate=drop_rate, min_fit_clients=2,
                            secure_aggregation=secure_aggregation, **options)
    if spy is not None:
        spy(simulation.pool)
    history = simulation.run()
    return history, model.get_weights()


def test_a_securely_aggregated_simulation_ends_where_plain_fedavg_does():
    plain_history, plain = simulate(None)
    secure_history, secure = simulate(SecureAggregation(clip=1.0, quantisation_bits=24))
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, secure)) < 1e-5
    assert [r.clients for r in secure_history] == [r.clients for r in plain_history]


def test_masked_inputs_are_asked_for_one_upload_slot_at_a_time_and_the_sum_is_the_same():
    """Each masked input is a model-sized upload: the server asks for them --max-inflight-updates
    at a time (here 1), and the model is the one all-at-once aggregation gives, bit for bit: the
    masked sum is exact in its ring, and a simulation draws each client's stochastic rounding from
    its seed (when it was drawn from the OS, as a networked client's is, two runs in CI once differed
    by 0.005: rounding noise of the first round grows through the second round's training)."""
    outstanding, most = set(), [0]

    def spy(pool):
        send, poll = pool.send, pool.poll

        def counting_send(client_id, request):
            if getattr(request, "kind", None) is MessageType.SECAGG_BOXES:
                outstanding.add(client_id)
                most[0] = max(most[0], len(outstanding))
            return send(client_id, request)

        def counting_poll(timeout_s):
            events = poll(timeout_s)
            for event in events:
                if getattr(event, "kind", None) is MessageType.SECAGG_MASKED:
                    outstanding.discard(event.client_id)
            return events

        pool.send, pool.poll = counting_send, counting_poll

    _, paced = simulate(SecureAggregation(clip=1.0, quantisation_bits=24), spy=spy, max_inflight_updates=1)
    _, together = simulate(SecureAggregation(clip=1.0, quantisation_bits=24), max_inflight_updates=4)
    assert most[0] == 1
    assert all(np.array_equal(a, b) for a, b in zip(paced, together))


def test_clients_lost_at_any_stage_are_survived_or_the_attempt_retried():
    history, weights = simulate(SecureAggregation(clip=1.0), clients=8, rounds=3, drop_rate=0.08)
    assert [r.round for r in history] == [1, 2, 3]
    assert all(len(r.clients) >= 2 for r in history)
    assert all(np.isfinite(w).all() for w in weights)
    assert history[-1].test_accuracy > 0.5
    lost = [reason for r in history for reason in r.dropped.values()]
    assert lost and all("simulated failure" in reason for reason in lost), lost


WIDE_MODEL = """
import keras

def build():
    model = keras.Sequential([keras.layers.Input((64,)), keras.layers.Dense(2048, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
"""


def test_a_networked_server_aggregates_securely_and_learns(tmp_path, processes, shards):
    import json

    from tests.integration.support import free_port, start_client, start_server

    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    (tmp_path / "wide.py").write_text(WIDE_MODEL)  # a masked input (all 153,610 floats in one frame) is
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "3", "--epochs", "5",
                          "--secure-aggregation", "--secagg-clip", "2",  # larger than any one array and the header
                          "--model", f"{tmp_path / 'wide.py'}:build")
    clients = [start_client(processes, shards, address, i) for i in (1, 2, 3)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    log = server.log_path.read_text()
    assert log.count("secure aggregation: the weighted sum of 3 updates") == 2
    assert "update from" not in log  # no individual update ever reached the server
    summary = json.loads((logdir / "summary.json").read_text())
    assert [r["clients"] for r in summary["rounds"]] == [["site-1", "site-2", "site-3"]] * 2
    assert summary["rounds"][-1]["test_accuracy"] > 0.6


def _through_proxy(processes, shards, server_port: int, proxy_port: int, index: int, client_id: str):
    """A client whose link to the server runs through a delaying proxy on ``proxy_port`` (so that it
    can be cut between two stages: what the server sends takes 0.3 s to arrive)."""
    return processes.pyfed("client", "--server", f"tcp://127.0.0.1:{proxy_port}", "--data",
                           str(shards / f"client-{index}.npz"), "--client-id", client_id, name=client_id)


def test_a_client_cut_off_after_sharing_its_keys_is_unmasked_and_the_round_completes(tmp_path, processes, shards):
    """Four clients (threshold 3); the link of one is cut once the server has its shares and asks for
    masked inputs: the round completes with the three survivors' sum, the cut client's pairwise
    masks removed through its neighbours' shares."""
    import json

    from bench.link import DelayProxy
    from tests.integration.support import free_port, start_client, start_server

    logdir, port = tmp_path / "logs", free_port()
    server = start_server(processes, shards, logdir, f"tcp://127.0.0.1:{port}", "--rounds", "2", "--min-clients", "4",
                          "--epochs", "3", "--secure-aggregation", "--round-timeout", "40")
    proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.3)
    try:
        victim = _through_proxy(processes, shards, port, proxy.address[1], 1, "site-cut")
        others = [start_client(processes, shards, f"tcp://127.0.0.1:{port}", i) for i in (1, 2, 3)]
        processes.wait_for_line(server, "round 1: secure aggregation: 4 of 4 clients shared their keys", 120)
        proxy.close()  # the server's request for its masked input is still in the proxy: it never arrives
        assert processes.wait(server, 300) == 0, processes.tail(server)
    finally:
        proxy.close()
    for client in others:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    log = server.log_path.read_text()
    assert "round 1: secure aggregation: the weighted sum of 3 updates" in log and "1 dropped after sharing keys" in log
    assert "masked update sent" not in victim.log_path.read_text()
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["rounds"][0]["clients"] == ["site-1", "site-2", "site-3"]
    assert "site-cut" in summary["rounds"][0]["dropped"]
    assert summary["rounds"][-1]["test_accuracy"] > 0.6


def test_below_the_threshold_the_attempt_is_abandoned_unmasking_nothing_and_retried(tmp_path, processes, shards):
    """Three clients (threshold 2); two are cut once their shares are in: one masked input is below the
    threshold, so the server abandons the attempt without asking anyone to unmask; when their links
    are back the round is retried and completes."""
    import json

    from bench.link import DelayProxy
    from tests.integration.support import free_port, start_client, start_server

    logdir, port = tmp_path / "logs", free_port()
    server = start_server(processes, shards, logdir, f"tcp://127.0.0.1:{port}", "--rounds", "1", "--min-clients", "3",
                          "--epochs", "3", "--secure-aggregation", "--round-timeout", "30")
    proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), 0.3)
    proxy_port = proxy.address[1]
    try:
        cut = [_through_proxy(processes, shards, port, proxy_port, i, f"site-{i}") for i in (1, 2)]
        survivor = start_client(processes, shards, f"tcp://127.0.0.1:{port}", 3)
        processes.wait_for_line(server, "round 1: secure aggregation: 3 of 3 clients shared their keys", 120)
        proxy.close()
        processes.wait_for_line(server, "secure aggregation abandoned", 120)
        proxy = DelayProxy(("127.0.0.1", proxy_port), ("127.0.0.1", port), 0.0)  # the links are back
        assert processes.wait(server, 300) == 0, processes.tail(server)
    finally:
        proxy.close()
    assert "1 masked inputs; the threshold is 2 (nothing was unmasked)" in server.log_path.read_text()
    survivor_log = survivor.log_path.read_text()
    assert survivor_log.count("unmasking shares sent") == 1  # only in the retried attempt
    summary = json.loads((logdir / "summary.json").read_text())
    assert len(summary["rounds"][0]["failed_attempts"]) == 1
    retried = summary["rounds"][0]["clients"]  # the survivor and whichever cut client was back in time
    assert "site-3" in retried and len(retried) >= 2 and set(retried) <= {"site-1", "site-2", "site-3"}
    assert any("unmasking shares sent" in client.log_path.read_text() for client in cut)


def test_over_the_network_with_fixed_seeds_the_model_is_plain_fedavgs_within_the_quantisation_error(
        tmp_path, processes, shards):
    from pyfed.persistence.files import load_state
    from pyfed.persistence.store import list_checkpoints
    from tests.integration.support import free_port, start_client, start_server

    def run(name: str, *extra: str) -> list[np.ndarray]:
        logdir, address = tmp_path / name, f"tcp://127.0.0.1:{free_port()}"
        server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "3",
                              "--epochs", "5", *extra, name=f"{name}-server")
        clients = [start_client(processes, shards, address, i, "--seed", str(i), name=f"{name}-site-{i}")
                   for i in (1, 2, 3)]
        assert processes.wait(server, 300) == 0, processes.tail(server)
        for client in clients:
            assert processes.wait(client, 60) == 0, processes.tail(client)
        return load_state(list_checkpoints(logdir / "checkpoints")[-1])["weights"]

    plain = run("plain")
    secure = run("secure", "--secure-aggregation", "--secagg-bits", "24", "--secagg-clip", "1")
    # the same training (seeded clients): the means differ by at most one quantisation step (2 clip /
    # (2^24 - 1)), plus float32's rounding of the sum. One round only: a second would train from
    # weights that differ by rounding noise, which Adam can grow past any fixed bound
    step = 2 * 1.0 / (2**24 - 1)
    assert all(np.all(np.abs(a - b) <= step + np.abs(a) * 2.0**-23) for a, b in zip(plain, secure)), \
        max(float(np.abs(a - b).max()) for a, b in zip(plain, secure))
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, secure)) > 0  # it did go through the ring


#: Far above a round's training on a loaded machine (CI's took over 10 s), so no stage times out by chance
MALLORY_ROUND_TIMEOUT_S = 180


def _mallory_round(tmp_path, processes, shards, name: str, act) -> tuple[str, dict]:
    """A round under secure aggregation with two honest sites and mallory (support.mallory_round)."""
    from tests.integration.support import mallory_round

    def checked(mallory, fit, weights):
        assert "secagg" in fit.body
        act(mallory, fit)

    # a round timeout no loaded machine's training reaches: mallory's lies, not a timeout, must end its part
    return mallory_round(processes, shards, tmp_path / name, checked, "--epochs", "3", "--secure-aggregation",
                         "--round-timeout", str(MALLORY_ROUND_TIMEOUT_S),
                         "--secagg-min-clients", "2",  # the two sites, once mallory is out
                         name=f"{name}-server")


def _keys_body(fit, mask_key: bytes, share_key: bytes, num_examples: int = 100) -> dict:
    """A SECAGG_KEYS body with these public keys, as a client makes it (signed, with a commitment)."""
    import os

    from pyfed.federation.secagg import SigningKey, commit
    from pyfed.federation.secure_aggregation import Advertised, PublicKeys, round_context, seed_binding
    from pyfed.wire.protocol import b64

    context, signing = round_context(fit.body["run"], fit.round, fit.body["attempt"]), SigningKey()
    unsigned = Advertised(PublicKeys(mask_key, share_key, signing.public),
                          commit(os.urandom(32), seed_binding(context, "mallory")), num_examples)
    return {"attempt": fit.body["attempt"], "mask_key": b64(mask_key), "share_key": b64(share_key),
            "sign_key": b64(signing.public), "commitment": b64(unsigned.commitment), "num_examples": num_examples,
            "signature": b64(signing.sign(unsigned.statement(context, "mallory")))}


def test_a_client_answering_out_of_turn_or_with_an_unusable_key_is_dropped_and_the_round_completes(
        tmp_path, processes, shards):
    from pyfed.wire.protocol import Message, b64, encode

    def act(mallory, fit):
        early = encode(Message(MessageType.SECAGG_MASKED, round=fit.round, client_id="mallory",
                               arrays=[np.zeros(5, np.uint32)], body={"attempt": 1, "fit_s": 0.1, "history": {}}))
        assert mallory.error_code(early) == "bad_reply"  # a stage it was not asked for
        small_order = encode(Message(MessageType.SECAGG_KEYS, round=fit.round, client_id="mallory",
                                     body=_keys_body(fit, bytes(32), bytes(range(32)))))
        assert mallory.error_code(small_order) == "bad_reply"

    log, record = _mallory_round(tmp_path, processes, shards, "keys", act)
    assert record["clients"] == ["site-1", "site-2"]
    assert "not its own" in record["dropped"]["mallory"] or "not usable" in record["dropped"]["mallory"]
    assert "Traceback" not in log


def test_a_client_whose_sealed_shares_do_not_open_is_left_out_and_the_round_retried_without_it(
        tmp_path, processes, shards):
    import os

    from pyfed.federation.secagg import KeyPair
    from pyfed.wire.protocol import Message, b64, encode

    def act(mallory, fit):
        keys = [KeyPair(), KeyPair()]
        mallory.send(encode(Message(MessageType.SECAGG_KEYS, round=fit.round, client_id="mallory",
                                    body=_keys_body(fit, keys[0].public, keys[1].public))))
        roster = mallory.receive(timeout_s=120, skip=(MessageType.EVALUATE, MessageType.FIT))
        assert roster.type is MessageType.SECAGG_ROSTER
        garbage = {cid: b64(os.urandom(288)) for cid in roster.body["roster"] if cid != "mallory"}
        mallory.send(encode(Message(MessageType.SECAGG_SHARES, round=fit.round, client_id="mallory",
                                    body={"attempt": 1, "boxes": garbage})))

    log, record = _mallory_round(tmp_path, processes, shards, "boxes", act)
    assert "mallory: its sealed shares did not open for site-1, site-2; left out" in log
    assert len(record["failed_attempts"]) == 1 and record["clients"] == ["site-1", "site-2"]
    assert record["failed_attempts"][0]["dropped"] == {
        "mallory": "secure aggregation: its sealed shares did not open for site-1, site-2"}
    assert record["duration_s"] < MALLORY_ROUND_TIMEOUT_S  # the accusation ends the attempt at once, not a timeout


def test_a_client_that_falsely_names_an_honest_neighbour_leaves_the_round_with_it():
    """The server cannot open the boxes, so it cannot tell the liar from the named client: both leave
    the round's next attempts, and the others' round completes. A lie costs the liar its own place."""
    from pyfed.federation.answers import ClientAnswers
    from pyfed.federation.secure_aggregation import ClientStages

    class Liar(ClientStages):
        def answer(self, kind, server_round, body):
            if kind is MessageType.SECAGG_BOXES:  # every box opened; it says those of client-2 did not
                metrics = self._input[2]
                return MessageType.SECAGG_MASKED, {"attempt": body["attempt"], **metrics, "bad_boxes": ["client-2"]}, []
            return super().answer(kind, server_round, body)

    x, y = load_dataset("digits")
    shards, test = split_dataset(x, y, 5, seed=0)
    keras.utils.set_random_seed(0)
    model = default_model((64,), 10, 0.003)
    simulation = Simulation(model, shards, rounds=2, plan=FitPlan(1, 32, 0.003), test_data=test, seed=0,
                            progress=False, min_fit_clients=2, secure_aggregation=SecureAggregation(clip=1.0))
    liar = ClientAnswers("client-1")
    liar.stages = Liar("client-1")
    simulation.pool._answers["client-1"] = liar
    history = simulation.run()

    assert [r.clients for r in history] == [["client-3", "client-4", "client-5"]] * 2
    for record in history:  # it lies again in round 2: the same again, no more
        (failed,) = record.failed_attempts
        assert failed["dropped"] == {
            "client-1": "secure aggregation: said the sealed shares of client-2 did not open (only it said so: "
                        "both leave)",
            "client-2": "secure aggregation: client-1 said its sealed shares did not open (only one said so: "
                        "both leave)"}
    assert history[-1].test_accuracy > 0.5
