"""Pure pieces of the reliability and security work: client sampling, rate limits, fingerprints,
checkpoint rotation, key files, and the new settings."""

import json
import time

import numpy as np
import pytest

from pyfed.persistence.files import CheckpointError
from pyfed.persistence.store import check_fingerprint, list_checkpoints, model_fingerprint, save_checkpoint
from pyfed.config import ConfigError, ServerConfig, resolve
from pyfed.wire.security import Admission, KeyFileError, generate_keys, load_key_pair, load_public_key
from pyfed.federation.strategy import sample_clients

pytestmark = pytest.mark.unit

CLIENTS = [f"c{i:02d}" for i in range(10)]


def test_sampling_takes_the_fraction_at_least_the_minimum_and_is_reproducible():
    assert sample_clients(CLIENTS, 1.0, 1, (0, 1, 1)) == CLIENTS
    half = sample_clients(CLIENTS, 0.5, 1, (0, 1, 1))
    assert len(half) == 5 and set(half) <= set(CLIENTS) and half == sorted(half)
    assert half == sample_clients(list(reversed(CLIENTS)), 0.5, 1, (0, 1, 1))  # order of arrival does not matter
    assert len(sample_clients(CLIENTS, 0.05, 3, (0, 1, 1))) == 3  # the minimum wins
    assert len(sample_clients(CLIENTS, 0.31, 1, (0, 1, 1))) == 4  # ceil
    assert sample_clients(CLIENTS[:2], 0.5, 5, (0, 1, 1)) == CLIENTS[:2]  # never more than there are
    draws = {tuple(sample_clients(CLIENTS, 0.3, 1, (0, r, 1))) for r in range(20)}
    assert len(draws) > 5  # rounds draw different clients
    assert sample_clients(CLIENTS, 0.3, 1, (0, 4, 2)) == sample_clients(CLIENTS, 0.3, 1, (0, 4, 2))
    with pytest.raises(ValueError):
        sample_clients(CLIENTS, 0.0, 1, (0,))


def test_model_fingerprint_ignores_names_but_not_structure():
    def model(name, units, loss="mse"):
        layers = [{"class_name": "Dense", "config": {"name": name, "units": units}}]
        return json.dumps({"class_name": "Sequential", "config": {"name": name, "layers": layers}}), {"loss": loss}
    specs = [("float32", (4, 2))]
    base = model_fingerprint(*model("dense", 2), specs)
    assert base == model_fingerprint(*model("dense_7", 2), specs)
    assert base != model_fingerprint(*model("dense", 2), [("float32", (4, 3))])
    assert base != model_fingerprint(*model("dense", 2, loss="mae"), specs)


def test_check_fingerprint_names_what_differs(tmp_path):
    current = {"model": "abc", "strategy": "fedavg", "num_shards": 3}
    check_fingerprint(tmp_path / "c.npz", dict(current), current)
    with pytest.raises(CheckpointError, match="different strategy .*--fresh-start"):
        check_fingerprint(tmp_path / "c.npz", {**current, "strategy": "krum"}, current)
    with pytest.raises(CheckpointError, match="no run fingerprint"):
        check_fingerprint(tmp_path / "c.npz", None, current)


def test_checkpoints_rotate_keeping_the_newest(tmp_path):
    for server_round in range(1, 6):
        save_checkpoint(tmp_path, server_round, {"round": server_round, "weights": [np.ones(2) * server_round]}, keep=2)
    (tmp_path / ".round-000009.npz.abc.tmp").write_bytes(b"half")  # an interrupted write is not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000004.npz", "round-000005.npz"]


def test_key_files_are_checked_and_admission_follows_the_directory(tmp_path):
    generate_keys(tmp_path / "keys", 2)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        load_key_pair(tmp_path / "keys/client-1.key")
    (tmp_path / "bad.key").write_text("public-key = \"short\"\n")
    with pytest.raises(KeyFileError, match="bad.key: not a CurveZMQ certificate"):
        load_public_key(tmp_path / "bad.key")
    with pytest.raises(KeyFileError, match="no such key file"):
        load_public_key(tmp_path / "missing.key")

    server_public = load_public_key(tmp_path / "keys/server.key")
    admission = Admission(tmp_path / "keys", server_public)
    client_1 = load_public_key(tmp_path / "keys/client-1.key")
    assert admission.callback("*", client_1)
    assert not admission.callback("*", server_public)  # the server's own key is not a client's
    (tmp_path / "keys/client-1.key").unlink()  # revoked: the directory is re-read
    time.sleep(0.01)
    assert not admission.callback("*", client_1) and admission.denied == 2
    assert Admission(None, server_public).callback("*", client_1)  # no directory: any key
    with pytest.raises(KeyFileError, match="does not exist"):
        Admission(tmp_path / "nowhere", server_public)


def test_replicas_sharing_a_folder_of_key_pairs_each_take_one_no_other_holds(tmp_path):
    """Compose's local replicas: each claims a pair (an exclusive lock for its lifetime, here one per
    open file), so each is a party of its own; a pair is free again once its holder is gone."""
    from pyfed.wire import security

    created, _ = generate_keys(tmp_path, 2, prefix="replica")
    assert sorted(p.name for p in created) == ["replica-1.key_secret", "replica-2.key_secret", "server.key_secret"]
    claims = security._CLAIMS  # noqa: SLF001 - what holds the locks
    before = len(claims)
    try:
        first, second = security.claim_key_pair(tmp_path), security.claim_key_pair(tmp_path)
        assert (first.name, second.name) == ("replica-1.key_secret", "replica-2.key_secret")
        with pytest.raises(KeyFileError, match="all 2 key pairs are held by other processes"):
            security.client_keys(tmp_path, tmp_path / "server.key")
        claims.pop().close()  # the second one's holder is gone
        keys = security.client_keys(tmp_path, tmp_path / "server.key")  # a directory: the free pair
        assert keys.public == load_key_pair(second)[0]
    finally:
        while len(claims) > before:
            claims.pop().close()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="holds no client key pair"):
        security.claim_key_pair(tmp_path / "empty")


def test_reliability_settings_parse_and_name_the_variable():
    config = resolve(ServerConfig, {"min_fit_clients": "2", "fraction_fit": "0.5", "fresh_start": "true"},
                     {"KEEP_CHECKPOINTS": "5", "CHECKPOINT_DIR": "/ck"}, {})
    assert (config.min_fit_clients, config.fraction_fit, config.fresh_start, config.keep_checkpoints) == (2, 0.5, True, 5)
    assert str(config.checkpoint_dir) == "/ck" and config.insecure is False
    for env, value, message in [("FRACTION_FIT", "0", "--fraction-fit / FRACTION_FIT: must be a number in (0, 1]"),
                                ("FRACTION_FIT", "1.5", "(0, 1]"),
                                ("MIN_FIT_CLIENTS", "0", "--min-fit-clients / MIN_FIT_CLIENTS"),
                                ("INSECURE", "maybe", "--insecure / INSECURE: must be true or false"),
                                ("KEEP_CHECKPOINTS", "0", "--keep-checkpoints / KEEP_CHECKPOINTS")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            resolve(ServerConfig, {}, {env: value}, {})
