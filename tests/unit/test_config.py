"""Configuration: flags > environment > .env > defaults, and one clear error per bad value."""

from pathlib import Path

import pytest

from pyfed.config import ClientConfig, ConfigError, PartitionConfig, ServerConfig, SimulateConfig, resolve

pytestmark = pytest.mark.unit


def server(flags=None, environ=None, dotenv=None):
    return resolve(ServerConfig, flags or {}, environ or {}, dotenv or {})


def test_defaults():
    config = server()
    assert config.rounds == 3 and config.min_clients == 2 and config.address == "tcp://127.0.0.1:5555"
    assert config.logdir == Path("logs") and config.test_data is None and config.round_timeout_s == "auto"


def test_precedence_flags_over_environment_over_dotenv_over_defaults():
    assert server(dotenv={"ROUNDS": "4"}).rounds == 4
    assert server(environ={"ROUNDS": "5"}, dotenv={"ROUNDS": "4"}).rounds == 5
    assert server(flags={"rounds": "6"}, environ={"ROUNDS": "5"}, dotenv={"ROUNDS": "4"}).rounds == 6
    # each setting resolves on its own
    config = server(flags={"rounds": "6"}, environ={"EPOCHS": "2"}, dotenv={"BATCH_SIZE": "64"})
    assert (config.rounds, config.epochs, config.batch_size) == (6, 2, 64)


def test_empty_values_count_as_unset():
    assert server(flags={"rounds": None}, environ={"ROUNDS": ""}, dotenv={"ROUNDS": "7"}).rounds == 7
    assert resolve(ClientConfig, {}, {"CLIENT_EPOCHS": ""}, {}).epochs is None


def test_values_are_parsed_to_their_types():
    config = server(environ={"LEARNING_RATE": "3e-4", "TEST_DATA": "data/test.npz", "ROUND_TIMEOUT": "90",
                             "BIND_ADDRESS": "tcp://*:6000", "LOG_LEVEL": "debug"})
    assert config.learning_rate == pytest.approx(3e-4)
    assert config.test_data == Path("data/test.npz")
    assert config.round_timeout_s == 90.0
    assert config.address == "tcp://*:6000" and config.log_level == "DEBUG"
    assert server(environ={"ROUND_TIMEOUT": "0"}).round_timeout_s is None
    assert server(environ={"ROUND_TIMEOUT": "Auto"}).round_timeout_s == "auto"
    assert server(environ={"MAX_UPDATE_NORM": "2.5", "MAX_EXAMPLES": "100"}).max_update_norm == 2.5
    assert server().max_update_norm is None and server().max_examples == 10_000_000


def test_client_and_partition_configs():
    client = resolve(ClientConfig, {"client_id": "site-7"}, {"SERVER_ADDRESS": "tcp://server:5555",
                                                            "DATA_SHARD": "/data/client-1.npz"}, {})
    assert client.client_id == "site-7" and client.server == "tcp://server:5555"
    assert client.data == "/data/client-1.npz"  # a path, or csv:PATH
    partition = resolve(PartitionConfig, {}, {"DATASET": "npz:/tmp/all.npz", "NUM_CLIENTS": "5"}, {})
    assert partition.dataset == "npz:/tmp/all.npz" and partition.clients == 5


