"""The trained model as files: latest.keras, best.keras and the record of which round each holds."""

import json
import logging

import numpy as np
import pytest

from pyfed.learning.export import ModelFiles
from pyfed.learning.model import default_model

pytestmark = pytest.mark.unit


def shifted(model, amount: float) -> list[np.ndarray]:
    return [w + np.float32(amount) for w in model.get_weights()]


def test_latest_follows_every_round_and_best_only_the_best_and_the_record_says_which(tmp_path):
    model = default_model((4,), 3, learning_rate=0.01)
    files = ModelFiles(model, tmp_path / "model", "test_accuracy")
    assert files.written() == {"latest": None, "best": None}
    first, second = shifted(model, 0.5), shifted(model, -0.25)
    files(first, 1, True)
    files(second, 2, False)
    record = json.loads((tmp_path / "model" / "files.json").read_text())
    assert record == files.written() == {"latest": {"file": "model/latest.keras", "round": 2},
                                         "best": {"file": "model/best.keras", "round": 1, "metric": "test_accuracy"}}
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["best.keras", "files.json", "latest.keras"]

    # each file loads with Keras alone and holds its round's weights (tests/integration loads them in
    # a fresh process after a real run)
    import keras

    x = np.random.default_rng(0).random((5, 4), np.float32)
    for name, weights in (("latest", second), ("best", first)):
        loaded = keras.saving.load_model(tmp_path / "model" / f"{name}.keras")
        model.set_weights(weights)
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_resumed_run_continues_the_record_and_a_corrupt_record_is_started_afresh(tmp_path, caplog):
    model = default_model((4,), 3, learning_rate=0.01)
    ModelFiles(model, tmp_path / "model", "test_loss")(model.get_weights(), 3, True)
    resumed = ModelFiles(model, tmp_path / "model", "test_loss")
    assert resumed.written()["best"] == {"file": "model/best.keras", "round": 3, "metric": "test_loss"}
    with caplog.at_level(logging.WARNING, logger="pyfed.export"):
        assert ModelFiles(model, tmp_path / "model", "test_accuracy").written()["best"]["metric"] == "test_loss"
        assert "best.keras was chosen by test_loss, now by test_accuracy" in caplog.text
        for corrupt in ('{"latest": {"file": "x", "round": -1}, "best": null}', "[1, 2]", "{not json"):
            (tmp_path / "model" / "files.json").write_text(corrupt)
            assert ModelFiles(model, tmp_path / "model", "test_loss").written() == {"latest": None, "best": None}
    assert caplog.text.count("ignoring") == 3


def test_a_model_file_that_cannot_be_written_raises_and_its_record_keeps_the_previous_round(tmp_path):
    model = default_model((4,), 3, learning_rate=0.01)
    files = ModelFiles(model, tmp_path / "model", "test_accuracy")
    files(model.get_weights(), 1, True)
    (tmp_path / "model" / "latest.keras").unlink()
    (tmp_path / "model" / "latest.keras").mkdir()  # in the way: the rename fails
    with pytest.raises(OSError):
        files(model.get_weights(), 2, True)
    assert files.written()["latest"]["round"] == 1 and files.written()["best"]["round"] == 1
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.endswith(".tmp")]


# --- pyfed export -------------------------------------------------------------------------------------

def run_dir_with_model(tmp_path, model):
    """A LOGDIR whose best.keras holds the model's weights + 0.1 and latest.keras + 0.2 (the files
    set the model's weights: both are taken from its weights before)."""
    first, second = shifted(model, 0.1), shifted(model, 0.2)
    files = ModelFiles(model, tmp_path / "logs" / "model", "test_accuracy")
    files(first, 1, True)
    files(second, 2, False)
    return tmp_path / "logs"


def test_export_finds_a_runs_latest_or_best_model_a_keras_file_or_a_checkpoint_with_its_model(tmp_path):
    from pyfed.learning.export import model_to_export
    from pyfed.learning.model import load_model_spec
    from pyfed.persistence.files import save_state

    model = default_model((4,), 3, learning_rate=0.01)
    reference = model.get_weights()
    logdir = run_dir_with_model(tmp_path, model)  # the files change the model's weights: reference is from before
    x = np.random.default_rng(1).random((3, 4), np.float32)

    def predicts_like(candidate, like, weights):
        like.set_weights(weights)
        np.testing.assert_array_equal(candidate.predict(x, verbose=0), like.predict(x, verbose=0))

    predicts_like(model_to_export(logdir), model, [w + np.float32(0.2) for w in reference])
    predicts_like(model_to_export(logdir, which="best"), model, [w + np.float32(0.1) for w in reference])
    predicts_like(model_to_export(logdir / "model" / "best.keras"), model, [w + np.float32(0.1) for w in reference])

    (tmp_path / "net.py").write_text(
        "import keras\n"
        "def build():\n"
        "    return keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, activation='softmax')])\n")
    spec = f"{tmp_path / 'net.py'}:build"
    built = load_model_spec(spec)
    weights = [np.full(w.shape, 0.5, w.dtype) for w in built.get_weights()]
    save_state(tmp_path / "round-000002.npz", {"round": 2, "weights": weights})
    predicts_like(model_to_export(tmp_path / "round-000002.npz", model_spec=spec), built, weights)


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda p: p.mkdir(), {}, r"holds no latest.keras \(nor model/latest.keras\): not a run's LOGDIR"),
    (lambda p: None, {}, "give a .keras file, a run's LOGDIR or a checkpoint .npz"),
    (lambda p: p.with_suffix(".keras").write_bytes(b"PK\x03\x04 not really"), {"suffix": ".keras"},
     "not a loadable Keras model"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"x"), {"suffix": ".npz"}, "give --model / MODEL"),
])
def test_export_says_in_one_line_what_is_wrong_with_its_source(tmp_path, setup, kwargs, message):
    from pyfed.learning.export import ExportError, model_to_export

    source = tmp_path / "source"
    setup(source)
    with pytest.raises(ExportError, match=message):
        model_to_export(source.with_suffix(kwargs.get("suffix", "")))


