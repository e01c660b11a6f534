"""Typed configuration for each role, filled from flags > environment > ``.env`` > defaults.

Each setting is declared once, as a dataclass field whose metadata names its flag, its
environment variable and its parser. :func:`resolve` is pure (it takes the three sources as
mappings), so precedence and every bad value are unit-tested without touching the process.
A bad value raises :class:`ConfigError` naming both the flag and the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pyfed.learning.data import SCHEMES
from pyfed.persistence.tracking import BEST_METRICS, check_run_name
from pyfed.ranges import Range
from pyfed.wire.compression import BroadcastCompression, UpdateCompression
from pyfed.wire.protocol import FitPlan, LocalLayers, is_client_id
from pyfed.federation.strategy import STRATEGIES
from pyfed.federation.uploads import DEFAULT_MIN_UPLOAD_MBIT_S, UPLOAD_GRACE_S

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the flag and the environment variable."""


def setting(default: Any, flag: str, env: str, parse: Callable[[str], Any], help: str) -> Any:
    """Declare a config field: its default, ``--flag``, ``ENV_VAR``, parser and help text."""
    return dataclasses.field(default=default, metadata={"flag": flag, "env": env, "parse": parse, "help": help})


# --- parsers: str -> value, raising ValueError with a short reason -----------------------------

# Every number goes through one range check (pyfed.ranges, the one the protocol and the strategies use).
positive_int = Range(1, integer=True).parse
non_negative_int = Range(0, integer=True).parse
positive_float = Range(0, low_open=True).parse
non_negative_float = Range(0).parse
fraction = Range(0, 1, low_open=True, high_open=True).parse
fraction_or_one = Range(0, 1, low_open=True).parse


def interval(low: float, high: float, *, high_open: bool = True) -> Callable[[str], float]:
    """A number in [low, high) (or [low, high] with ``high_open=False``)."""
    return Range(low, high, high_open=high_open).parse


def optional_seconds(text: str) -> float | None:
    """Seconds, or 0 / 'none' for no limit."""
    if text.strip().lower() in {"", "0", "none", "off"}:
        return None
    return positive_float(text)


def round_timeout(text: str) -> float | str | None:
    """'auto' (from the plan, then from measured rounds), seconds, or 0 / 'none' for no limit."""
    if text.strip().lower() == "auto":
        return "auto"
    return optional_seconds(text)


def optional_positive_float(text: str) -> float | None:
    """A positive number, or empty / 'none' for unset."""
    if text.strip().lower() in {"", "none", "off"}:
        return None
    return positive_float(text)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def memory_size(text: str) -> int | None:
    """Bytes: a number with an optional unit (512m, 4g, 4GiB, 4GB; k/m/g alone are binary, as
    Docker's), or empty / 'none' for no limit."""
    value = text.strip().lower().replace(" ", "")
    if value in {"", "none", "off", "0"}:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", value)
    if not match or match[2] not in _SIZE_UNITS:
        raise ValueError(f"must be a size such as 512m, 4g or 4GiB, got {text!r}")
    size = int(float(match[1]) * _SIZE_UNITS[match[2]])
    if not 64 * 1024**2 <= size <= 2**50:
        raise ValueError(f"must be at least 64 MiB, got {text!r}")
    return size


def auto_or_positive_int(text: str) -> int | str:
    """'auto' or a whole number of at least 1."""
    if text.strip().lower() == "auto":
        return "auto"
    return positive_int(text)


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"must be true or false (1/0, yes/no), got {text!r}")


def text(text: str) -> str:
    return text.strip()


def optional_text(text: str) -> str | None:
    return text.strip() or None


