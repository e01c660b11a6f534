"""A user's compiled model trains with its own optimizer and learning rate (LEARNING_RATE and
OPTIMIZER replace them only when set), and the run says which were in force and where each came from."""

import json

import keras
import pytest

pytestmark = pytest.mark.integration

MODEL = """
import keras


def build():
    model = keras.Sequential([keras.layers.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(1e-7, momentum=0.5), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
"""


def simulate(processes, tmp_path, name: str, *flags: str) -> tuple[dict, str]:
    (tmp_path / "too_slow.py").write_text(MODEL)
    logdir = tmp_path / name
    run = processes.pyfed("simulate", "--clients", "3", "--rounds", "2", "--epochs", "3", "--dataset", "digits",
                          "--seed", "1", "--model", f"{tmp_path / 'too_slow.py'}:build", "--logdir", str(logdir),
                          "--progress", "false", *flags, name=name)
    assert processes.wait(run, 600) == 0, processes.tail(run)
    return json.loads((logdir / "summary.json").read_text()), run.log_path.read_text()


def saved_optimizer(path) -> dict:
    """The optimizer the run's model file says it was trained with (what a user takes home)."""
    model = keras.saving.load_model(path, compile=True)
    return {"class": model.optimizer.__class__.__name__, **model.optimizer.get_config()}


def test_a_model_compiled_with_a_rate_too_small_to_learn_does_not_learn_unless_learning_rate_is_set(tmp_path, processes):
    compiled, compiled_log = simulate(processes, tmp_path, "compiled")
    overridden, overridden_log = simulate(processes, tmp_path, "overridden", "--learning-rate", "0.2")

    losses = [r["test_loss"] for r in compiled["rounds"]]
    accuracies = [r["test_accuracy"] for r in overridden["rounds"]]
    print(f"\nSGD compiled at 1e-7: test loss by round {losses}, accuracy {compiled['final']['test_accuracy']:.3f}; "
          f"LEARNING_RATE=0.2: accuracy by round {accuracies}")
    assert abs(losses[-1] - losses[0]) < 1e-3 and compiled["final"]["test_accuracy"] < 0.3  # it did not learn
    assert overridden["final"]["test_accuracy"] > 0.8  # the same model at the given rate does

    assert ("training: optimizer SGD (the model's compile settings), learning rate 1e-07 (the model's compile "
            "settings), loss sparse_categorical_crossentropy and metrics accuracy (the model's compile settings)"
            in compiled_log)
    assert ("optimizer SGD (the model's compile settings), learning rate 0.2 (--learning-rate / LEARNING_RATE)"
            in overridden_log)
    assert compiled["config"]["learning_rate"] == 1e-7 and compiled["config"]["optimizer"] == "SGD"
    assert overridden["config"]["training"]["learning_rate_from"] == "--learning-rate / LEARNING_RATE"
    saved = saved_optimizer(tmp_path / "compiled" / "model" / "latest.keras")
    assert (saved["class"], saved["learning_rate"], saved["momentum"]) == ("SGD", pytest.approx(1e-7), 0.5)
    saved = saved_optimizer(tmp_path / "overridden" / "model" / "latest.keras")
    assert (saved["class"], saved["learning_rate"], saved["momentum"]) == ("SGD", pytest.approx(0.2), 0.5)


def test_an_optimizer_setting_replaces_the_compiled_one_and_a_rate_cannot_replace_a_schedule(tmp_path, processes):
    _, log_text = simulate(processes, tmp_path, "adam", "--optimizer", "adam", "--rounds", "1")
    assert "optimizer Adam (--optimizer / OPTIMIZER), learning rate 1e-07 (the model's compile settings)" in log_text

    (tmp_path / "scheduled.py").write_text(MODEL.replace(
        "keras.optimizers.SGD(1e-7, momentum=0.5)",
        "keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 100, 0.9))"))
    refused = processes.pyfed("simulate", "--clients", "3", "--rounds", "1", "--model",
                              f"{tmp_path / 'scheduled.py'}:build", "--learning-rate", "0.01",
                              "--logdir", str(tmp_path / "scheduled"), name="scheduled")
    assert processes.wait(refused, 300) == 2, processes.tail(refused)
    assert ("--learning-rate / LEARNING_RATE is 0.01, but the model's optimizer follows a learning-rate schedule "
            "(ExponentialDecay)") in refused.log_path.read_text()


def test_over_the_network_clients_train_with_the_compiled_optimizer_and_rate(tmp_path, processes, shards):
    """The review's case: the server sent the compiled settings, then every FIT's plan replaced the
    rate with LEARNING_RATE's default. Now the plan carries the model's own rate: at 1e-7 the
    federated model does not move."""
    from tests.conftest import free_port
    from tests.integration.support import start_client, start_server

    (tmp_path / "too_slow.py").write_text(MODEL)
    logdir, address = tmp_path / "logs", f"tcp://127.0.0.1:{free_port()}"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "2", "--epochs", "3",
                          "--model", f"{tmp_path / 'too_slow.py'}:build")
    clients = [start_client(processes, shards, address, i) for i in (1, 2)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    assert "learning rate 1e-07 (the model's compile settings)" in server.log_path.read_text()
    summary = json.loads((logdir / "summary.json").read_text())
    losses = [r["test_loss"] for r in summary["rounds"]]
    assert abs(losses[-1] - losses[0]) < 1e-3, losses
    saved = saved_optimizer(logdir / "model" / "latest.keras")
    assert (saved["class"], saved["learning_rate"]) == ("SGD", pytest.approx(1e-7))


def test_a_csv_whose_features_differ_thousands_fold_is_named_when_the_users_model_does_not_scale_them(
        tmp_path, processes):
    import numpy as np

    from tests.site_data import write_csv

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = np.c_[rng.normal(1000, 300, 300) + 200 * y, rng.normal(0.1, 0.02, 300), rng.normal(5, 1, (300, 3))]
    write_csv(tmp_path / "cancer.csv", x.astype(np.float32), y, label_column="diagnosis")
    (tmp_path / "plain.py").write_text(MODEL.replace("(64,)", "(5,)").replace("Dense(10,", "Dense(2,"))
    run = processes.pyfed("simulate", "--clients", "2", "--rounds", "1", "--epochs", "1", "--dataset",
                          f"csv:{tmp_path / 'cancer.csv'}", "--label-column", "diagnosis", "--model",
                          f"{tmp_path / 'plain.py'}:build", "--logdir", str(tmp_path / "logs"), "--progress", "false",
                          name="unscaled")
    assert processes.wait(run, 300) == 0, processes.tail(run)
    log_text = run.log_path.read_text()
    assert "cancer.csv: the features' scales differ" in log_text and "(feature 0: " in log_text
    assert "feature scaling:" not in log_text  # the user's model has no feature scaling layer to set
