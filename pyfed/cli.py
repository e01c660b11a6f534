"""``pyfed`` command line: server, client, partition, simulate and a local demo.

Every flag can also be set by an environment variable or a ``.env`` file in the working
directory (flags > environment > .env > defaults). A bad value exits with status 2 and one line
naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pyfed.config import (ClientConfig, ConfigError, ExportConfig, KeysConfig, PartitionConfig, ServerConfig, SimulateConfig,
                     PrivacySettings, StrategySettings, add_arguments, describe, log_level, non_negative_int, path, positive_int,
                     resolve, setting)

log = logging.getLogger("pyfed")

EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """How ``pyfed demo`` runs a whole federation on this machine."""

    clients: int = setting(3, "--clients", "NUM_CLIENTS", positive_int, "number of client processes")
    rounds: int = setting(3, "--rounds", "ROUNDS", positive_int, "number of rounds")
    workdir: Path = setting(Path("pyfed-demo"), "--workdir", "DEMO_DIR", path, "where shards and logs go")
    port: int = setting(5555, "--port", "SERVER_PORT", positive_int, "loopback port for the server")
    seed: int = setting(0, "--seed", "SEED", non_negative_int, "partition seed")
    log_level: str = setting("INFO", "--log-level", "LOG_LEVEL", log_level, "logging level")


class UsageError(Exception):
    """A start-up problem with the user's input: printed as one line, exit status 2."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


INSECURE_WARNING = ("traffic is NOT encrypted and any client that reaches the port can join; make keys with "
                    "`pyfed keys` and pass --curve-secret-key (see the README's security section)")


def _server_keys(config: ServerConfig) -> Any:
    from pyfed.wire.security import KeyFileError, server_keys

    if config.insecure or config.curve_secret_key is None:
        if config.authorized_keys is not None and not config.insecure:
            raise UsageError("--authorized-keys / AUTHORIZED_KEYS needs --curve-secret-key / CURVE_SECRET_KEY")
        log.warning(INSECURE_WARNING)
        return None
    try:
        keys = server_keys(config.curve_secret_key)
    except KeyFileError as error:
        raise UsageError(f"--curve-secret-key / CURVE_SECRET_KEY: {error}") from None
    if config.authorized_keys is not None and not config.authorized_keys.is_dir():
        raise UsageError(f"--authorized-keys / AUTHORIZED_KEYS: {config.authorized_keys} is not a directory")
    if config.authorized_keys is None:
        log.warning("connections are encrypted, but any client key is admitted (no --authorized-keys)")
    return keys