def test_a_checkpoint_of_another_model_is_refused_by_its_shapes(tmp_path):
    from pyfed.learning.export import ExportError, model_to_export
    from pyfed.persistence.files import save_state

    save_state(tmp_path / "round-000001.npz", {"round": 1, "weights": [np.zeros((5, 3), np.float32),
                                                                        np.zeros(3, np.float32)]})
    (tmp_path / "net.py").write_text(
        "import keras\n"
        "def build():\n"
        "    return keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, activation='softmax')])\n")
    with pytest.raises(ExportError, match="its weights do not fit"):
        model_to_export(tmp_path / "round-000001.npz", model_spec=f"{tmp_path / 'net.py'}:build")


def test_each_format_loads_and_predicts_as_the_model_does(tmp_path):
    import tensorflow as tf

    from pyfed.learning.export import ExportError, export_model, load_model_file

    model = default_model((4,), 3, learning_rate=0.01)
    x = np.random.default_rng(2).random((1, 4), np.float32)
    expected = model.predict(x, verbose=0)

    keras_file = export_model(model, "keras", tmp_path / "out" / "model.keras")
    np.testing.assert_array_equal(load_model_file(keras_file).predict(x, verbose=0), expected)

    saved = export_model(model, "savedmodel", tmp_path / "out" / "saved")
    served = tf.saved_model.load(str(saved))  # held: its variables go with it
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-6)
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, "savedmodel", saved)

    lite = export_model(model, "tflite", tmp_path / "out" / "model.tflite")
    interpreter = tf.lite.Interpreter(model_path=str(lite))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), expected,
                               rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.keras", "model.tflite", "saved"]
    with pytest.raises(ExportError, match="must end in .tflite"):
        export_model(model, "tflite", tmp_path / "out" / "model.bin")


