"""The hardening pieces that need no network: key directories that cannot break admission, state
files that cannot crash or exhaust the reader, the round timeout, norm bounding and model
acceptance, the descriptor limit, and the Keras floor."""

from __future__ import annotations

import io
import json
import os
import resource
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pyfed.wire import security
from pyfed.federation.aggregate import clip_update, update_norm, why_unusable
from pyfed.persistence.files import CheckpointError, load_state, read_npz, save_state
from pyfed.wire.security import Admission, KeyFileError, generate_keys, load_public_key
from pyfed.federation.engine import RoundTimeout
from pyfed.federation.strategy import FedAvg, FedAvgM, FitResult, NormBound
from pyfed.persistence.tracking import RoundRecord
from pyfed.wire.transport import raise_open_file_limit

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


# --- admission: the key directory ------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    generate_keys(tmp_path / "keys", 2)
    return tmp_path / "keys"


def admission_for(keys: Path) -> Admission:
    return Admission(keys, load_public_key(keys / "server.key"))


def test_secret_key_files_are_never_readable_by_others_even_while_they_are_written(tmp_path, monkeypatch):
    """zmq.auth writes with the process's umask; under a permissive one the secret must still be 0600
    from its first byte (a chmod afterwards leaves a window)."""
    import zmq.auth

    modes = {}
    real = zmq.auth.create_certificates

    def watching(directory, name):
        made = real(directory, name)
        modes.update({Path(path).name: Path(path).stat().st_mode & 0o777 for path in made})
        return made

    monkeypatch.setattr(zmq.auth, "create_certificates", watching)
    previous = os.umask(0o022)
    try:
        generate_keys(tmp_path / "keys", 1)
        security.generate_site_key(tmp_path / "site", "site-a")
    finally:
        os.umask(previous)
    assert {name: mode for name, mode in modes.items() if name.endswith("_secret")} == {
        "server.key_secret": 0o600, "client-1.key_secret": 0o600, "site-a.key_secret": 0o600}
    assert (tmp_path / "site" / "site-a.key").stat().st_mode & 0o777 == 0o644
    assert sorted(path.name for path in (tmp_path / "site").iterdir()) == ["site-a.key", "site-a.key_secret"]


def test_a_site_makes_its_own_pair_which_the_server_admits_once_its_public_key_is_listed(tmp_path, keys):
    created, kept = security.generate_site_key(tmp_path / "site", "site-a")
    assert created == [tmp_path / "site" / "site-a.key_secret"] and kept == []
    assert security.generate_site_key(tmp_path / "site", "site-a") == ([], created)  # kept, never replaced
    public = load_public_key(tmp_path / "site" / "site-a.key")
    admission = admission_for(keys)
    assert not admission.is_authorized(public)
    (keys / "site-a.key").write_bytes((tmp_path / "site" / "site-a.key").read_bytes())  # only the public half moves
    admission = admission_for(keys)
    assert admission.is_authorized(public)
    with pytest.raises(KeyFileError, match="cannot be named 'server'"):
        security.generate_site_key(tmp_path / "site", "server")


@pytest.mark.parametrize("content", [b"public-key\n", b"public-key = \"" + b"~" * 40 + b"\"\n", b"\xff\xfe\x00" * 50,
                                     b"secret-key\n", b"public-key = " + b"x" * 100_000])
def test_a_key_file_that_does_not_parse_is_refused_by_name_and_the_rest_still_count(keys, content, caplog):
    """Defect: a malformed *.key (pyzmq's parser raises IndexError on 'public-key' without '=') killed
    the authenticator thread, and every later handshake hung."""
    admission = admission_for(keys)
    client_1 = load_public_key(keys / "client-1.key")
    (keys / "bad.key").write_bytes(content)
    assert admission.callback("*", client_1)  # no exception, the directory re-read
    assert "refusing authorized key file" in caplog.text and "bad.key" in caplog.text
    with pytest.raises(KeyFileError, match="bad.key: not a CurveZMQ certificate"):
        load_public_key(keys / "bad.key")
    assert len(admission.keys) == 2


def test_a_key_file_this_user_cannot_read_says_so_not_that_it_is_no_certificate(keys, monkeypatch):
    """Seen on the multi-host test bed: a secret key made mode 0600 by root, mounted into a client
    container whose user is uid 10001, was reported as 'not a CurveZMQ certificate'."""
    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(security.zmq.auth, "load_certificate", unreadable)
    with pytest.raises(KeyFileError, match=rf"client-1.key_secret: cannot be read by this process \(uid {os.getuid()}\)"):
        security.load_key_pair(keys / "client-1.key_secret")