@pytest.mark.parametrize("config_cls, flags, environ, message", [
    (ServerConfig, {"rounds": "three"}, {}, "--rounds / ROUNDS: must be a positive integer, got 'three' (from the flag --rounds)"),
    (ServerConfig, {}, {"ROUNDS": "0"}, "--rounds / ROUNDS: must be a positive integer, got '0' (from the environment variable ROUNDS)"),
    (ServerConfig, {}, {"MIN_CLIENTS": "-2"}, "--min-clients / MIN_CLIENTS: must be a positive integer"),
    (ServerConfig, {}, {"RUN_NAME": "../elsewhere"}, "--run-name / RUN_NAME: '../elsewhere' cannot name a run"),
    (SimulateConfig, {"run_name": "archive"}, {}, "--run-name / RUN_NAME: 'archive' cannot name a run: LOGDIR"),
    (ServerConfig, {}, {"LEARNING_RATE": "fast"}, "--learning-rate / LEARNING_RATE: must be a positive number"),
    (ServerConfig, {}, {"LEARNING_RATE": "nan"}, "--learning-rate / LEARNING_RATE: must be a positive number"),
    (ServerConfig, {}, {"LEARNING_RATE": "-0.1"}, "--learning-rate / LEARNING_RATE: must be a positive number"),
    (ServerConfig, {}, {"BIND_ADDRESS": "localhost:5555"}, "--address / BIND_ADDRESS: must look like tcp://HOST:PORT"),
    (ServerConfig, {}, {"BIND_ADDRESS": "tcp://*:70000"}, "--address / BIND_ADDRESS: must look like tcp://HOST:PORT"),
    (ServerConfig, {}, {"ROUND_TIMEOUT": "soon"}, "--round-timeout / ROUND_TIMEOUT: must be a positive number"),
    (ServerConfig, {}, {"STRATEGY": "fedmagic"}, "--strategy / STRATEGY: must be one of fedavg"),
    (ServerConfig, {}, {"LOG_LEVEL": "loud"}, "--log-level / LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR"),
    (ClientConfig, {}, {"CLIENT_ID": "bad id!"}, "--client-id / CLIENT_ID: must be 1-64 characters"),
    (ClientConfig, {}, {"SERVER_ADDRESS": "http://server"}, "--server / SERVER_ADDRESS: must look like tcp://HOST:PORT"),
    (ClientConfig, {}, {"CLIENT_EPOCHS": "1.5"}, "--epochs / CLIENT_EPOCHS: must be a positive integer"),
    (PartitionConfig, {}, {"DATASET": "cifar"}, "--dataset / DATASET: must be digits, mnist, npz:PATH, csv:PATH or images:DIR"),
    (PartitionConfig, {}, {"TEST_FRACTION": "1.5"}, "--test-fraction / TEST_FRACTION: must be a number in (0, 1)"),
    (PartitionConfig, {}, {"SEED": "-1"}, "--seed / SEED: must be a non-negative integer"),
    (PartitionConfig, {}, {"PARTITION_SCHEME": "random"}, "--scheme / PARTITION_SCHEME: must be one of iid, dirichlet"),
    (PartitionConfig, {}, {"PARTITION_ALPHA": "0"}, "--alpha / PARTITION_ALPHA: must be a positive number"),
    (PartitionConfig, {}, {"CLASSES_PER_CLIENT": "0"}, "--classes-per-client / CLASSES_PER_CLIENT: must be a positive"),
    (ServerConfig, {}, {"PROXIMAL_MU": "-1"}, "--proximal-mu / PROXIMAL_MU: must be a non-negative number"),
    (ServerConfig, {}, {"SERVER_MOMENTUM": "1"}, "--server-momentum / SERVER_MOMENTUM: must be a number in [0, 1)"),
    (ServerConfig, {}, {"BETA2": "1.2"}, "--beta2 / BETA2: must be a number in [0, 1)"),
    (ServerConfig, {}, {"TAU": "0"}, "--tau / TAU: must be a positive number"),
    (ServerConfig, {}, {"TRIM_FRACTION": "0.5"}, "--trim-fraction / TRIM_FRACTION: must be a number in [0, 0.5)"),
    (ServerConfig, {}, {"NUM_BYZANTINE": "one"}, "--num-byzantine / NUM_BYZANTINE: must be a non-negative integer"),
    (ServerConfig, {}, {"CLIENT_EVAL_FRACTION": "0.95"}, "--client-eval-fraction / CLIENT_EVAL_FRACTION: must be a"),
    (SimulateConfig, {}, {"STRATEGY": "fedsgd"}, "--strategy / STRATEGY: must be one of fedavg, fedavgm, fedprox"),
    (SimulateConfig, {}, {"PARTITION_SCHEME": "zipf"}, "--scheme / PARTITION_SCHEME: must be one of"),
])
def test_each_bad_value_names_the_flag_and_the_variable(config_cls, flags, environ, message):
    with pytest.raises(ConfigError) as raised:
        resolve(config_cls, flags, environ, {})
    assert str(raised.value).startswith(message)


def test_strategy_settings_pass_only_what_was_set():
    config = resolve(ServerConfig, {"strategy": "fedadam"}, {"TAU": "0.01", "BETA1": "0.5"}, {"PROXIMAL_MU": ""})
    assert config.strategy_options() == {"tau": 0.01, "beta1": 0.5}
    simulate = resolve(SimulateConfig, {"clients": "100", "scheme": "dirichlet", "alpha": "0.1"},
                       {"STRATEGY": "krum", "NUM_BYZANTINE": "3", "CLIENT_EVAL_FRACTION": "0.1"}, {})
    assert (simulate.clients, simulate.scheme, simulate.alpha) == (100, "dirichlet", 0.1)
    assert simulate.strategy_options() == {"num_byzantine": 3} and simulate.client_eval_fraction == 0.1


def test_a_bad_dotenv_value_says_it_came_from_dotenv():
    with pytest.raises(ConfigError, match=r"\(from the .env entry EPOCHS\)"):
        server(dotenv={"EPOCHS": "many"})
