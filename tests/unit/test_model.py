"""The model's wire form: rebuilt in Keras safe mode; anything outside keras is refused."""

import json

import keras
import numpy as np
import pytest

from pyfed.learning.model import (ModelError, check_keras_config, default_model, from_wire, load_model_spec,
                                  set_learning_rate, settle_training, to_wire)

pytestmark = pytest.mark.unit


def test_round_trip_rebuilds_an_equivalent_compiled_model():
    model = default_model((64,), 10, learning_rate=0.01)
    model_json, compile_config = to_wire(model)
    json.dumps(compile_config)  # JSON, nothing else
    rebuilt = from_wire(model_json, compile_config)
    assert [w.shape for w in rebuilt.get_weights()] == [w.shape for w in model.get_weights()]
    assert rebuilt.loss == "sparse_categorical_crossentropy"
    assert float(rebuilt.optimizer.learning_rate) == pytest.approx(0.01)
    rebuilt.set_weights(model.get_weights())
    x = np.random.default_rng(0).random((5, 64), np.float32)
    np.testing.assert_allclose(rebuilt.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def _with_layer(model_json, layer):
    config = json.loads(model_json)
    config["config"]["layers"].append(layer)
    return json.dumps(config)


@pytest.mark.parametrize("layer, message", [
    ({"module": "os", "class_name": "system", "config": {}}, "module 'os'"),
    ({"module": "keras.layers", "class_name": "Lambda", "config": {"function": "x"}}, "Lambda"),
    ({"class_name": "__lambda__", "config": {"code": "AAAA"}}, "__lambda__"),
    ({"module": "builtins", "class_name": "eval", "config": {}}, "module 'builtins'"),
])
def test_hostile_architectures_are_refused_before_keras_sees_them(layer, message):
    model_json, compile_config = to_wire(default_model((4,), 2))
    with pytest.raises(ModelError, match=message):
        from_wire(_with_layer(model_json, layer), compile_config)


def test_hostile_compile_settings_are_refused():
    model_json, compile_config = to_wire(default_model((4,), 2))
    bad = dict(compile_config, loss={"module": "subprocess", "class_name": "run", "config": {}})
    with pytest.raises(ModelError, match="module 'subprocess'"):
        from_wire(model_json, bad)


def test_garbage_architecture_gives_a_model_error():
    with pytest.raises(ModelError, match="not JSON"):
        from_wire("{nope", {})
    with pytest.raises(ModelError, match="cannot rebuild"):
        from_wire(json.dumps({"module": "keras.layers", "class_name": "NoSuchLayer", "config": {}}), {})


def test_deeply_nested_config_is_refused():
    deep = {}
    for _ in range(300):
        deep = {"config": deep}
    with pytest.raises(ModelError, match="nested too deeply"):
        check_keras_config(deep, "architecture")


def test_model_spec_from_a_file(tmp_path):
    (tmp_path / "my_model.py").write_text(
        "import keras\n"
        "def build():\n"
        "    return keras.Sequential([keras.layers.Input((3,)), keras.layers.Dense(2, activation='softmax')])\n")
    model = load_model_spec(f"{tmp_path / 'my_model.py'}:build")
    assert not model.compiled  # as its function returned it: settle_training compiles it
    training = settle_training(model)
    assert model.optimizer is not None and model.loss == "sparse_categorical_crossentropy"
    assert (training.optimizer, training.learning_rate) == ("Adam", 0.001)


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "must be module:function"),
    ("/no/such/file.py:build", "no such file"),
    ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
    ("json:no_such_function", "has no function no_such_function"),
    ("json:dumps", r"dumps\(\) failed: TypeError"),
    ("json:JSONDecoder", "returned JSONDecoder, not a Keras model"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        load_model_spec(spec)


def test_a_saved_keras_model_is_a_model_spec_and_a_bad_one_is_named(tmp_path):
    from pyfed.learning.export import save_keras

    trained = default_model((64,), 10, learning_rate=0.01)
    save_keras(trained, tmp_path / "mine.keras")
    loaded = load_model_spec(str(tmp_path / "mine.keras"))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), trained.get_weights()))
    assert loaded.compiled
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="broken.keras: not a loadable Keras model"):
        load_model_spec(str(tmp_path / "broken.keras"))
    with pytest.raises(ModelError, match="absent.keras: no such file"):
        load_model_spec(str(tmp_path / "absent.keras"))


