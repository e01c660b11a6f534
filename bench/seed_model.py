"""The seed's model for ``pyfed server --model bench/seed_model.py:build`` (and a ~100k one for many clients)."""

import keras

SEED_LAYERS = [784, 500, 1000, 2000, 1000, 500, 10]  # as bench/common.py


def _mlp(layers: list[int], learning_rate: float) -> keras.Model:
    model = keras.Sequential([keras.layers.Input((layers[0],))]
                             + [keras.layers.Dense(units, activation="relu") for units in layers[1:-1]]
                             + [keras.layers.Dense(layers[-1], activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adam(learning_rate),
                  metrics=["accuracy"])
    return model


def build() -> keras.Model:
    """Dense 784-500-1000-2000-1000-500-10: 5,402,010 float32 parameters (21.6 MB)."""
    return _mlp(SEED_LAYERS, 3e-4)


def build_small() -> keras.Model:
    """Dense 784-128-10: 101,770 parameters, for the many-clients benchmark."""
    return _mlp([784, 128, 10], 1e-3)


def build_large() -> keras.Model:
    """Dense 1000-10000-4000-10: 50,054,010 float32 parameters (200 MB), for the server-memory benchmark."""
    return _mlp([1000, 10000, 4000, 10], 1e-3)


def build_huge() -> keras.Model:
    """Dense 1000-40000-5000-10: 240,095,010 float32 parameters (960 MB), for the server-memory benchmark."""
    return _mlp([1000, 40000, 5000, 10], 1e-3)