def test_a_run_starts_from_a_keras_file_or_weights_file_of_the_same_model_and_refuses_others(tmp_path):
    from pyfed.learning.export import ExportError, load_initial_weights, save_keras

    trained = default_model((4,), 3, learning_rate=0.01)
    trained.set_weights(shifted(trained, 0.3))
    save_keras(trained, tmp_path / "best.keras")
    trained.save_weights(tmp_path / "trained.weights.h5")
    for source in ("best.keras", "trained.weights.h5"):
        fresh = default_model((4,), 3, learning_rate=0.01)
        load_initial_weights(fresh, tmp_path / source)
        assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), trained.get_weights())), source

    other = default_model((5,), 3, learning_rate=0.01)
    with pytest.raises(ExportError, match="best.keras: its weights do not fit the model: array 0"):
        load_initial_weights(other, tmp_path / "best.keras")
    with pytest.raises(ExportError, match="trained.weights.h5: its weights do not fit the model"):
        load_initial_weights(other, tmp_path / "trained.weights.h5")
    with pytest.raises(ExportError, match="give a .keras model or a .weights.h5 file"):
        (tmp_path / "w.npz").write_bytes(b"x")
        load_initial_weights(other, tmp_path / "w.npz")
    with pytest.raises(ExportError, match="missing.keras: no such file"):
        load_initial_weights(other, tmp_path / "missing.keras")
    for name, content in (("torn.keras", (tmp_path / "best.keras").read_bytes()[:300]),
                          ("torn.weights.h5", (tmp_path / "trained.weights.h5").read_bytes()[:300]),
                          ("noise.weights.h5", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ExportError, match=f"{name}: "):
            load_initial_weights(other, tmp_path / name)


# --- hostile model and checkpoint files (Hardening II: tried as an attacker) ---------------------------

def _rewritten(source, target, config=None, weights=None):
    """``source``'s .keras archive with its config.json or model.weights.h5 replaced."""
    import zipfile

    with zipfile.ZipFile(source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    if config is not None:
        files["config.json"] = json.dumps(config).encode()
    if weights is not None:
        files["model.weights.h5"] = weights
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


def _bomb_weights() -> bytes:
    """An h5 weights file of a few kB whose first dataset declares 4 GB (gzip-compressed zeros)."""
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as weights:
        weights.create_dataset("layers/dense/vars/0", shape=(50_000, 20_000), dtype="float32", compression="gzip",
                               chunks=(1000, 1000))
    return buffer.getvalue()


def test_a_hostile_keras_file_is_refused_before_keras_reads_it_wherever_it_is_given(tmp_path):
    """A .keras file as MODEL, --initial-weights or `pyfed export --from`: one whose configuration
    names a module outside Keras is refused by PyFed's own check (Keras's safe mode refuses it too,
    with a less telling message); one whose weights declare 4 GB in a file of 1 kB (Keras allocated
    16 GB and took 52 s before refusing it) is refused at once, its size named."""
    import keras

    from pyfed.learning.export import ExportError, load_initial_weights, model_to_export
    from pyfed.learning.model import ModelError, load_model_spec

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
    model.save(tmp_path / "good.keras")
    config = json.loads(__import__("zipfile").ZipFile(tmp_path / "good.keras").read("config.json"))
    config["config"]["layers"][1]["config"]["activation"] = {"module": "os", "class_name": "function",
                                                             "config": "system", "registered_name": "system"}
    hostile = _rewritten(tmp_path / "good.keras", tmp_path / "os.keras", config=config)
    bomb = _rewritten(tmp_path / "good.keras", tmp_path / "bomb.keras", weights=_bomb_weights())
    assert bomb.stat().st_size < 5000
    with pytest.raises(ModelError, match="os.keras: .*refers to module 'os'; only keras objects are accepted"):
        load_model_spec(str(hostile))
    with pytest.raises(ExportError, match=r"bomb.keras: its weights declare 4,000,000,000 bytes in a file of"):
        model_to_export(bomb)
    with pytest.raises(ExportError, match="bomb.keras: its weights declare"):
        load_initial_weights(model, bomb)
    (tmp_path / "bomb.weights.h5").write_bytes(_bomb_weights())
    with pytest.raises(ExportError, match="bomb.weights.h5: its weights declare 4,000,000,000 bytes"):
        load_initial_weights(model, tmp_path / "bomb.weights.h5")


def test_export_from_a_hostile_checkpoint_names_it_and_reads_nothing_it_declares(tmp_path):
    """`pyfed export --from` a checkpoint whose entry declares 8 GB in a file of a few hundred
    bytes, or one that is a pipe: refused in one line, nothing allocated, nothing waited on."""
    import os
    import struct
    import zipfile

    from pyfed.learning.export import ExportError, model_to_export

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 2000), }"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header + b"\n"
    with zipfile.ZipFile(tmp_path / "round-000001.npz", "w") as archive:
        archive.writestr("weights.npy", npy)
    with pytest.raises(ExportError, match=r"round-000001.npz: corrupt state file .*declares shape \[1000000, 2000\]"):
        model_to_export(tmp_path / "round-000001.npz", model_spec="tests.unit.test_export:small_model")
    os.mkfifo(tmp_path / "round-000002.npz")
    with pytest.raises(ExportError, match="round-000002.npz: is not a regular file"):
        model_to_export(tmp_path / "round-000002.npz", model_spec="tests.unit.test_export:small_model")


def small_model():
    import keras

    return keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])


def test_format_all_writes_each_file_beside_the_stem_and_a_folder_it_cannot_write_is_one_line(tmp_path):
    from pyfed.learning.export import ExportError, export_models

    model = default_model((4,), 3, learning_rate=0.01)
    written = export_models(model, "all", tmp_path / "out" / "digits")
    assert [(fmt, p.name) for fmt, p in written] == [
        ("keras", "digits.keras"), ("savedmodel", "digits-savedmodel"), ("tflite", "digits.tflite")]
    assert all(p.exists() for _, p in written)
    with pytest.raises(ExportError, match="with --format all, give a name without a suffix"):
        export_models(model, "all", tmp_path / "out" / "digits.keras")
    (tmp_path / "a-file").write_text("not a folder")
    for fmt, name in (("keras", "m.keras"), ("tflite", "m.tflite"), ("savedmodel", "m")):
        with pytest.raises(ExportError, match=r"cannot write there \(.+\): write into a folder this user"):
            export_models(model, fmt, tmp_path / "a-file" / name)


def test_the_model_folder_copied_out_of_compose_is_a_source(tmp_path):
    """The README's copy step (`docker compose cp tensorboard:/logs/model .`) gives a folder holding
    latest.keras and best.keras: --from that folder works as --from the LOGDIR does."""
    from pyfed.learning.export import ExportError, model_to_export, save_keras

    trained = default_model((4,), 3, learning_rate=0.01)
    trained.set_weights(shifted(trained, 0.2))
    (tmp_path / "model").mkdir()
    save_keras(trained, tmp_path / "model" / "latest.keras")
    for source in (tmp_path, tmp_path / "model"):
        model = model_to_export(source)
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), trained.get_weights()))
    with pytest.raises(ExportError, match="holds no best.keras"):
        model_to_export(tmp_path / "model", which="best")