def test_the_example_cnn_in_models_travels_to_clients_as_keras_layers_only():
    from pathlib import Path

    model = load_model_spec(str(Path(__file__).resolve().parents[2] / "models" / "cnn.py") + ":build")
    model_json, compile_config = to_wire(model)
    rebuilt = from_wire(model_json, compile_config)  # safe mode, the client's way
    assert [layer.__class__.__name__ for layer in rebuilt.layers][:3] == ["Reshape", "Conv2D", "MaxPooling2D"]
    assert rebuilt.count_params() == model.count_params()


# --- the training settings in force: the model's own compile settings unless overridden ----------

def compiled_mlp(optimizer, loss="sparse_categorical_crossentropy", metrics=("accuracy",)):
    import keras

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return model


def saved_rate(model) -> float:
    """The learning rate the model's compile settings say (what latest.keras and the wire carry)."""
    return from_wire(*to_wire(model)).optimizer.get_config()["learning_rate"]


def test_a_compiled_models_optimizer_rate_loss_and_metrics_are_kept_and_said_to_be_its_own():
    import keras

    model = compiled_mlp(keras.optimizers.SGD(0.005, momentum=0.9), loss="categorical_crossentropy",
                         metrics=("accuracy", "auc"))
    training = settle_training(model)
    assert (training.optimizer, training.learning_rate, training.schedule) == ("SGD", 0.005, None)
    assert training.loss == "categorical_crossentropy" and training.metrics == ("accuracy", "auc")
    assert {training.optimizer_from, training.learning_rate_from, training.loss_from} == {"the model's compile settings"}
    assert saved_rate(model) == pytest.approx(0.005) and model.optimizer.get_config()["momentum"] == 0.9
    line = training.describe()
    assert "optimizer SGD (the model's compile settings), learning rate 0.005 (the model's compile settings)" in line
    assert "loss categorical_crossentropy and metrics accuracy, auc" in line


def test_a_given_learning_rate_replaces_the_compiled_one_and_the_saved_settings_say_so():
    import keras

    model = compiled_mlp(keras.optimizers.SGD(0.005, momentum=0.9))
    training = settle_training(model, learning_rate=0.02)
    assert (training.optimizer, training.learning_rate) == ("SGD", 0.02)
    assert training.learning_rate_from == "--learning-rate / LEARNING_RATE"
    assert training.optimizer_from == "the model's compile settings"
    assert saved_rate(model) == pytest.approx(0.02) and model.optimizer.get_config()["momentum"] == 0.9


def test_a_given_optimizer_replaces_the_compiled_one_at_the_models_rate_and_keeps_its_loss():
    import keras

    model = compiled_mlp(keras.optimizers.SGD(0.005), loss="categorical_crossentropy")
    training = settle_training(model, optimizer="rmsprop")
    assert (training.optimizer, training.learning_rate, training.loss) == ("RMSprop", 0.005, "categorical_crossentropy")
    assert training.optimizer_from == "--optimizer / OPTIMIZER"
    assert training.learning_rate_from == "the model's compile settings"


def test_an_uncompiled_model_gets_pyfeds_defaults_or_the_given_ones():
    model = default_model((4,), 3, None)
    assert not model.compiled
    training = settle_training(model, uncompiled="PyFed's default model")
    assert (training.optimizer, training.learning_rate, training.loss) == ("Adam", 0.001, "sparse_categorical_crossentropy")
    assert {training.optimizer_from, training.learning_rate_from, training.loss_from} == {"PyFed's default model"}
    other = default_model((4,), 3, None)
    training = settle_training(other, optimizer="sgd", learning_rate=0.1)
    assert (training.optimizer, training.learning_rate) == ("SGD", 0.1)
    assert training.optimizer_from == "--optimizer / OPTIMIZER" and training.learning_rate_from == "--learning-rate / LEARNING_RATE"


