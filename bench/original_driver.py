"""Runs the original PyFed (pyfed==0.0.25 from PyPI) inside its own virtualenv, for bench/original.py.

Run with that virtualenv's python, never with PyFed's: ``python original_driver.py ROLE ...``.
Patches, applied at run time and nowhere else (the package's files are untouched):
  1. ml_socket.save_model -> Keras's legacy HDF5 writer (save_model_to_hdf5). Keras 3's save_model
     refuses an h5py.File object ("Invalid filepath extension"); the original writes HDF5 into a
     BytesIO through h5py, and this keeps exactly that format.
  2. ml_socket.load_model -> Keras's legacy HDF5 reader (load_model_from_hdf5), for the same reason.
Instrumentation (timestamps only): keras.Model.fit is wrapped to record each fit's start and end,
and the server's aggregation (__fl_policy) and connection handling to record round boundaries.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pyfed.components as components  # noqa: E402  (the original package, from this venv)
import pyfed.ml_socket as ml_socket  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

assert ".venv-original" in ml_socket.__file__, f"not the original PyFed: {ml_socket.__file__}"

ml_socket.save_model = lambda model, f, include_optimizer=False: legacy_h5_format.save_model_to_hdf5(
    model, f, include_optimizer=include_optimizer)
ml_socket.load_model = lambda f, compile=False: legacy_h5_format.load_model_from_hdf5(f, compile=compile)

import tensorflow as tf  # noqa: E402

LAYERS = [784, 500, 1000, 2000, 1000, 500, 10]


def seed_model() -> tf.keras.Model:
    """The original README's model, built as its server.py builds it."""
    model = tf.keras.models.Sequential()
    model.add(tf.keras.layers.InputLayer((LAYERS[0],)))
    for units in LAYERS[1:-1]:
        model.add(tf.keras.layers.Dense(units, activation="relu"))
    model.add(tf.keras.layers.Dense(LAYERS[-1], activation="softmax"))
    model.compile(loss="sparse_categorical_crossentropy", optimizer=tf.optimizers.Adam(3e-4), metrics=["accuracy"])
    return model


def wire_sender(port: int, repeats: int, out: str) -> None:
    import socket

    model = seed_model()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        conn, _ = listener.accept()
        times = []
        with conn:
            for _ in range(repeats):
                started = time.perf_counter()
                ml_socket.ml_send(conn, model)  # HDF5 serialisation + send + wait for "Complete"
                conn.recv(3)  # the receiver's ACK after it has loaded the model
                times.append(time.perf_counter() - started)
    json.dump({"seconds": times}, open(out, "w"))


def wire_receiver(port: int, repeats: int) -> None:
    import socket

    for _ in range(600):
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.1)
    with conn:
        for _ in range(repeats):
            ml_socket.ml_recv(conn, ml_socket.SIZE)  # 1 KB receive loop + HDF5 load_model
            conn.sendall(b"ACK")


def _record(path: str, event: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(event) + "\n")


def server(port: int, clients: int, rounds: int, events: str) -> None:
    policy = components.FL_Server._FL_Server__fl_policy
    accept = components.FL_Server._FL_Server__accept_connection

    def timed_policy(self, new_weights):
        policy(self, new_weights)
        _record(events, {"event": "aggregated", "t": time.monotonic()})

    def timed_accept(self):
        accept(self)
        _record(events, {"event": "accepted", "t": time.monotonic()})

    components.FL_Server._FL_Server__fl_policy = timed_policy
    components.FL_Server._FL_Server__accept_connection = timed_accept
    fl_server = components.FL_Server(curr_model=seed_model(), num_clients=clients, rounds=rounds, port=port,
                                     multi_system=True)  # multi_system: do not launch TensorBoard at the end
    fl_server.train()


def client(name: str, port: int, data: str, epochs: int, batch_size: int, events: str) -> None:
    fit = tf.keras.Model.fit

    def timed_fit(self, *args, **kwargs):
        started = time.monotonic()
        result = fit(self, *args, **kwargs)
        _record(events, {"event": "fit", "client": name, "start": started, "end": time.monotonic()})
        return result

    tf.keras.Model.fit = timed_fit
    with np.load(data) as archive:
        x, y = archive["x"], archive["y"]
    fl_client = components.FL_Client(name=name, data=x, target=y, server_ip="127.0.0.1", server_port=port)
    fl_client.train(epochs, batch_size, 3e-4, "sparse_categorical_crossentropy", tf.optimizers.Adam, ["accuracy"])


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "wire-sender":
        wire_sender(int(args[0]), int(args[1]), args[2])
    elif role == "wire-receiver":
        wire_receiver(int(args[0]), int(args[1]))
    elif role == "server":
        server(int(args[0]), int(args[1]), int(args[2]), args[3])
    elif role == "client":
        client(args[0], int(args[1]), args[2], int(args[3]), int(args[4]), args[5])
    else:
        raise SystemExit(f"unknown role {role}")
