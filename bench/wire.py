"""Wire: one copy of the seed model (21.6 MB) from one process to another on loopback.

Measured in one run, each as the median of several transfers:
  memcpy   np.copyto of every array into preallocated arrays (the memory-bandwidth ceiling)
  raw      a plain TCP socket: sendall of the bytes, recv_into a preallocated buffer
  pyfed    PyFed's protocol and ZeroMQ transports: encode + send + receive + decode (validated),
           server -> client (FIT) and client -> server (UPDATE, decoded against the model's specs)
The original PyFed's figure comes from bench/original.py in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time

import numpy as np

from bench.common import emit, median, seed_shapes, seed_weights, table

MB = 1e6


def memcpy(weights: list[np.ndarray], repeats: int) -> float:
    targets = [np.empty_like(w) for w in weights]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for source, target in zip(weights, targets):
            np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return median(times)


# --- raw socket -------------------------------------------------------------------------------

def _raw_receiver(port: int, nbytes: int, repeats: int) -> None:
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(repeats):
            got = 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
            conn.sendall(b"k")


def raw_socket(weights: list[np.ndarray], repeats: int) -> float:
    payload = b"".join(w.tobytes() for w in weights)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        child = mp.get_context("spawn").Process(target=_raw_receiver,
                                                args=(listener.getsockname()[1], len(payload), repeats))
        child.start()
        conn, _ = listener.accept()
        times = []
        with conn:
            for _ in range(repeats):
                started = time.perf_counter()
                conn.sendall(payload)
                conn.recv(1)
                times.append(time.perf_counter() - started)
        child.join(60)
    return median(times)


# --- PyFed ------------------------------------------------------------------------------------

RUN = "0123456789abcdef"


def _pyfed_client(address: str, repeats: int) -> None:
    from pyfed.wire import protocol
    from pyfed.wire.protocol import Message, MessageType
    from pyfed.wire.transport import ClientTransport

    specs = [("float32", shape) for shape in seed_shapes()]
    update_arrays = seed_weights(seed=1)
    update = protocol.encode(Message(MessageType.UPDATE, round=1, client_id="bench", arrays=update_arrays,
                                     body={"attempt": 1, "num_examples": 1, "fit_s": 0.0, "history": {}}))
    with ClientTransport(address) as transport:
        while not transport.send([b"hello"]):
            time.sleep(0.01)
        for _ in range(repeats):  # server -> client: decode the FIT, acknowledge
            message = protocol.decode(transport.recv(60), expected_arrays=specs)
            assert all(not a.flags.owndata for a in message.arrays), "decode copied an array"
            transport.send([b"k"])
        for _ in range(repeats):  # client -> server: on "go", send an UPDATE
            transport.recv(60)
            transport.send(update)


def pyfed_wire(weights: list[np.ndarray], repeats: int) -> tuple[float, float]:
    from pyfed.wire import protocol
    from pyfed.wire.protocol import Message, MessageType
    from pyfed.wire.transport import ServerTransport

    specs = protocol.array_specs(weights)
    limits = protocol.Limits(max_arrays=len(specs), max_array_bytes=sum(w.nbytes for w in weights),
                             max_total_bytes=sum(w.nbytes for w in weights))
    with ServerTransport("tcp://127.0.0.1:0", max_frame_bytes=protocol.max_frame_bytes(specs, limits)) as server:
        address = server.bind()
        child = mp.get_context("spawn").Process(target=_pyfed_client, args=(address, repeats))
        child.start()
        peer, _ = server.recv(60)
        down, up = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            frames = protocol.encode(Message(MessageType.FIT, round=1, body={"plan": {
                "epochs": 1, "batch_size": 32, "learning_rate": 0.001}, "attempt": 1, "run": RUN}, arrays=weights))
            server.send(peer, frames)
            server.recv(60)
            down.append(time.perf_counter() - started)
        for _ in range(repeats):
            started = time.perf_counter()
            server.send(peer, [b"go"])
            _, frames = server.recv(60)
            message = protocol.decode(frames, expected_arrays=specs, limits=limits)
            protocol.check_finite(message.arrays)
            up.append(time.perf_counter() - started)
            assert all(not a.flags.owndata for a in message.arrays), "decode copied an array"
        child.join(60)
    return median(down), median(up)


def run(quick: bool = False, original: dict | None = None) -> dict:
    weights = seed_weights()
    nbytes = sum(w.nbytes for w in weights)
    repeats = 3 if quick else 15
    t_memcpy = memcpy(weights, repeats)
    t_raw = raw_socket(weights, repeats)
    t_down, t_up = pyfed_wire(weights, repeats)
    rates = {"memcpy": nbytes / t_memcpy / MB, "raw_socket": nbytes / t_raw / MB,
             "pyfed_server_to_client": nbytes / t_down / MB, "pyfed_client_to_server": nbytes / t_up / MB}
    pyfed_rate = min(rates["pyfed_server_to_client"], rates["pyfed_client_to_server"])
    result = {"model_bytes": nbytes, "repeats": repeats, "mb_per_s": rates, "pyfed_mb_per_s": pyfed_rate,
              "pyfed_share_of_raw": pyfed_rate / rates["raw_socket"],
              "receive_copies": "1 (kernel to libzmq's buffer); decode wraps it with np.frombuffer: 0"}
    rows = [["memcpy (np.copyto)", rates["memcpy"], t_memcpy * 1000, ""],
            ["raw socket sendall/recv_into", rates["raw_socket"], t_raw * 1000, ""],
            ["PyFed server -> client (FIT)", rates["pyfed_server_to_client"], t_down * 1000,
             f"{rates['pyfed_server_to_client'] / rates['raw_socket']:.0%} of raw"],
            ["PyFed client -> server (UPDATE, validated)", rates["pyfed_client_to_server"], t_up * 1000,
             f"{rates['pyfed_client_to_server'] / rates['raw_socket']:.0%} of raw"]]
    if original:
        result["original_mb_per_s"] = original["mb_per_s"]
        result["speedup_vs_original"] = pyfed_rate / original["mb_per_s"]
        rows.append(["original PyFed (HDF5 + 1 KB recv loop)", original["mb_per_s"], original["seconds"] * 1000,
                     f"PyFed is {result['speedup_vs_original']:.1f}x faster"])
    markdown = table(f"Wire: one {nbytes / MB:.1f} MB model copy between two processes on loopback "
                     f"(median of {repeats})", ["path", "MB/s", "ms per copy", "note"], rows)
    emit("wire", result, markdown)
    return {**result, "_markdown": markdown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