def test_a_learning_rate_schedule_is_kept_and_a_rate_cannot_replace_it():
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=10, decay_rate=0.5)
    model = compiled_mlp(keras.optimizers.Adam(schedule))
    training = settle_training(model)
    assert (training.schedule, training.learning_rate) == ("ExponentialDecay", pytest.approx(0.01))
    assert "a ExponentialDecay schedule starting at 0.01" in training.describe()
    set_learning_rate(model, training.learning_rate)  # what a client does with the plan's rate
    assert isinstance(model.optimizer._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    with pytest.raises(ModelError, match=r"--learning-rate / LEARNING_RATE is 0.1, but the model's optimizer follows "
                                         r"a learning-rate schedule \(ExponentialDecay\)"):
        settle_training(compiled_mlp(keras.optimizers.Adam(schedule)), learning_rate=0.1)
    rebuilt = from_wire(*to_wire(model))  # the client's model keeps the schedule too
    assert isinstance(rebuilt.optimizer._learning_rate, keras.optimizers.schedules.ExponentialDecay)


def test_an_unknown_optimizer_is_refused_naming_the_variable():
    from pyfed.config import ConfigError, ServerConfig, resolve

    with pytest.raises(ConfigError, match=r"--optimizer / OPTIMIZER: must be one of adam, .*got 'adamm'"):
        resolve(ServerConfig, {}, {"OPTIMIZER": "adamm"}, {})
    assert resolve(ServerConfig, {}, {"OPTIMIZER": "SGD", "LEARNING_RATE": ""}, {}).optimizer == "sgd"
    assert resolve(ServerConfig, {}, {}, {}).learning_rate is None


def test_the_default_model_is_a_small_cnn_for_images_and_an_mlp_for_flat_features():
    from pyfed.learning.model import DEFAULT_CNN_NAME, DEFAULT_MLP_NAME

    images = default_model((32, 32, 3), 4, None)
    assert images.name == DEFAULT_CNN_NAME and images.output_shape == (None, 4)
    assert any(isinstance(layer, keras.layers.Conv2D) for layer in images.layers)
    assert images.count_params() < 25_000  # a round's update stays small
    assert default_model((8, 8, 1), 10, None).name == DEFAULT_CNN_NAME  # the smallest side it takes
    for shape in ((64,), (7, 7, 1), (28, 28)):  # flat, too small to pool twice, no channel axis
        model = default_model(shape, 10, None)
        assert model.name == DEFAULT_MLP_NAME and model.output_shape == (None, 10), shape


def test_the_default_cnn_learns_where_the_position_of_a_shape_varies():
    """Bright squares vs bright bars at random places in 16x16 images: the CNN, trained briefly, tells
    them apart on images it has not seen."""
    rng = np.random.default_rng(0)
    x = np.zeros((400, 16, 16, 1), np.float32)
    y = rng.integers(0, 2, 400)
    for image, label, (row, col) in zip(x, y, rng.integers(0, 11, (400, 2))):
        if label:
            image[row:row + 5, col:col + 5] = 1.0
        else:
            image[row + 2, col:col + 5] = 1.0
    model = default_model((16, 16, 1), 2, 0.01)
    model.fit(x[:300], y[:300], epochs=15, batch_size=32, verbose=0)
    assert model.evaluate(x[300:], y[300:], verbose=0)[1] >= 0.95


def test_features_on_scales_thousands_apart_are_named_unless_the_model_normalises_them():
    from pyfed.learning.data import load_dataset
    from pyfed.learning.model import default_model, unscaled_features

    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(1000, 300, (500, 1)), rng.normal(0.1, 0.02, (500, 1)), rng.normal(5, 1, (500, 3)),
              np.zeros((500, 1))].astype(np.float32)  # a constant feature has no scale to compare
    warning = unscaled_features(default_model((6,), 2), x, "cancer.csv")
    assert warning.startswith("cancer.csv: the features' scales differ") and "(feature 0: " in warning
    assert "feature 1: 0.1" in warning and "standardise the features the same way at every site" in warning
    normalised = keras.Sequential([keras.Input((6,)), keras.layers.Normalization(mean=0.0, variance=1.0),
                                   keras.layers.Dense(2)])
    nested = keras.Sequential([keras.Input((6,)), keras.Sequential([keras.layers.BatchNormalization()]),
                               keras.layers.Dense(2)])
    assert unscaled_features(normalised, x, "cancer.csv") is None and unscaled_features(nested, x, "c") is None
    digits, _ = load_dataset("digits")  # pixels in [0, 1], some rarely inked: one scale
    assert unscaled_features(default_model((64,), 10), digits, "digits") is None
    images = np.concatenate([np.full((4, 8, 8, 1), 255.0), np.full((4, 8, 8, 1), 0.01)], axis=1)
    assert unscaled_features(default_model((16, 8, 1), 2), images, "images") is None  # not tabular