def test_a_dangling_symlink_and_a_key_deleted_mid_reload_do_not_break_admission(keys, monkeypatch, caplog):
    admission = admission_for(keys)
    client_1, client_2 = load_public_key(keys / "client-1.key"), load_public_key(keys / "client-2.key")
    (keys / "gone.key").symlink_to(keys / "nowhere.key")
    assert admission.callback("*", client_1) and "gone.key: no such key file" in caplog.text
    # a key listed by scandir but deleted before it is read: that key is simply not admitted any more
    real_scandir = os.scandir
    listing = list(real_scandir(keys))
    (keys / "client-2.key").unlink()
    monkeypatch.setattr(security.os, "scandir", lambda path: iter(listing))
    assert admission.callback("*", client_1) and not admission.callback("*", client_2)
    monkeypatch.setattr(security.os, "scandir", real_scandir)
    assert admission.is_authorized(client_1) and not admission.is_authorized(client_2)


def test_a_directory_that_cannot_be_read_keeps_the_previous_keys_and_the_callback_never_raises(keys, monkeypatch,
                                                                                            caplog):
    admission = admission_for(keys)
    client_1 = load_public_key(keys / "client-1.key")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(security.os, "scandir", unreadable)
    assert admission.callback("*", client_1)  # the keys read before still count
    assert "cannot read the authorized-keys directory" in caplog.text and admission.reload_errors == 1

    def broken(path):
        raise RuntimeError("a bug nobody foresaw")

    monkeypatch.setattr(security.os, "scandir", broken)
    assert admission.callback("*", client_1) is True  # logged, decided on the previous set, thread lives
    assert admission.callback("*", b"x" * 40) is False
    assert "deciding on the keys read before" in caplog.text


def test_a_revoked_key_is_seen_by_is_authorized_within_the_reload_interval(keys, monkeypatch):
    admission = admission_for(keys)
    client_2 = load_public_key(keys / "client-2.key")
    assert admission.is_authorized(client_2)
    (keys / "client-2.key").unlink()
    monkeypatch.setattr(Admission, "RELOAD_EVERY_S", 0.0)
    assert not admission.is_authorized(client_2)


# --- state files ------------------------------------------------------------------------------------

def npz_with(path: Path, name: str, header_shape: tuple, data: bytes, *, compress=zipfile.ZIP_STORED,
             dtype: str = "<f4") -> Path:
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr(f"{name}.npy", buffer.getvalue() + data)
    return path


def test_a_state_file_declaring_a_huge_array_is_refused_before_anything_is_allocated(tmp_path):
    path = npz_with(tmp_path / "huge.npz", "state/weights/0", (2**40, 2**20), b"\0" * 64)
    with pytest.raises(ValueError, match=r"declares shape \[1099511627776, 1048576\]"):
        read_npz(path)
    with pytest.raises(CheckpointError, match="huge.npz: corrupt state file"):
        load_state(path)


@pytest.mark.parametrize("make, reason", [
    (lambda p: npz_with(p, "a", (4,), b"\0" * 16, compress=zipfile.ZIP_DEFLATED), "not an uncompressed .npy"),
    (lambda p: npz_with(p, "a", (2,), b"\0" * 16, dtype="|O"), "not a plain number type"),
    (lambda p: npz_with(p, "a", (8,), b"\0" * 16), "holds 16 bytes"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "corrupt state file"),
])
def test_state_files_that_are_not_plain_uncompressed_arrays_are_refused(tmp_path, make, reason):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(CheckpointError, match=reason):
        load_state(path)


def test_state_with_wrong_field_types_is_refused_when_read_back_as_a_record(tmp_path):
    save_state(tmp_path / "s.npz", {"history": [{"round": "one"}], "round": [1]})
    state = load_state(tmp_path / "s.npz")
    with pytest.raises(ValueError, match="field 'round' has a bad value"):
        RoundRecord.from_json(state["history"][0])
    good = RoundRecord(round=1, clients=["a"], selected=["a"], duration_s=1.0, fit_s={"a": 0.5},
                       num_examples={"a": 3}, bytes_sent=1, bytes_received=2)
    assert RoundRecord.from_json(json.loads(json.dumps(good.to_json()))) == good
    for field, value in [("clients", ["ok", "bad\n"]), ("fit_s", {"a": "fast"}), ("dropped", {"a": 1}),
                         ("train_history", {"a": {"loss": ["x"]}}), ("refused", 5), ("extra", 1)]:
        with pytest.raises(ValueError):
            RoundRecord.from_json({**good.to_json(), field: value})


# --- round timeout ----------------------------------------------------------------------------------

def test_the_auto_round_timeout_comes_from_the_plan_then_from_measured_answers():
    timeout = RoundTimeout("auto", epochs=5)
    assert timeout.seconds == 300 + 60 * 5
    timeout.answered(4.0)
    timeout.answered(12.0)
    timeout.answered(7.0)
    assert timeout.seconds == 60  # 3 x 12 s is below the floor
    timeout.answered(50.0)
    assert timeout.seconds == 150
    timeout.attempt_ended(answered=0)
    timeout.attempt_ended(answered=0)
    assert timeout.seconds == 600  # nobody answered twice: four times as long
    timeout.attempt_ended(answered=2)
    assert timeout.seconds == 150
    assert RoundTimeout(42.0, epochs=5).seconds == 42.0 and RoundTimeout(None, epochs=5).seconds is None