def column_name(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must name a column, got an empty string")
    return value


def path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must be a path, got an empty string")
    return Path(text.strip())


def optional_run_name(text: str) -> str | None:
    """A run's name (its folder under LOGDIR and its prefix in TensorBoard), or empty for the start time."""
    return check_run_name(text.strip()) if text.strip() else None


def optional_path(text: str) -> Path | None:
    return Path(text.strip()) if text.strip() else None


def client_id(text: str) -> str:
    value = text.strip()
    if value and not is_client_id(value):
        raise ValueError(f"must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit, got {text!r}")
    return value


def key_prefix(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", value) or value == "server":
        raise ValueError(f"must be a name of letters, digits, - and _ (not server), got {text!r}")
    return value


def optional_owner(text: str) -> tuple[int, int] | None:
    """``UID:GID`` (numbers), or empty for unset."""
    value = text.strip()
    if not value:
        return None
    match = re.fullmatch(r"(\d{1,9}):(\d{1,9})", value)
    if not match:
        raise ValueError(f"must be UID:GID in numbers, e.g. 10001:10001 (the images' user), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def optional_key_name(text: str) -> str | None:
    """A key pair's name (as :func:`key_prefix`), or empty for unset."""
    return key_prefix(text) if text.strip() else None


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return value
    return parse


def optional_choice(*options: str) -> Callable[[str], str | None]:
    """One of ``options``, or empty / 'none' for unset."""
    pick = choice(*options)

    def parse(text: str) -> str | None:
        return None if text.strip().lower() in {"", "none"} else pick(text)
    return parse


# Keras's optimizers by the names keras.optimizers.get takes
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta", "adamax", "nadam", "ftrl", "lion")

_ADDRESS = re.compile(r"^tcp://(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def zmq_address(text: str) -> str:
    """A ZeroMQ endpoint: tcp://HOST:PORT (HOST may be * to bind every interface) or ipc://PATH."""
    value = text.strip()
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return value
    match = _ADDRESS.match(value)
    if not match or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"must look like tcp://HOST:PORT with PORT in 1-65535, got {text!r}")
    return value


def dataset_name(text: str) -> str:
    value = text.strip()
    if value.lower() in {"digits", "mnist"}:
        return value.lower()
    if (value[:4] in {"npz:", "csv:"} and len(value) > 4) or (value.startswith("images:") and len(value) > 7):
        return value
    raise ValueError(f"must be digits, mnist, npz:PATH, csv:PATH or images:DIR, got {text!r}")


def log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return value


# --- the configs ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StrategySettings:
    """The strategy and its parameters, shared by ``pyfed server`` and ``pyfed simulate``.

    A parameter left unset takes the strategy's own default; each only matters to the
    strategies named in its help.
    """

    strategy: str = setting("fedavg", "--strategy", "STRATEGY", choice(*STRATEGIES),
                            f"aggregation strategy: {', '.join(STRATEGIES)}")
    proximal_mu: float | None = setting(None, "--proximal-mu", "PROXIMAL_MU", non_negative_float,
                                        "fedprox: weight mu of the proximal term (strategy default 0.01)")
    server_learning_rate: float | None = setting(
        None, "--server-learning-rate", "SERVER_LEARNING_RATE", positive_float,
        "fedavgm, fedadagrad, fedadam, fedyogi: server step size (strategy defaults 1.0, 0.1, 0.01, 0.01)")
    server_momentum: float | None = setting(None, "--server-momentum", "SERVER_MOMENTUM", interval(0, 1),
                                            "fedavgm: server momentum in [0, 1) (strategy default 0.9)")
    beta1: float | None = setting(None, "--beta1", "BETA1", interval(0, 1),
                                  "fedadagrad, fedadam, fedyogi: first-moment decay (strategy default 0.9)")
    beta2: float | None = setting(None, "--beta2", "BETA2", interval(0, 1),
                                  "fedadam, fedyogi: second-moment decay (strategy default 0.99)")
    tau: float | None = setting(None, "--tau", "TAU", positive_float,
                                "fedadagrad, fedadam, fedyogi: adaptivity epsilon (strategy default 0.001)")
    trim_fraction: float | None = setting(None, "--trim-fraction", "TRIM_FRACTION", interval(0, 0.5),
                                          "trimmed-mean: share beta cut from each end (strategy default 0.2)")
    num_byzantine: int | None = setting(None, "--num-byzantine", "NUM_BYZANTINE", non_negative_int,
                                        "krum, multi-krum: malicious clients f to tolerate (strategy default 1)")
    num_selected: int | None = setting(None, "--num-selected", "NUM_SELECTED", non_negative_int,
                                       "multi-krum: updates averaged; 0 means n - f (strategy default 0)")
    client_eval_fraction: float = setting(0.0, "--client-eval-fraction", "CLIENT_EVAL_FRACTION", interval(0, 0.9),
                                          "share of each client's data held out to evaluate the global model "
                                          "after every round (federated evaluation); 0: off")

    def strategy_options(self) -> dict[str, Any]:
        """The strategy parameters that were set, for ``make_strategy``."""
        names = {f.name for f in dataclasses.fields(StrategySettings)} - {"strategy", "client_eval_fraction"}
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The run and its local training plan, shared by ``pyfed server`` and ``pyfed simulate``."""

    rounds: int = setting(3, "--rounds", "ROUNDS", positive_int, "number of federated rounds")
    epochs: int = setting(5, "--epochs", "EPOCHS", positive_int, "local epochs per round (clients may override)")
    batch_size: int = setting(32, "--batch-size", "BATCH_SIZE", positive_int, "local batch size (clients may override)")
    learning_rate: float | None = setting(None, "--learning-rate", "LEARNING_RATE", optional_positive_float,
                                          "clients' learning rate, replacing the model's compiled one; default: "
                                          "the model's own (0.001 for a model compiled by PyFed)")
    optimizer: str | None = setting(None, "--optimizer", "OPTIMIZER", optional_choice(*OPTIMIZERS),
                                    "clients' optimizer (a Keras name), replacing the model's compiled one; "
                                    "default: the model's own (adam for a model compiled by PyFed)")
    model: str | None = setting(None, "--model", "MODEL", optional_text,
                                "module:function or path/to/file.py:function returning a Keras model; "
                                "default: a small CNN for images, else an MLP, sized from the data")
    local_layers: str = setting("none", "--local-layers", "LOCAL_LAYERS", choice(*(c.value for c in LocalLayers)),
                                "batchnorm: every BatchNormalization layer stays at each site (FedBN, for sites "
                                "whose features differ); none: the sites share every layer")
    recalibrate_batch_norm: bool = setting(True, "--recalibrate-batch-norm", "RECALIBRATE_BATCH_NORM", boolean,
                                           "after the last round, set the BatchNorm layers' moving statistics of the "
                                           "model the server exports to the pooled statistics of their inputs at the "
                                           "sites (each sends per channel a count, mean and spread); false: keep "
                                           "the sites' averaged ones")
    logdir: Path = setting(Path("logs"), "--logdir", "LOGDIR", path,
                           "directory for TensorBoard events, summary.json and the trained model (model/)")
    run_name: str | None = setting(None, "--run-name", "RUN_NAME", optional_run_name,
                                   "the run's name: TensorBoard shows it as <name>/server and <name>/clients/..., "
                                   "summary.json says it, and a later run archives it as LOGDIR/archive/<name>; "
                                   "default: the time it started; a resumed run keeps its name")
    initial_weights: Path | None = setting(None, "--initial-weights", "INITIAL_WEIGHTS", optional_path,
                                           "start a new run from these weights: a .keras model or a .weights.h5 "
                                           "file of the same architecture (e.g. an earlier run's best.keras); a "
                                           "resumed run keeps its checkpoint's")
    update_compression: str = setting("none", "--update-compression", "UPDATE_COMPRESSION",
                                      choice(*(c.value for c in UpdateCompression)),
                                      "how clients send their updates: none, fp16 (half), int8 (a quarter, "
                                      "stochastic rounding per block), topk (the largest --topk-fraction of each "
                                      "array's change, with error feedback); sent in the plan, clients need no setting")
    topk_fraction: float = setting(0.01, "--topk-fraction", "TOPK_FRACTION", FitPlan.range_of("topk_fraction").parse,
                                   "--update-compression topk: the share of each array's change a client sends")
    broadcast_compression: str = setting("none", "--broadcast-compression", "BROADCAST_COMPRESSION",
                                         choice(*(c.value for c in BroadcastCompression)),
                                         "how the server sends the global model: none, fp16 (half the bytes; "
                                         "clients train from the rounded model)")
    histograms: bool = setting(False, "--histograms", "HISTOGRAMS", boolean,
                               "write a histogram of every global weight array to TensorBoard after each round")
    best_metric: str = setting("auto", "--best-metric", "BEST_METRIC", choice("auto", *BEST_METRICS),
                               "what LOGDIR/model/best.keras is chosen by (accuracies maximised, losses "
                               "minimised); auto: test_accuracy with test data, else federated_accuracy")


@dataclasses.dataclass(frozen=True)
class EncryptionSettings:
    """CurveZMQ, shared by ``pyfed server`` and ``pyfed client`` (keys come from ``pyfed keys``)."""

    curve_secret_key: Path | None = setting(None, "--curve-secret-key", "CURVE_SECRET_KEY", optional_path,
                                            "this side's .key_secret file: encrypt the connections with CurveZMQ "
                                            "(a client may name a directory of them: it takes the first pair no "
                                            "other process on the machine holds)")
    insecure: bool = setting(False, "--insecure", "INSECURE", boolean,
                             "run unencrypted even if keys are configured (prints a warning)")


@dataclasses.dataclass(frozen=True)
class ParticipationSettings:
    """Who trains each round and how many updates it needs, shared by ``pyfed server`` and ``pyfed simulate``."""

    min_fit_clients: int = setting(1, "--min-fit-clients", "MIN_FIT_CLIENTS", positive_int,
                                   "updates a round needs to count; with fewer it is retried")
    fraction_fit: float = setting(1.0, "--fraction-fit", "FRACTION_FIT", fraction_or_one,
                                  "share of the connected clients asked to train each round (at least "
                                  "--min-fit-clients)")


def optional_fraction(text: str) -> float | None:
    """A number in (0, 1), or empty / none."""
    return None if text.strip().lower() in ("", "none") else fraction(text)


@dataclasses.dataclass(frozen=True)
class SecureAggregationSettings:
    """Secure aggregation (SecAgg+), shared by ``pyfed server`` and ``pyfed simulate``: the server learns
    only the weighted sum of each round's updates."""

    secure_aggregation: bool = setting(False, "--secure-aggregation", "SECURE_AGGREGATION", boolean,
                                       "secure aggregation (SecAgg+): clients mask their updates so that the server "
                                       "learns only their weighted sum (FedAvg-family strategies)")
    secagg_threshold: float = setting(0.5, "--secagg-threshold", "SECAGG_THRESHOLD", fraction,
                                      "secure aggregation: a client's secrets are rebuilt from more than this share of "
                                      "its neighbours and itself; fewer survivors abandon the attempt")
    secagg_bits: int = setting(16, "--secagg-bits", "SECAGG_BITS", Range(1, 40, integer=True).parse,
                               "secure aggregation: fixed-point bits of each update coordinate in [-clip, clip]")
    secagg_clip: float = setting(1.0, "--secagg-clip", "SECAGG_CLIP", positive_float,
                                 "secure aggregation: each coordinate of an update's change is clipped to "
                                 "[-this, this] before it is quantised; the server refuses a sum whose mean lies outside it (a client "
                                 "can still move the mean by up to this much per coordinate: it cannot be checked)")
    secagg_degree: int = setting(0, "--secagg-degree", "SECAGG_DEGREE", non_negative_int,
                                 "secure aggregation: each client's neighbours (0: about 3 log2 of the clients a "
                                 "round, as SecAgg+; the clients a round minus one or more: everyone, as SecAgg)")

    secagg_min_clients: int = setting(3, "--secagg-min-clients", "SECAGG_MIN_CLIENTS", Range(2, integer=True).parse,
                                      "secure aggregation: the fewest parties a sum is unmasked for (a key is one "
                                      "party, whatever ids it holds); with fewer, nothing is unmasked and the round "
                                      "waits for more. 2 would show each of two clients the other's update")

    def secure_aggregation_settings(self) -> Any:
        """The library's settings, or None when secure aggregation is off."""
        if not self.secure_aggregation:
            return None
        from pyfed.federation.secure_aggregation import SecureAggregation

        return SecureAggregation(threshold_fraction=self.secagg_threshold, degree=self.secagg_degree,
                                 quantisation_bits=self.secagg_bits, clip=self.secagg_clip,
                                 min_clients=self.secagg_min_clients)


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
    """Client-level differential privacy (DP-FedAvg), shared by ``pyfed server`` and ``pyfed simulate``.
    Off unless a noise multiplier or a target epsilon is given."""

    dp_noise_multiplier: float | None = setting(
        None, "--dp-noise-multiplier", "DP_NOISE_MULTIPLIER", optional_positive_float,
        "differential privacy: Gaussian noise of this many clip norms (standard deviation) on the sum of "
        "the clipped updates each round; prints the epsilon the planned rounds reach")
    dp_target_epsilon: float | None = setting(
        None, "--dp-target-epsilon", "DP_TARGET_EPSILON", optional_positive_float,
        "differential privacy: the epsilon the whole run may spend (at --dp-target-delta); the noise "
        "multiplier is computed for the planned rounds, and a round that would exceed it ends the run")
    dp_target_delta: float = setting(1e-5, "--dp-target-delta", "DP_TARGET_DELTA", fraction,
                                     "differential privacy: delta; well below 1 / the number of clients")
    dp_clip_norm: float = setting(1.0, "--dp-clip-norm", "DP_CLIP_NORM", positive_float,
                                  "differential privacy: each update's change is clipped to this L2 norm (the "
                                  "starting value with --dp-adaptive-quantile)")
    dp_adaptive_quantile: float | None = setting(
        None, "--dp-adaptive-quantile", "DP_ADAPTIVE_QUANTILE", optional_fraction,
        "differential privacy: move the clip norm each round toward this quantile of the update norms "
        "(Andrew et al. 2021; its privacy cost is accounted); none: a fixed clip norm")

    dp_clipping: str = setting("server", "--dp-clipping", "DP_CLIPPING", choice("server", "client"),
                               "differential privacy: where updates are clipped: server, or client (each client "
                               "clips before sending and reports whether it was within, so the server never needs an "
                               "update's norm; the server still clips what arrives)")
    dp_local_noise_multiplier: float | None = setting(
        None, "--dp-local-noise-multiplier", "DP_LOCAL_NOISE_MULTIPLIER", optional_positive_float,
        "local differential privacy, on top of the central noise: each client adds Gaussian noise of this many "
        "clip norms to its own clipped update before sending (implies --dp-clipping client); a weaker, per-client "
        "guarantee, accounted separately (privacy/local_epsilon; each client logs its own)")

    dp_override_ledger: bool = setting(
        False, "--dp-override-ledger", "DP_OVERRIDE_LEDGER", boolean,
        "differential privacy: start although the privacy ledger (LOGDIR/privacy-ledger.jsonl) cannot be read (it is "
        "set aside, and what it recorded is no longer counted), or although resuming would run rounds it records as "
        "released again (they are counted again)")

    def private(self) -> bool:
        return self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Checkpoints and resuming, shared by ``pyfed server`` and ``pyfed simulate``."""

    checkpoint_dir: Path | None = setting(None, "--checkpoint-dir", "CHECKPOINT_DIR", optional_path,
                                          "where the server checkpoints after every round; default "
                                          "LOGDIR/checkpoints")
    keep_checkpoints: int = setting(3, "--keep-checkpoints", "KEEP_CHECKPOINTS", positive_int,
                                    "checkpoints kept (the newest)")
    fresh_start: bool = setting(False, "--fresh-start", "FRESH_START", boolean,
                                "archive an unfinished run's checkpoints and logs and start over, "
                                "instead of resuming it")


@dataclasses.dataclass(frozen=True)
class ServerConfig(StrategySettings, TrainingSettings, EncryptionSettings, ParticipationSettings, PrivacySettings,
                   SecureAggregationSettings,
                   CheckpointSettings):
    """How ``pyfed server`` runs."""

    address: str = setting("tcp://127.0.0.1:5555", "--address", "BIND_ADDRESS", zmq_address,
                           "ZeroMQ address to bind; tcp://*:PORT listens on every interface")
    min_clients: int = setting(2, "--min-clients", "MIN_CLIENTS", positive_int,
                               "clients that must join before round 1 starts")
    test_data: Path | None = setting(None, "--test-data", "TEST_DATA", optional_path,
                                     ".npz file (arrays x, y) the server evaluates the global model on")
    round_timeout_s: float | str | None = setting(
        "auto", "--round-timeout", "ROUND_TIMEOUT", round_timeout,
        "seconds to wait for a round's updates before dropping the stragglers; auto: 300 s + 60 s per epoch "
        "for the first round, then 3x the slowest answer so far (at least 60 s), doubled after an attempt "
        "nobody answered in time; 0 or none: no limit (a client that never answers stalls the round)")
    max_examples: int = setting(10_000_000, "--max-examples", "MAX_EXAMPLES", positive_int,
                                "most examples a client may claim (FedAvg weights updates by them); an update "
                                "may also claim no more than its client declared when it joined")
    max_update_norm: float | None = setting(None, "--max-update-norm", "MAX_UPDATE_NORM", optional_positive_float,
                                            "scale each client's update (its change from the global model) down "
                                            "to this L2 norm before aggregating it (Sun et al. 2019); none: off")
    max_ids_per_key: int = setting(4096, "--max-ids-per-key", "MAX_IDS_PER_KEY", positive_int,
                                   "client ids one key may hold (without encryption: all clients together)")
    seed: int = setting(0, "--seed", "SEED", non_negative_int, "seed of the initial model and the client sampling")
    join_rate: float = setting(100.0, "--join-rate", "JOIN_RATE", positive_float,
                               "new clients admitted per second, in bursts of 10 seconds' worth; more are "
                               "told to retry (guards against join floods)")
    num_shards: int = setting(0, "--shards", "NUM_CLIENTS", non_negative_int,
                              "data shards (client-1.npz .. client-N.npz) to hand out, one per client that "
                              "asks; 0: clients bring their own data")
    authorized_keys: Path | None = setting(None, "--authorized-keys", "AUTHORIZED_KEYS", optional_path,
                                           "with --curve-secret-key: admit only clients whose public key "
                                           "is a *.key file in this directory")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")
    max_inflight_updates: int | str = setting(
        "auto", "--max-inflight-updates", "MAX_INFLIGHT_UPDATES", auto_or_positive_int,
        "updates that may travel to the server at once; the other clients wait for a slot (their wait is not "
        "held against them); auto: from the model's size and the memory there is, 1 to 4")
    min_upload_mbit_s: float = setting(
        DEFAULT_MIN_UPLOAD_MBIT_S, "--min-upload-rate", "MIN_UPLOAD_RATE", positive_float,
        "the slowest upload the server waits for, in megabits per second: a granted update must arrive within "
        f"{UPLOAD_GRACE_S:g} s plus its size at this rate (never more than the round timeout), or its client is dropped from the "
        "round and its slot goes to the next")
    memory_limit_bytes: int | None = setting(
        None, "--memory-limit", "MEMORY_LIMIT", memory_size,
        "refuse to start when the server's expected peak memory exceeds this (e.g. 4g); none: the container's "
        "memory limit, when it has one")


def image_size(text: str) -> tuple[int, int] | None:
    value = text.strip().lower()
    if not value:
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value)
    if not match or not all(0 < int(n) <= 16384 for n in match.groups()):
        raise ValueError(f"must be HEIGHTxWIDTH in pixels (e.g. 28x28), got {text!r}")
    return int(match[1]), int(match[2])


def class_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if len(set(names)) != len(names):
        raise ValueError(f"names a class more than once: {text!r}")
    return names


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """How a site's CSV file or image folder is read, shared by ``pyfed partition``, ``simulate`` and ``client``."""

    label_column: str = setting("label", "--label-column", "LABEL_COLUMN", column_name,
                                "csv: the column holding each example's class number")
    image_size: tuple[int, int] | None = setting(None, "--image-size", "IMAGE_SIZE", image_size,
                                                 "images: resize every image to HEIGHTxWIDTH; none: they must all "
                                                 "have one size already")
    color_mode: str = setting("rgb", "--color-mode", "COLOR_MODE", choice("rgb", "grayscale"),
                              "images: rgb (3 channels) or grayscale (1)")
    class_names: tuple[str, ...] = setting((), "--class-names", "CLASS_NAMES", class_names,
                                           "images: the class folders' names in class-number order, comma-"
                                           "separated (the same at every site); none: folders are named 0, 1, 2 ...")

    def read_options(self) -> Any:
        from pyfed.learning.data import ReadOptions

        return ReadOptions(self.label_column, self.image_size, self.color_mode, self.class_names)


@dataclasses.dataclass(frozen=True)
class ClientConfig(EncryptionSettings, ReadSettings):
    """How ``pyfed client`` runs."""

    server: str = setting("tcp://127.0.0.1:5555", "--server", "SERVER_ADDRESS", zmq_address,
                          "the server's ZeroMQ address")
    data: str | None = setting(None, "--data", "DATA_SHARD", optional_text,
                               "this client's data: an .npz shard (arrays x, y), csv:PATH (a header row; "
                               "numeric features and a class-number column, --label-column) or images:DIR "
                               "(one subfolder per class, --image-size)")
    data_dir: Path | None = setting(None, "--data-dir", "DATA_DIR", optional_path,
                                    "without --data: ask the server for a shard and load it from here")
    client_id: str = setting("", "--client-id", "CLIENT_ID", client_id,
                             "this client's id; empty lets the server assign one")
    epochs: int | None = setting(None, "--epochs", "CLIENT_EPOCHS", positive_int,
                                 "override the server's local epochs")
    batch_size: int | None = setting(None, "--batch-size", "CLIENT_BATCH_SIZE", positive_int,
                                     "override the server's batch size")
    seed: int | None = setting(None, "--seed", "CLIENT_SEED", non_negative_int,
                               "make local training reproducible: seeded shuffling and deterministic ops")
    dp_local_noise_multiplier: float | None = setting(
        None, "--dp-local-noise-multiplier", "DP_LOCAL_NOISE_MULTIPLIER", optional_positive_float,
        "local differential privacy this site insists on: every update is clipped to the server's clip norm and "
        "noised with at least this many clip norms (more if the server asks), and the client leaves rather than "
        "send an update the server did not ask to be clipped; logs this site's own local epsilon")
    server_public_key: Path | None = setting(None, "--server-public-key", "SERVER_PUBLIC_KEY", optional_path,
                                             "with --curve-secret-key: the server's .key file")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")


@dataclasses.dataclass(frozen=True)
class KeysConfig:
    """How ``pyfed keys`` makes CurveZMQ key pairs."""

    out: Path = setting(Path("keys"), "--out", "KEYS_DIR", path, "directory for the key files")
    clients: int = setting(1, "--clients", "KEY_CLIENTS", non_negative_int, "client key pairs to make")
    prefix: str = setting("client", "--prefix", "KEY_PREFIX", key_prefix,
                          "the client key pairs' names: PREFIX-1 .. PREFIX-N (Compose's local replicas use replica)")
    site: str | None = setting(None, "--site", "KEY_SITE", optional_key_name,
                               "make only this site's own pair, on its machine: SITE.key (public, for the server's "
                               "authorized keys) and SITE.key_secret (mode 0600, stays on the site)")
    owner: tuple[int, int] | None = setting(None, "--owner", "KEY_OWNER", optional_owner,
                                            "UID:GID: hand the key files to this user (10001:10001 is the "
                                            "images' user, which must read its mode-0600 secret from a "
                                            "host folder); needs root, e.g. docker run -u 0")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """How ``pyfed export`` writes a trained model in a deployable format."""

    source: Path | None = setting(None, "--from", "EXPORT_FROM", optional_path,
                                  "a .keras file; a run's LOGDIR (its model/latest.keras, or best.keras with "
                                  "--which best); or a checkpoint .npz (with --model, the server's model)")
    out: Path | None = setting(None, "--out", "EXPORT_OUT", optional_path,
                               "where to write: a .keras or .tflite file, or a SavedModel directory; with "
                               "--format all, a name without a suffix (STEM.keras, STEM.tflite, STEM-savedmodel/)")
    format: str = setting("keras", "--format", "EXPORT_FORMAT", choice("keras", "savedmodel", "tflite", "all"),
                          "keras: a .keras archive; savedmodel: a TensorFlow SavedModel (TF Serving); "
                          "tflite: a TensorFlow Lite flat buffer (mobile and edge devices); all: the three")
    which: str = setting("latest", "--which", "EXPORT_WHICH", choice("latest", "best"),
                         "with a LOGDIR: which of its model files to export")
    model: str | None = setting(None, "--model", "MODEL", optional_text,
                                "with a checkpoint: the server's module:function or path/to/file.py:function "
                                "(every weight array's shape is checked against the checkpoint)")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")


@dataclasses.dataclass(frozen=True)
class PartitionSettings(ReadSettings):
    """How a dataset is split among clients, shared by ``pyfed partition`` and ``pyfed simulate``."""

    dataset: str = setting("digits", "--dataset", "DATASET", dataset_name,
                           "digits (embedded, offline), mnist (downloaded), npz:PATH (arrays x, y), csv:PATH "
                           "(a header row; numeric features and a class-number column, --label-column) or "
                           "images:DIR (one subfolder per class)")
    clients: int = setting(3, "--clients", "NUM_CLIENTS", positive_int, "number of clients (shards)")
    scheme: str = setting("iid", "--scheme", "PARTITION_SCHEME", choice(*SCHEMES),
                          "how samples are split: iid; dirichlet (label skew, --alpha); shards (each client "
                          "holds exactly --classes-per-client classes, as in McMahan et al.); quantity "
                          "(size skew, --alpha)")
    alpha: float = setting(0.5, "--alpha", "PARTITION_ALPHA", positive_float,
                           "dirichlet/quantity: concentration; smaller is more skewed")
    classes_per_client: int = setting(2, "--classes-per-client", "CLASSES_PER_CLIENT", positive_int,
                                      "shards: classes each client holds")
    seed: int = setting(0, "--seed", "SEED", non_negative_int, "random seed")
    test_fraction: float = setting(0.2, "--test-fraction", "TEST_FRACTION", fraction,
                                   "share of the samples held out as the server's test set")


@dataclasses.dataclass(frozen=True)
class PartitionConfig(PartitionSettings):
    """How ``pyfed partition`` splits a dataset into client shards."""

    out: Path = setting(Path("data/shards"), "--out", "DATA_DIR", path, "output directory")
    skip_existing: bool = setting(False, "--skip-existing", "SKIP_EXISTING", boolean,
                                  "do nothing if OUT already holds shards made with these same settings")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")


@dataclasses.dataclass(frozen=True)
class SimulateConfig(StrategySettings, TrainingSettings, PartitionSettings, ParticipationSettings, PrivacySettings,
                     SecureAggregationSettings,
                     CheckpointSettings):
    """How ``pyfed simulate`` runs a whole federation in one process, without sockets."""

    drop_rate: float = setting(0.0, "--drop-rate", "DROP_RATE", interval(0, 1),
                               "inject failures: the share of requests a client loses (it drops out of that "
                               "attempt and is back for the next), drawn from --seed")
    progress: bool = setting(True, "--progress", "PROGRESS", boolean, "show a progress bar on a terminal")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")


# --- resolution -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per setting; values stay strings (None when absent) for :func:`resolve`."""
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        default = "none" if f.default is None else f.default
        extra = {"nargs": "?", "const": "true"} if meta["parse"] is boolean else {}
        parser.add_argument(meta["flag"], dest=f.name, default=None, metavar=meta["env"], **extra,
                            help=f"{meta['help']} [env {meta['env']}; default {default!s}]")


def resolve(config_cls: type[T], flags: Mapping[str, str | None], environ: Mapping[str, str],
            dotenv: Mapping[str, str | None]) -> T:
    """Build ``config_cls`` from flags > environ > dotenv > defaults, parsing every given value.

    An empty value counts as unset, so ``FOO=`` in a ``.env`` or Compose file keeps the default.
    """
    values = {}
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        for source, raw in (("flag " + meta["flag"], flags.get(f.name)),
                            ("environment variable " + meta["env"], environ.get(meta["env"])),
                            (".env entry " + meta["env"], dotenv.get(meta["env"]))):
            if raw is not None and raw.strip():  # empty means unset, as Compose's ${VAR:-} passes it
                try:
                    values[f.name] = meta["parse"](raw)
                except ValueError as error:
                    raise ConfigError(f"{meta['flag']} / {meta['env']}: {error} (from the {source})") from None
                break
    return config_cls(**values)


def describe(config: Any) -> dict[str, Any]:
    """The config as JSON-friendly values (for logs and summary.json)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