def _on_stop_signals(handler: Any) -> None:
    """Call ``handler(signal name)`` on SIGTERM (docker stop) and SIGINT (Ctrl-C)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: handler(signal.Signals(number).name))


def run_server(config: ServerConfig) -> int:
    from pyfed.persistence.files import CheckpointError
    from pyfed.persistence.ledger import LedgerError
    from pyfed.learning.data import DataError, load_shard
    from pyfed.learning.model import ModelError, describe_model, evaluator, wire_model
    from pyfed.federation.server import Server
    from pyfed.federation.strategy import NormBound

    strategy = build_strategy(config, config.min_clients, "--min-clients / MIN_CLIENTS")
    strategy = private_strategy(strategy, config, rounds=config.rounds, population=config.min_clients,
                                min_fit_clients=config.min_fit_clients, fraction=config.fraction_fit,
                                population_setting="--min-clients / MIN_CLIENTS")
    check_secure_aggregation(strategy, config, config.max_update_norm)
    if config.max_update_norm is not None:
        strategy = NormBound(strategy, config.max_update_norm)
    if config.round_timeout_s is None:
        log.warning("--round-timeout / ROUND_TIMEOUT is off: a client that never answers stalls its round")
    if config.num_shards and config.min_fit_clients > config.num_shards:  # not an error: sites may bring their own data
        log.warning("--min-fit-clients / MIN_FIT_CLIENTS is %d but only %d shards (--shards / NUM_CLIENTS) are handed "
                    "out: every round also needs %d site(s) that bring their own data (a --client-id and --data)",
                    config.min_fit_clients, config.num_shards, config.min_fit_clients - config.num_shards)
    curve = _server_keys(config)
    if config.secure_aggregation and curve is None:
        log.warning("secure aggregation without CurveZMQ keys: a key is what makes a client one party, so without "
                    "them one peer can join under many ids and outnumber, accuse or isolate the others; give the "
                    "server and each client its own key pair (see the README's threat model)")
    import keras

    keras.utils.set_random_seed(config.seed)  # the initial global model is the same for the same --seed
    try:
        test_data = load_shard(config.test_data) if config.test_data else None
        if not config.model and test_data is None:
            raise UsageError("--model / MODEL or --test-data / TEST_DATA is needed: "
                             "the default model is sized from the test data")
        model, training = build_model(config, test_data)
    except (DataError, ModelError) as error:
        raise UsageError(str(error)) from None
    start_from(model, config.initial_weights)
    export = model_files(model, config, has_test_data=test_data is not None)
    wire, plan = wire_model(model), fit_plan(config, training.learning_rate)
    min_fit_clients = max(config.min_fit_clients, strategy.min_fit_clients())
    memory = server_memory(config, strategy, wire.weights, plan, min_fit_clients)
    server = Server(wire, address=config.address, rounds=config.rounds, min_clients=config.min_clients,
                    plan=plan,
                    strategy=strategy, evaluate=evaluator(model, *test_data) if test_data is not None else None,
                    export=export, description=describe_model(model, histograms=config.histograms),
                    logdir=config.logdir,
                    round_timeout_s=config.round_timeout_s, num_shards=config.num_shards,
                    config_summary=run_settings(config, training),
                    min_fit_clients=min_fit_clients,
                    fraction_fit=1.0 if config.private() else config.fraction_fit,  # DP samples, as it accounts
                    seed=config.seed, checkpoint_dir=config.checkpoint_dir,
                    keep_checkpoints=config.keep_checkpoints, fresh_start=config.fresh_start, curve=curve,
                    run_name=config.run_name, statistics=site_statistics(model, config),
                    authorized_keys=config.authorized_keys if curve else None, join_rate=config.join_rate,
                    max_examples=config.max_examples, max_ids_per_key=config.max_ids_per_key,
                    secure_aggregation=config.secure_aggregation_settings(),
                    max_inflight_updates=memory.max_inflight_updates,
                    max_clients_per_round=memory.max_clients_per_round, min_upload_mbit_s=config.min_upload_mbit_s)
    _on_stop_signals(lambda name: server.request_stop(name))
    try:
        server.run()
    except CheckpointError as error:
        raise UsageError(f"cannot resume: {error}") from None
    except LedgerError as error:
        raise UsageError(f"cannot start: {error}") from None
    return 0


def build_model(config: ServerConfig | SimulateConfig, data: tuple | None) -> tuple[Any, Any]:
    """The run's model (--model / MODEL, or the default model sized from ``data``) with its training
    settings settled (the model's own compile settings unless --optimizer / --learning-rate say
    otherwise: learning/model.py's settle_training), said in one log line."""
    from pyfed.learning.model import (DEFAULT_CNN_NAME, batch_norm_notice, default_model, load_model_spec,
                                      needs_scaling, settle_training, unscaled_features)

    if config.model:
        model, uncompiled = load_model_spec(config.model), f"PyFed's default: {config.model} is not compiled"
    else:
        x, y = data
        shape, num_classes = tuple(x.shape[1:]), int(y.max()) + 1
        model, uncompiled = (default_model(shape, num_classes, None, feature_scaling=needs_scaling(x)),
                             "PyFed's default model")
        log.info("model: PyFed's default %s for examples shaped %s, %d classes (%s weights); --model / MODEL "
                 "gives your own", "CNN" if model.name == DEFAULT_CNN_NAME else "MLP", "x".join(map(str, shape)),
                 num_classes, f"{model.count_params():,}")
    training = settle_training(model, optimizer=config.optimizer, learning_rate=config.learning_rate,
                               uncompiled=uncompiled)
    log.info("%s; %d local epoch(s) of batches of %d", training.describe(), config.epochs, config.batch_size)
    notice = batch_norm_notice(model, config.local_layers)
    if notice:
        log.info("%s", notice)
    elif config.local_layers != "none":
        raise UsageError(f"--local-layers / LOCAL_LAYERS is {config.local_layers}, but the model has no "
                         f"BatchNormalization layer to keep at the sites")
    if data is not None:
        warning = unscaled_features(model, data[0], str(getattr(config, "test_data", None) or config.dataset))
        if warning:
            log.warning("%s", warning)
    return model, training


def run_settings(config: ServerConfig | SimulateConfig, training: Any) -> dict[str, Any]:
    """The settings summary.json and TensorBoard's HParams keep: the config, with the optimizer and
    learning rate in force (not the unset overrides) and where each training setting came from."""
    return {**describe(config), "optimizer": training.optimizer, "learning_rate": training.learning_rate,
            "training": training.summary()}


def start_from(model: Any, initial_weights: Path | None) -> None:
    """--initial-weights: the run's first global model (a resumed run then restores its checkpoint's)."""
    if initial_weights is None:
        return
    from pyfed.learning.export import ExportError, load_initial_weights

    try:
        load_initial_weights(model, initial_weights)
    except ExportError as error:
        raise UsageError(f"--initial-weights / INITIAL_WEIGHTS: {error}") from None
    log.info("the initial global model's weights come from %s (unless a checkpoint is resumed)", initial_weights)


def model_files(model: Any, config: ServerConfig | SimulateConfig, *, has_test_data: bool) -> Any:
    """LOGDIR/model/latest.keras and best.keras, written after every round (see learning/export.py)."""
    from pyfed.learning.export import ModelFiles

    metric = config.best_metric
    if metric == "auto":
        metric = "test_accuracy" if has_test_data else "federated_accuracy"
    measured = has_test_data if metric.startswith("test_") else config.client_eval_fraction > 0
    if not measured:
        log.warning("LOGDIR/model/best.keras will not be written: --best-metric %s is not measured (it needs %s)",
                    metric, "--test-data / TEST_DATA" if metric.startswith("test_")
                    else "--client-eval-fraction / CLIENT_EVAL_FRACTION above 0")
    return ModelFiles(model, config.logdir / "model", metric)


def build_strategy(settings: StrategySettings, clients_per_round: int, clients_setting: str) -> Any:
    """The configured strategy, refusing parameters it rejects and too few clients for its rule."""
    from pyfed.federation.strategy import make_strategy

    try:
        strategy = make_strategy(settings.strategy, **settings.strategy_options())
    except ValueError as error:
        raise UsageError(f"--strategy {settings.strategy}: {error}") from None
    if clients_per_round < strategy.min_fit_clients():
        raise UsageError(f"--strategy {settings.strategy} with these settings needs at least "
                         f"{strategy.min_fit_clients()} clients per round, but {clients_setting} is {clients_per_round}")
    return strategy


def site_statistics(model: Any, config: ServerConfig | SimulateConfig) -> Any:
    """What the round engine asks the sites to summarise outside the rounds (federation/moments.py):
    their features, for the model's feature scaling, and what its BatchNorm layers receive, to
    recalibrate their moving statistics after the last round."""
    from pyfed.federation.moments import SiteStatistics

    return SiteStatistics(feature_scaling(model, config), batch_norm_recalibration(model, config))


def _statistics_withheld(config: ServerConfig | SimulateConfig) -> str | None:
    """Why no statistics may leave the sites in this run, or None."""
    return ("differential privacy is on: the statistics would leave the sites without noise" if config.private()
            else "secure aggregation is on: the server would see each site's statistics"
            if config.secure_aggregation else None)


def batch_norm_recalibration(model: Any, config: ServerConfig | SimulateConfig) -> tuple:
    """The model's BatchNorm layers whose moving statistics the engine recalibrates from the sites
    after the last round (--recalibrate-batch-norm, on by default); none (said why) when the model
    has none, the setting is off, the statistics must not leave the sites, or a layer's input has
    no fixed shape (a site's count could not be checked)."""
    from pyfed.federation.moments import BatchNormLayer
    from pyfed.learning.model import batch_norm_arrays

    layers = [BatchNormLayer(*found) for found in batch_norm_arrays(model)]
    if not layers or not config.recalibrate_batch_norm:
        return ()
    unfixed = [layer.name for layer in layers if layer.values_per_example is None]
    why_not = _statistics_withheld(config) or (f"the input of {', '.join(unfixed)} has no fixed shape" if unfixed
                                               else None)
    if why_not:
        log.warning("BatchNorm recalibration: off (%s); the trained model keeps the sites' averaged moving "
                    "statistics", why_not)
        return ()
    log.info("BatchNorm recalibration: after the last round each site runs the final model over its training "
             "examples and sends, per channel of each of its %d BatchNorm layer(s), the count, mean and spread of "
             "what the layer receives (nothing else); the model is exported with their pooled statistics",
             len(layers))
    return tuple(layers)


def feature_scaling(model: Any, config: ServerConfig | SimulateConfig) -> Any:
    """Where the model's feature scaling keeps its mean and variance, for the round engine to set from
    the sites' pooled statistics before round 1; None (said why) when the model has none, or when
    the statistics must not be collected: under differential privacy (they would be released
    without noise), under secure aggregation (the server would see each site's), or when
    --initial-weights already holds the scaling."""
    from pyfed.federation.moments import FeatureScaling
    from pyfed.learning.model import feature_scaling_indices

    indices = feature_scaling_indices(model)
    if indices is None:
        return None
    why_not = _statistics_withheld(config) or ("--initial-weights / INITIAL_WEIGHTS sets it"
                                               if config.initial_weights else None)
    if why_not:
        log.warning("feature scaling: the sites' statistics are not collected (%s); the model's feature scaling "
                    "stays as it starts%s", why_not, "" if config.initial_weights else
                    " (no scaling): standardise the features at the sites, the same way at each")
        return None
    log.info("feature scaling: before round 1 each site sends, per input feature, its count, mean and spread "
             "(nothing else); the model standardises its inputs by their pooled mean and variance")
    return FeatureScaling(*indices)


def fit_plan(config: Any, learning_rate: float) -> Any:
    """The plan the server sends with every FIT, from a server's or a simulation's settings and the
    learning rate in force (see build_model)."""
    from pyfed.wire.protocol import FitPlan

    return FitPlan(config.epochs, config.batch_size, learning_rate, eval_fraction=config.client_eval_fraction,
                   update_compression=config.update_compression, topk_fraction=config.topk_fraction,
                   broadcast_compression=config.broadcast_compression, local_layers=config.local_layers)


def server_memory(config: ServerConfig, strategy: Any, weights: list, plan: Any, min_fit_clients: int) -> Any:
    """The server's memory plan (federation/memory.py), logged; a run that cannot fit its limit is refused."""
    from pyfed.federation.memory import (MemoryRefused, available_bytes, container_limit_bytes, plan_memory,
                                         process_rss_bytes)
    from pyfed.wire import compression, protocol

    specs = protocol.array_specs(weights)
    if config.memory_limit_bytes is not None:
        limit, source = config.memory_limit_bytes, "--memory-limit / MEMORY_LIMIT"
    else:
        limit = container_limit_bytes()
        source = "the container's memory limit" if limit is not None else None
    try:
        upload_bytes = (protocol.spec_bytes(protocol.largest_masked_input(specs)) if config.secure_aggregation
                        else compression.encoded_bytes_of(compression.UpdateCompression(plan.update_compression),
                                                          specs, plan.topk_fraction))  # one upload, as it travels
        memory = plan_memory(runtime_bytes=process_rss_bytes() or 0,
                             model_bytes=sum(protocol.spec_bytes(spec) for spec in specs),
                             update_bytes=upload_bytes,
                             requested_inflight=config.max_inflight_updates, limit_bytes=limit, limit_source=source,
                             available_bytes=available_bytes(), holds_updates=strategy.holds_updates(),
                             min_fit_clients=min_fit_clients)
    except MemoryRefused as refusal:
        raise UsageError(str(refusal)) from None
    log.info("memory: %s; max-inflight-updates %d%s", memory.describe(), memory.max_inflight_updates,
             " (auto)" if config.max_inflight_updates == "auto" else "")
    return memory


def check_secure_aggregation(strategy: Any, config: Any, max_update_norm: float | None) -> None:
    """Secure aggregation hides each update: refuse what needs to see one (see federation/secure_aggregation.py)."""
    if not config.secure_aggregation:
        return
    from pyfed.federation.strategy import WeightedMeanStrategy
    from pyfed.federation.strategy.dp import DifferentialPrivacy

    if config.update_compression != "none":
        raise UsageError(f"--update-compression / UPDATE_COMPRESSION {config.update_compression} with "
                         "--secure-aggregation / SECURE_AGGREGATION: secure aggregation sends each update quantised "
                         "to --secagg-bits in its own ring; set one or the other")
    if isinstance(strategy, DifferentialPrivacy):
        raise UsageError("--secure-aggregation / SECURE_AGGREGATION with differential privacy is not supported yet: "
                         "central DP clips each update on the server, which secure aggregation hides from it")
    if not isinstance(strategy, WeightedMeanStrategy):
        raise UsageError(f"--secure-aggregation / SECURE_AGGREGATION needs a FedAvg-family strategy (fedavg, fedavgm, "
                         f"fedprox, fedadagrad, fedadam, fedyogi): {strategy.name} needs each client's update, which "
                         f"secure aggregation hides from the server")
    if max_update_norm is not None:
        raise UsageError("--max-update-norm / MAX_UPDATE_NORM needs each update's norm, which secure aggregation "
                         "hides; --secagg-clip is the clipping range each client applies to its own update (the server checks the mean "
                         "of the sum lies in it, not each update)")


def private_strategy(strategy: Any, config: PrivacySettings, *, rounds: int, population: int, min_fit_clients: int,
                     fraction: float, population_setting: str) -> Any:
    """``strategy`` with client-level differential privacy, when it is asked for (see strategy/dp.py):
    the noise multiplier calibrated to the target epsilon for ``rounds`` rounds of ``population``
    connected clients, or the epsilon a given one reaches, printed either way."""
    if not config.private():
        if config.dp_local_noise_multiplier is not None:
            raise UsageError("--dp-local-noise-multiplier / DP_LOCAL_NOISE_MULTIPLIER is a layer on central differential "
                             "privacy: give --dp-noise-multiplier or --dp-target-epsilon too")
        return strategy
    from pyfed.federation.privacy import PrivacyLedger, RoundEvent, epsilon, noise_for_target
    from pyfed.federation.strategy.dp import AdaptiveClipping, DifferentialPrivacy

    adaptive = AdaptiveClipping(config.dp_adaptive_quantile) if config.dp_adaptive_quantile is not None else None
    ledger = PrivacyLedger(config.dp_target_delta, config.dp_target_epsilon, override=config.dp_override_ledger)
    try:
        dp = DifferentialPrivacy(strategy, noise_multiplier=config.dp_noise_multiplier or 1.0,
                                 clip_norm=config.dp_clip_norm, fraction=fraction, ledger=ledger,
                                 minimum=min_fit_clients, adaptive=adaptive,
                                 clipping="client" if config.dp_local_noise_multiplier else config.dp_clipping,
                                 local_noise_multiplier=config.dp_local_noise_multiplier or 0.0)
    except ValueError as error:
        raise UsageError(f"--strategy / STRATEGY with differential privacy: {error}") from None
    sampled = dp.sample_size(population)
    if config.dp_noise_multiplier is None:  # a target alone: the noise its planned rounds need
        dp.noise_multiplier = noise_for_target(config.dp_target_epsilon, config.dp_target_delta, rounds, population,
                                               sampled)
        log.info("differential privacy: noise multiplier %.4g keeps %d rounds of %d of %d clients within epsilon %g "
                 "(delta %g)", dp.noise_multiplier, rounds, sampled, population, config.dp_target_epsilon,
                 config.dp_target_delta)
    else:
        event = RoundEvent(population, sampled, dp.noise_multiplier)
        reached = epsilon([(event, rounds)], config.dp_target_delta)
        log.info("differential privacy: noise multiplier %g; %d rounds of %d of %d clients reach epsilon %.4g "
                 "(delta %g)", dp.noise_multiplier, rounds, sampled, population, reached, config.dp_target_delta)
        if config.dp_target_epsilon is not None and reached > config.dp_target_epsilon:
            allowed = next(k for k in range(rounds, -1, -1)
                           if k == 0 or epsilon([(event, k)], config.dp_target_delta) <= config.dp_target_epsilon)
            log.warning("differential privacy: the target epsilon %g allows %d of the %d planned rounds; the run "
                        "ends there", config.dp_target_epsilon, allowed, rounds)
    try:
        dp.update_noise_multiplier(sampled)
    except ValueError as error:
        raise UsageError(f"--dp-adaptive-quantile / DP_ADAPTIVE_QUANTILE: {error}") from None
    if dp.local_noise_multiplier:
        from pyfed.federation.privacy import local_epsilon

        log.info("local differential privacy: each client clips its update to %g and adds noise of %g clip norms; "
                 "a client in every one of the %d rounds reaches local epsilon %.4g (delta %g), its own guarantee "
                 "even against this server", config.dp_clip_norm, dp.local_noise_multiplier, rounds,
                 local_epsilon(dp.local_noise_multiplier, rounds, config.dp_target_delta), config.dp_target_delta)
    log.info("differential privacy: updates clipped to L2 norm %g%s; accounted for %s connected clients (%s) "
             "each round; with fewer, each round costs more and the budget ends the run sooner",
             config.dp_clip_norm, f", then moved toward quantile {config.dp_adaptive_quantile:g}" if adaptive else "",
             population, population_setting)
    return dp


def run_client(config: ClientConfig) -> int:
    from pyfed.federation.client import Client
    from pyfed.learning.data import DataError, load_site_data
    from pyfed.wire.security import KeyFileError, client_keys

    curve = None
    if config.insecure or config.curve_secret_key is None:
        if config.server_public_key is not None and not config.insecure:
            raise UsageError("--server-public-key / SERVER_PUBLIC_KEY needs --curve-secret-key / CURVE_SECRET_KEY")
        log.warning(INSECURE_WARNING)
    elif config.server_public_key is None:
        raise UsageError("--curve-secret-key / CURVE_SECRET_KEY needs --server-public-key / SERVER_PUBLIC_KEY "
                         "(the server's .key file)")
    else:
        try:
            curve = client_keys(config.curve_secret_key, config.server_public_key)
        except KeyFileError as error:
            raise UsageError(f"--curve-secret-key / --server-public-key: {error}") from None

    x = y = None
    if config.data is not None:
        try:
            x, y = load_site_data(config.data, config.read_options())
        except DataError as error:
            raise UsageError(str(error)) from None
    elif config.data_dir is None:
        raise UsageError("--data / DATA_SHARD or --data-dir / DATA_DIR is required: "
                         "this client's .npz shard, or where to find the shard the server assigns")
    client = Client(config.server, x, y, data_dir=config.data_dir, client_id=config.client_id,
                    epochs=config.epochs, batch_size=config.batch_size,
                    data_source=str(config.data) if config.data else "the assigned shard", curve=curve,
                    seed=config.seed, local_noise_floor=config.dp_local_noise_multiplier or 0.0)

    _on_stop_signals(client.request_stop)
    return client.run()


def run_keys(config: KeysConfig) -> int:
    """Make the server's and N clients' CurveZMQ key pairs, or one site's own (existing pairs are kept)."""
    from pyfed.wire.security import KeyFileError, generate_keys, generate_site_key

    try:
        if config.site:
            created, kept = generate_site_key(config.out, config.site)
        else:
            created, kept = generate_keys(config.out, config.clients, config.prefix)
    except (KeyFileError, OSError) as error:
        raise UsageError(str(error)) from None
    if config.owner is not None:
        try:
            for secret in (*created, *kept):
                for path in (secret, secret.with_suffix(".key")):
                    os.chown(path, *config.owner)
        except OSError as error:
            raise UsageError(f"--owner / KEY_OWNER {config.owner[0]}:{config.owner[1]}: cannot hand {error.filename} "
                             f"to that user ({error.strerror}; it needs root: e.g. docker run -u 0)") from None
    for secret in created:
        print(f"created {secret.with_suffix('.key')} and {secret}")
    for secret in kept:
        print(f"kept    {secret.with_suffix('.key')} and {secret} (already there)")
    if config.site:
        print(f"Send {config.out / (config.site + '.key')} (the public key) to the server's operator, who puts it "
              f"in the server's authorized keys; get server.key (the server's public key) back into {config.out}.\n"
              f"{config.out / (config.site + '.key_secret')} stays on this machine: it is what admits this site.")
        return 0
    print(f"server: --curve-secret-key {config.out / 'server.key_secret'} --authorized-keys {config.out}\n"
          f"client i: --curve-secret-key {config.out}/{config.prefix}-<i>.key_secret --server-public-key "
          f"{config.out / 'server.key'}\nKeep the .key_secret files private; copy each client only its own.")
    return 0


def run_partition(config: PartitionConfig) -> int:
    from pyfed.learning.data import DataError, describe_shards, load_dataset, read_manifest, write_manifest, write_partitions

    settings = {k: v for k, v in describe(config).items() if k not in {"out", "skip_existing", "log_level"}}
    if config.skip_existing:
        manifest = read_manifest(config.out)
        if manifest is not None and manifest.get("settings") == settings:
            log.info("%s already holds the shards for %s; nothing to do", config.out, settings)
            return 0
    try:
        x, y = load_dataset(config.dataset, config.read_options())
        paths = write_partitions(x, y, config.out, config.clients, seed=config.seed,
                                 test_fraction=config.test_fraction, scheme=config.scheme, alpha=config.alpha,
                                 classes_per_client=config.classes_per_client)
    except (DataError, ValueError) as error:
        raise UsageError(f"{config.dataset}: {error}" if not isinstance(error, DataError) else str(error)) from None
    write_manifest(config.out, settings, paths)
    log.info("wrote %d client shards and test.npz to %s (%s, %s split, seed %d)",
             config.clients, config.out, config.dataset, config.scheme, config.seed)
    for line in describe_shards(paths):
        print(line)
    return 0


def run_simulate(config: SimulateConfig) -> int:
    """Partition a dataset in memory and run the whole federation in this process."""
    from pyfed.learning.data import DataError, label_table, load_dataset, split_dataset
    from pyfed.learning.model import ModelError
    from pyfed.federation.engine import EngineStopping
    from pyfed.federation.simulation import Simulation
    from pyfed.persistence.files import CheckpointError
    from pyfed.persistence.ledger import LedgerError

    strategy = build_strategy(config, config.clients, "--clients / NUM_CLIENTS")
    strategy = private_strategy(strategy, config, rounds=config.rounds, population=config.clients,
                                min_fit_clients=config.min_fit_clients, fraction=config.fraction_fit,
                                population_setting="--clients / NUM_CLIENTS")
    check_secure_aggregation(strategy, config, None)
    try:
        x, y = load_dataset(config.dataset, config.read_options())
        clients, test_data = split_dataset(x, y, config.clients, seed=config.seed, test_fraction=config.test_fraction,
                                           scheme=config.scheme, alpha=config.alpha,
                                           classes_per_client=config.classes_per_client)
        model, training = build_model(config, (x, y))
    except (DataError, ModelError) as error:
        raise UsageError(str(error)) from None
    except ValueError as error:
        raise UsageError(f"{config.dataset}, --scheme {config.scheme}: {error}") from None
    start_from(model, config.initial_weights)
    for line in label_table([f"client-{i}" for i in range(1, len(clients) + 1)], [c[1] for c in clients]):
        print(line)
    plan = fit_plan(config, training.learning_rate)
    simulation = Simulation(
        model, clients, rounds=config.rounds, plan=plan, strategy=strategy, test_data=test_data,
        fraction_fit=1.0 if config.private() else config.fraction_fit,  # DP samples, as it accounts
        min_fit_clients=max(config.min_fit_clients, strategy.min_fit_clients()), drop_rate=config.drop_rate, checkpoint_dir=config.checkpoint_dir, keep_checkpoints=config.keep_checkpoints,
        fresh_start=config.fresh_start, logdir=config.logdir, config_summary=run_settings(config, training),
        seed=config.seed, run_name=config.run_name, statistics=site_statistics(model, config),
        progress=config.progress, export=model_files(model, config, has_test_data=test_data is not None),
        histograms=config.histograms, secure_aggregation=config.secure_aggregation_settings())
    _on_stop_signals(lambda name: simulation.engine.request_stop(name))
    try:
        simulation.run()
    except CheckpointError as error:
        raise UsageError(f"cannot resume: {error}") from None
    except LedgerError as error:
        raise UsageError(f"cannot start: {error}") from None
    except EngineStopping as stopping:
        log.info("stopped (%s) after %d completed rounds; the same command resumes from the last checkpoint",
                 stopping, simulation.engine.completed_rounds)
    return 0


def run_demo(config: DemoConfig) -> int:
    """Partition digits, then run one server and N clients as separate processes on loopback."""
    from pyfed.learning.data import shard_path

    shards = config.workdir / "shards"
    run_partition(PartitionConfig(clients=config.clients, out=shards, seed=config.seed))
    address = f"tcp://127.0.0.1:{config.port}"
    logdir = config.workdir / "logs"
    base = [sys.executable, "-m", "pyfed"]
    env = {**os.environ, "LOG_LEVEL": config.log_level}
    server = subprocess.Popen([*base, "server", "--address", address, "--rounds", str(config.rounds),
                               "--min-clients", str(config.clients), "--test-data", str(shards / "test.npz"),
                               "--logdir", str(logdir)], env=env)
    clients = [subprocess.Popen([*base, "client", "--server", address, "--data", str(shard_path(shards, i)),
                                 "--client-id", f"client-{i}"], env=env) for i in range(1, config.clients + 1)]
    try:
        status = server.wait()
        for process in clients:
            process.wait(timeout=60)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        for process in [server, *clients]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        status = 1
    if status == 0:
        print(f"\nDone. Summary: {logdir / 'summary.json'}\nTensorBoard: tensorboard --logdir {logdir}")
    return status


def run_export(config: ExportConfig) -> int:
    """Write a run's trained model (or any checkpoint's) as a .keras, SavedModel or TFLite file."""
    if config.source is None or config.out is None:
        raise UsageError("--from / EXPORT_FROM and --out / EXPORT_OUT are required")
    from pyfed.learning.export import ExportError, export_models, model_to_export

    try:
        model = model_to_export(config.source, which=config.which, model_spec=config.model)
        written = export_models(model, config.format, config.out)
    except ExportError as error:
        raise UsageError(str(error)) from None
    for fmt, path in written:
        log.info("wrote %s (%s) from %s", path, fmt, config.source)
    return 0


COMMANDS: dict[str, tuple[type, Any, str]] = {
    "server": (ServerConfig, run_server, "run the federated server"),
    "client": (ClientConfig, run_client, "run one federated client"),
    "partition": (PartitionConfig, run_partition, "split a dataset into client shards and a test set"),
    "simulate": (SimulateConfig, run_simulate, "run a whole federation in this process, without sockets"),
    "keys": (KeysConfig, run_keys, "make CurveZMQ key pairs for the server and N clients"),
    "export": (ExportConfig, run_export, "write a trained model as a .keras, SavedModel or TFLite file"),
    "demo": (DemoConfig, run_demo, "run a server and clients on this machine on the digits dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyfed", description="Federated learning for Keras models over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (config_cls, _, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text), config_cls)
    return parser


def _dotenv() -> dict[str, str | None]:
    from dotenv import dotenv_values

    return dict(dotenv_values(".env")) if Path(".env").is_file() else {}


#: The commands whose first work is importing TensorFlow (seconds, more on a busy machine).
LOADS_TENSORFLOW = frozenset({"server", "client", "simulate", "export", "demo"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    config_cls, handler, _ = COMMANDS[command]
    try:
        config = resolve(config_cls, args, os.environ, _dotenv())
        _setup_logging(config.log_level)
        if command in LOADS_TENSORFLOW:  # the first line comes before the seconds of importing TensorFlow
            from pyfed import __version__

            log.info("pyfed %s %s starting (loading TensorFlow)", __version__, command)
        return handler(config)
    except (ConfigError, UsageError) as error:
        print(f"pyfed {command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"pyfed {command}: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