# --- norm bounding and model acceptance ---------------------------------------------------------------

def test_clipping_scales_only_updates_above_the_bound_and_keeps_integers():
    global_weights = [np.zeros(2, np.float32), np.array([7], np.int64)]
    small = [np.array([0.3, 0.4], np.float32), np.array([9], np.int64)]
    assert update_norm(small, global_weights) == pytest.approx(0.5)
    same, norm = clip_update(small, global_weights, 1.0)
    assert norm == pytest.approx(0.5) and same[0] is small[0]
    big = [np.array([3e38, 4e38 / 2], np.float32), np.array([9], np.int64)]
    clipped, norm = clip_update(big, global_weights, 1.0)
    assert norm > 1e38 and update_norm(clipped, global_weights) == pytest.approx(1.0, rel=1e-5)
    assert clipped[0].dtype == np.float32 and clipped[1][0] == 9


def test_a_norm_bound_keeps_one_extreme_client_from_poisoning_fedavg():
    global_weights = [np.zeros(3, np.float32)]
    honest = [FitResult(f"h{i}", [np.full(3, 0.1 * i, np.float32)], 100) for i in range(3)]
    poison = FitResult("mallory", [np.full(3, 3e38, np.float32)], 100)
    plain = FedAvg().aggregator(1, global_weights)
    bounded = NormBound(FedAvg(), max_norm=1.0).aggregator(1, global_weights)
    for result in [*honest, poison]:
        plain.add(result)
        bounded.add(result)
    assert np.abs(plain.result()[0]).max() > 1e37  # finite, and useless
    assert np.abs(bounded.result()[0]).max() < 0.5
    assert NormBound(FedAvg(), 1.0).describe() == FedAvg().describe()  # resuming with another bound is fine


def test_a_global_model_that_is_not_finite_or_has_a_non_finite_loss_is_unusable():
    weights = [np.ones(3, np.float32), np.array([1, 2], np.int32)]
    assert why_unusable(weights) is None and why_unusable(weights, 0.5) is None
    assert why_unusable([weights[0], np.array([np.inf], np.float32)]) == "its array 1 holds NaN or Inf"
    assert why_unusable(weights, float("nan")) == "its test loss is nan"
    # FedAvgM turns finite (but extreme) inputs into inf: exactly what the server refuses
    strategy, weights = FedAvgM(), [np.zeros(3, np.float32)]
    for _ in range(2):
        aggregator = strategy.aggregator(1, weights)
        aggregator.add(FitResult("mallory", [np.full(3, 3e38, np.float32)], 1))
        weights = aggregator.result()
    assert why_unusable(weights) == "its array 0 holds NaN or Inf"


# --- descriptors and dependencies ---------------------------------------------------------------------

def test_the_soft_descriptor_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        before, after = raise_open_file_limit()
        assert before == 256 and after == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == after
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_keras_is_required_at_a_version_with_no_known_safe_mode_bypass():
    import keras

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "keras>=3.15.1" in dependencies
    assert tuple(int(p) for p in keras.__version__.split(".")[:3]) >= (3, 15, 1)
    assert "keras==3.15.1" in (REPO / "services/requirements.txt").read_text()


def test_keys_can_be_handed_to_the_images_user_and_a_bad_owner_is_named(tmp_path, capsys):
    """`pyfed keys --owner 10001:10001` (run as root in a container): a node's own pair in a host folder,
    its secret mode 0600 and owned by the user the images run as, who alone can read it."""
    from pyfed import cli

    assert cli.main(["keys", "--site", "node-1", "--out", str(tmp_path / "site"), "--owner", "10001"]) == 2
    assert "--owner / KEY_OWNER: must be UID:GID in numbers" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()  # refused before anything is made
    code = cli.main(["keys", "--site", "node-1", "--out", str(tmp_path / "site"), "--owner", "10001:10002"])
    secret = tmp_path / "site" / "node-1.key_secret"
    if os.geteuid() != 0:  # only root can give files away: said, naming the setting
        assert code == 2 and "--owner / KEY_OWNER 10001:10002: cannot hand" in capsys.readouterr().err
        return
    assert code == 0
    for path in (secret, secret.with_suffix(".key")):
        assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10002)
    assert secret.stat().st_mode & 0o777 == 0o600
    assert cli.main(["keys", "--out", str(tmp_path / "server"), "--clients", "0", "--owner", "10001:10001"]) == 0
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == ["server.key", "server.key_secret"]
    assert (tmp_path / "server" / "server.key_secret").stat().st_uid == 10001