def test_the_feature_scaling_layer_standardises_by_what_it_is_set_to_never_trains_and_travels_as_json():
    from pyfed.learning.model import (batch_norm_layers, default_model, feature_scaling_indices, from_wire,
                                      local_array_indices, needs_scaling, to_wire, unscaled_features)

    model = default_model((3,), 2, feature_scaling=True)
    mean_index, variance_index = feature_scaling_indices(model)
    weights = model.get_weights()
    weights[mean_index] = np.array([1000, 0.1, 5], np.float32)
    weights[variance_index] = np.array([9e4, 4e-4, 1], np.float32)
    model.set_weights(weights)
    scaled = keras.Model(model.inputs, model.get_layer("feature_scaling").output)
    assert np.allclose(scaled.predict(np.array([[1300, 0.12, 4]], np.float32), verbose=0), [[1, 1, -1]], atol=1e-4)
    model.fit(np.full((8, 3), 7.0, np.float32), np.zeros(8, np.int64), epochs=1, verbose=0)
    assert np.allclose(model.get_weights()[mean_index], [1000, 0.1, 5])  # training leaves it as the sites set it
    received = from_wire(*to_wire(model))  # what a site builds from the server's description
    assert feature_scaling_indices(received) == (mean_index, variance_index)
    assert batch_norm_layers(model) == [] and local_array_indices(model, "batchnorm") == ()  # not FedBN's
    assert feature_scaling_indices(default_model((3,), 2)) is None
    unscaled = np.array([[1000, 0.1, 5], [1500, 0.2, 6]], np.float32)
    assert needs_scaling(unscaled) and unscaled_features(model, unscaled, "x.csv") is None


def test_what_each_batch_norm_layer_receives_is_read_in_inference_mode_nested_layers_too():
    from pyfed.learning.model import batch_norm_arrays, batch_norm_inputs, feature_scaling_layer

    inner = keras.Sequential([keras.layers.Dense(5), keras.layers.BatchNormalization(name="inner_bn")])
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3)(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(inner(x))
    model = keras.Model(inputs, outputs)
    model.layers[2].moving_mean.assign([1.0, -2.0, 3.0])  # inference mode uses these, not the batch's
    positions = {id(v): i for i, v in enumerate(model.weights)}
    conv_bn = model.layers[2]
    assert batch_norm_arrays(model) == [
        ("conv_bn", positions[id(conv_bn.moving_mean)], positions[id(conv_bn.moving_variance)], 3, 16),
        ("inner_bn", positions[id(inner.layers[1].moving_mean)], positions[id(inner.layers[1].moving_variance)], 5, 1)]
    data = np.random.default_rng(0).random((37, 6, 6, 2), dtype=np.float32)
    conv_out = model.layers[1](data).numpy()
    parts = []
    batch_norm_inputs(model, 0, data, parts.append, batch_size=10)
    assert [p.shape for p in parts] == [(160, 3)] * 3 + [(112, 3)]
    assert np.allclose(np.concatenate(parts), conv_out.reshape(-1, 3), atol=1e-6)
    after_conv_bn = conv_bn(conv_out, training=False).numpy().reshape(37, -1)
    parts.clear()
    batch_norm_inputs(model, 1, data, parts.append)
    assert np.allclose(np.concatenate(parts), inner.layers[0](after_conv_bn).numpy(), atol=1e-5)
    assert "call" not in vars(conv_bn) and "call" not in vars(inner.layers[1])  # unwrapped after
    scaled = keras.Sequential([keras.Input((4,)), feature_scaling_layer(), keras.layers.Dense(2)])
    assert batch_norm_arrays(scaled) == []  # the feature scaling is set before round 1, not recalibrated
