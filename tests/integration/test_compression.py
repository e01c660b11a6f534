"""Compressed updates end to end: in a simulation and over the network they train as plain FedAvg
does, cut the bytes, and a client whose encoded update does not fit the model is refused."""

import json

import keras
import numpy as np
import pytest

from pyfed.federation.simulation import Simulation
from pyfed.learning.data import load_dataset, split_dataset
from pyfed.learning.model import default_model
from pyfed.wire.protocol import FitPlan, Message, MessageType, encode

pytestmark = pytest.mark.integration


def simulate(codec: str, fraction: float = 0.01, rounds: int = 5, broadcast: str = "none", strategy=None):
    x, y = load_dataset("digits")
    shards, test = split_dataset(x, y, 5, seed=0)
    keras.utils.set_random_seed(0)
    model = default_model((64,), 10, 0.003)
    plan = FitPlan(1, 32, 0.003, update_compression=codec, topk_fraction=fraction, broadcast_compression=broadcast)
    return Simulation(model, shards, rounds=rounds, plan=plan, test_data=test, seed=0, progress=False,
                      **({"strategy": strategy} if strategy is not None else {})).run()


def test_compressed_simulations_learn_as_plain_fedavg_does_for_a_fraction_of_the_bytes():
    plain = simulate("none")
    assert all(r.update_compression_ratio is None for r in plain)
    for codec, fraction, ratio, points in (("fp16", 0.01, 1.99, 0.01), ("int8", 0.01, 3.9, 0.02),
                                           ("topk", 0.1, 4.9, 0.12)):
        history = simulate(codec, fraction)
        assert all(r.update_compression_ratio > ratio for r in history), (codec, history[-1].update_compression_ratio)
        assert history[-1].test_accuracy > plain[-1].test_accuracy - points, (codec, history[-1].test_accuracy)


def test_strategies_that_need_each_update_and_a_half_precision_broadcast_work_on_compressed_updates():
    from pyfed.federation.strategy import make_strategy

    plain = simulate("none", strategy=make_strategy("fedmedian"))
    for codec in ("int8", "topk"):  # each update decoded whole for the median, as they always are held
        history = simulate(codec, 0.1, strategy=make_strategy("fedmedian"))
        assert history[-1].test_accuracy > plain[-1].test_accuracy - 0.12, (codec, history[-1].test_accuracy)
        assert history[-1].update_compression_ratio > 3.9
    fp16_both_ways = simulate("fp16", broadcast="fp16")
    assert fp16_both_ways[-1].test_accuracy > simulate("none")[-1].test_accuracy - 0.02


def test_a_networked_run_with_int8_updates_and_a_half_precision_broadcast_learns_and_reports_it(
        tmp_path, processes, shards):
    from tests.integration.support import free_port, start_client, start_server

    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "3", "--epochs", "5",
                          "--update-compression", "int8", "--broadcast-compression", "fp16")
    clients = [start_client(processes, shards, address, i) for i in (1, 2, 3)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    summary = json.loads((logdir / "summary.json").read_text())
    assert [len(r["clients"]) for r in summary["rounds"]] == [3, 3]
    assert all(r["update_compression_ratio"] > 3.5 for r in summary["rounds"])
    assert summary["rounds"][-1]["test_accuracy"] > 0.6
    assert server.log_path.read_text().count("updates compressed 4.0x") == 2  # int8: a byte a float, and the scales
    model_bytes = 4 * (64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10)  # the default model on the digits (float32)
    for entry in summary["rounds"]:  # sent: three FITs in half precision; received: three int8 updates
        assert 3 * model_bytes * 0.5 < entry["bytes_sent"] < 3 * model_bytes * 0.5 + 5_000, entry["bytes_sent"]
        assert 3 * model_bytes * 0.25 < entry["bytes_received"] < 3 * model_bytes * 0.25 + 5_000, entry["bytes_received"]


@pytest.mark.parametrize("codec, arrays, refusal", [
    ("int8", lambda specs: [np.zeros(s, np.float32) for _, s in specs], "needs int8"),
    ("fp16", lambda specs: [np.zeros(s, np.float16) for _, s in specs], "the plan asks for int8"),
    ("int8", lambda specs: [a for _, s in specs for a in (np.full(s, -128, np.int8),
                                                          np.ones(-(-int(np.prod(s)) // 4096), np.float32))], "-128"),
])
def test_an_encoded_update_that_does_not_fit_is_refused_and_the_round_completes(
        tmp_path, processes, shards, codec, arrays, refusal):
    import zmq

    from pyfed.wire.compression import UpdateCompression, encoded_bytes_of
    from tests.integration.support import Peer, free_port, start_client, start_server

    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "1", "--min-clients", "3", "--epochs", "2",
                          "--update-compression", "int8", "--round-timeout", "180")  # no honest site near it
    context = zmq.Context()
    try:
        mallory = Peer(context, address)
        mallory.join("mallory")
        honest = [start_client(processes, shards, address, i) for i in (1, 2)]
        fit = mallory.receive(timeout_s=120, skip=())
        assert fit.type is MessageType.FIT and fit.body["plan"]["update_compression"] == "int8"
        specs = [(a.dtype.name, a.shape) for a in fit.arrays]
        expected = encoded_bytes_of(UpdateCompression.INT8, specs)  # it asks for a slot as an honest one would
        mallory.upload(encode(Message(MessageType.UPDATE, round=fit.round, client_id="mallory",
                                      body={"attempt": 1, "num_examples": 10, "fit_s": 0.1, "history": {},
                                            "encoding": codec}, arrays=arrays(specs))), declared=expected)
        assert processes.wait(server, 300) == 0, processes.tail(server)
        for client in honest:
            assert processes.wait(client, 60) == 0, processes.tail(client)
    finally:
        context.destroy(linger=0)
    record = json.loads((logdir / "summary.json").read_text())["rounds"][0]
    assert record["clients"] == ["site-1", "site-2"]
    assert refusal in record["dropped"]["mallory"], record["dropped"]
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.parametrize("flags, message", [
    (["--secure-aggregation", "--update-compression", "int8"], "--update-compression / UPDATE_COMPRESSION int8 with"),
    (["--secure-aggregation", "--strategy", "fedmedian"], "needs a FedAvg-family strategy"),
    (["server", "--secure-aggregation", "--max-update-norm", "1"], "--max-update-norm / MAX_UPDATE_NORM needs each"),
    (["--secure-aggregation", "--dp-noise-multiplier", "1"], "with differential privacy is not supported"),
    (["--update-compression", "int4"], "--update-compression / UPDATE_COMPRESSION: must be one of none, fp16"),
    (["--topk-fraction", "0"], "--topk-fraction / TOPK_FRACTION"),
    (["--broadcast-compression", "int8"], "--broadcast-compression / BROADCAST_COMPRESSION: must be one of none, fp16"),
])
def test_settings_that_cannot_work_together_are_refused_at_start_up(flags, message, tmp_path, capsys):
    from pyfed.cli import main

    command = ["server"] if flags[0] == "server" else ["simulate", "--clients", "3"]
    assert main([*command, "--rounds", "1", "--logdir", str(tmp_path), *flags[flags[0] == "server":]]) == 2
    assert message in capsys.readouterr().err
