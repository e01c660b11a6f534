"""A model with BatchNorm over the network: the server says what it does with the layers' batch
statistics, under FedBN (--local-layers batchnorm) each site trains and evaluates with its own, and
after the last round the exported model's moving statistics are recalibrated from the sites."""

import json

import pytest

pytestmark = pytest.mark.integration

MODEL = """
import keras


def build():
    model = keras.Sequential([keras.layers.Input((64,)), keras.layers.Dense(32), keras.layers.BatchNormalization(),
                              keras.layers.Activation("relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
"""


def test_under_fedbn_sites_keep_their_batch_norm_layers_and_the_federated_model_learns(tmp_path, processes, shards):
    from tests.conftest import free_port
    from tests.integration.support import finish, start_client, start_server

    (tmp_path / "bn.py").write_text(MODEL)
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "3", "--min-clients", "2", "--epochs", "3",
                          "--model", f"{tmp_path / 'bn.py'}:build", "--local-layers", "batchnorm",
                          "--client-eval-fraction", "0.2")
    clients = [start_client(processes, shards, address, i) for i in (1, 2)]
    finish(processes, server, clients)
    server_log = server.log_path.read_text()
    assert "the model's 1 BatchNormalization layer(s) (batch_normalization) stay at each site (FedBN" in server_log
    for client in clients:
        log_text = client.log_path.read_text()
        assert "round 1: training with" not in log_text  # nothing of its own before it has trained
        assert "round 2: training with this site's own BatchNorm layers (4 arrays, FedBN)" in log_text
        assert "round 3: training with this site's own BatchNorm layers (4 arrays, FedBN)" in log_text
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["config"]["local_layers"] == "batchnorm"
    last = summary["rounds"][-1]
    assert last["federated_evaluation"]["accuracy"] > 0.8 and last["test_accuracy"] > 0.5, last


def test_fedbn_is_refused_for_a_model_without_batch_norm(tmp_path, processes, shards):
    server = processes.pyfed("server", "--test-data", str(shards / "test.npz"), "--local-layers", "batchnorm",
                             "--logdir", str(tmp_path / "logs"), name="server")
    assert processes.wait(server, 300) == 2, processes.tail(server)
    assert ("--local-layers / LOCAL_LAYERS is batchnorm, but the model has no BatchNormalization layer to keep "
            "at the sites") in server.log_path.read_text()


def test_after_the_last_round_the_exported_models_batch_norm_statistics_are_the_sites_pooled_ones(
        tmp_path, processes, shards):
    import keras
    import numpy as np

    from pyfed.learning.model import batch_norm_inputs
    from tests.conftest import free_port
    from tests.integration.support import finish, start_client, start_server

    (tmp_path / "bn.py").write_text(MODEL)
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "2", "--epochs", "2",
                          "--model", f"{tmp_path / 'bn.py'}:build")
    clients = [start_client(processes, shards, address, i) for i in (1, 2)]
    finish(processes, server, clients)
    server_log = server.log_path.read_text()
    assert "BatchNorm recalibration: after the last round each site runs the final model" in server_log
    assert "BatchNorm recalibration: the final model's moving statistics are now those of its layers' inputs at 2 " \
           "site(s): test loss" in server_log
    for client in clients:
        assert "sent the mean and spread of each of BatchNorm layer 0's 32 channels over its" in \
            client.log_path.read_text()
    model = keras.saving.load_model(logdir / "model" / "latest.keras")
    layer = model.layers[1]
    union = np.concatenate([np.load(shards / f"client-{i}.npz")["x"] for i in (1, 2)])
    received = []
    batch_norm_inputs(model, 0, union, received.append)
    received = np.concatenate(received).astype(np.float64)
    assert np.allclose(layer.moving_mean.numpy(), received.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert np.allclose(layer.moving_variance.numpy(), received.var(axis=0), rtol=1e-4, atol=1e-5)
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] > 0.8, summary["final"]
