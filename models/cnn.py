"""A small CNN for the embedded digits set, to show your own model in Compose:

    MODEL=/models/cnn.py:build docker compose up --scale client=3

Any file here is mounted read-only into the server at /models. Only the server runs it: clients
receive the architecture as JSON (no code) and rebuild it in Keras's safe mode, so it must be made
of Keras's own layers (no Lambda). The digits examples arrive as 64 features; the first layer
turns them back into 8x8 single-channel images (pixels already scaled to [0, 1] by `pyfed partition`).
"""

import keras


def build() -> keras.Model:
    model = keras.Sequential([
        keras.layers.Input((64,)),
        keras.layers.Reshape((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ], name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(0.005), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model
