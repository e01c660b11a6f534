"""Shared pieces of the benchmarks: the seed workload, processes with measured RSS/CPU, reporting."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

#: The seed's workload: Dense 784-500-1000-2000-1000-500-10, 5,402,010 float32 parameters (21.6 MB).
SEED_LAYERS = [784, 500, 1000, 2000, 1000, 500, 10]


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_shapes() -> list[tuple[int, ...]]:
    shapes = []
    for fan_in, fan_out in zip(SEED_LAYERS, SEED_LAYERS[1:]):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def seed_weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in seed_shapes()]


def synthetic_data(num_examples: int, seed: int, features: int = 784, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable data: inputs centred on 0, labels from a fixed random linear teacher."""
    teacher = np.random.default_rng(12345).standard_normal((features, classes)).astype(np.float32)
    x = np.random.default_rng(seed).standard_normal((num_examples, features)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=1).astype(np.int64)


@dataclass
class Finished:
    """A finished child process: exit status, wall time, peak RSS (MB) and CPU seconds."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float


def start(args: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    handle = open(log_path, "wb")
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                                    **(env or {})})
    handle.close()
    process.started_at = time.monotonic()
    process.log_path = log_path
    return process


def kill(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` by PID without reaping it: :func:`finish` reaps it, to read its resource
    usage. (``Popen.kill`` polls first, and so reaps a process that has already exited, after which
    ``finish`` would find no child to wait for.)"""
    os.kill(process.pid, signal.SIGKILL)  # an exited, unreaped child is a zombie: the signal is harmless


def finish(process: subprocess.Popen, timeout_s: float) -> Finished:
    """Wait for ``process`` (killing it by PID after ``timeout_s``) and read its resource usage. Nothing
    else may reap it first (``Popen.poll``, ``wait`` or ``kill``): use :func:`kill`."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            kill(process)
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Finished(process.returncode, time.monotonic() - process.started_at, usage.ru_maxrss / 1024,
                    usage.ru_utime + usage.ru_stime)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict:
    import zmq

    versions = {"python": platform.python_version(), "numpy": np.__version__, "pyzmq": zmq.__version__,
                "libzmq": zmq.zmq_version()}
    try:
        from importlib.metadata import version

        versions["tensorflow"] = version("tensorflow-cpu") if _has("tensorflow-cpu") else version("tensorflow")
        versions["keras"] = version("keras")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") *
            os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "os": platform.platform(), **versions}


def _has(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
        return True
    except PackageNotFoundError:
        return False


def table(title: str, headers: list[str], rows: list[list]) -> str:
    """A markdown table (also readable on a terminal)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    out = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(out) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def emit(name: str, result: dict, markdown: str) -> None:
    """Print a benchmark's table and its JSON (one line, prefixed for machines)."""
    print(markdown)
    print(f"RESULT {name} " + json.dumps(result, default=float))
    sys.stdout.flush()


def main_with_original(doc: str | None, run) -> None:
    """``python -m bench.X [--quick] [--no-original]`` for a benchmark that compares with the original."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help="small sizes: check the script works")
    parser.add_argument("--no-original", action="store_true", help="measure PyFed only")
    args = parser.parse_args()
    run(args.quick, not args.no_original)


ANALYSIS_MARKER = "## What the numbers say"


def experiment_header(script: str, argv: list[str] | None, started: float) -> dict:
    """What an experiment's report says of how it was made: the command, the machine, date, seconds."""
    return {
        "command": f"python -m bench.{script}" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "machine": "{cores}-core {cpu}, Python {python}, TensorFlow {tensorflow}, Keras {keras}".format(
            **{"tensorflow": "?", "keras": "?", **machine()}),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
    }


def write_experiment(out: Path, name: str, results: dict, report: str) -> None:
    """NAME.json (every run) and NAME.md (the report, keeping the hand-written analysis below the
    table from the previous NAME.md); prints the report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    md = out / f"{name}.md"
    previous = md.read_text() if md.exists() else ""
    if ANALYSIS_MARKER in previous:
        report += "\n" + previous[previous.index(ANALYSIS_MARKER):]
    md.write_text(report)
    print(report)


def experiment_parser(doc: str, *, rounds: int, clients: int) -> argparse.ArgumentParser:
    """The options every experiment (strategies, privacy) takes: --quick, rounds, epochs, learning
    rate, seeds, clients."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script works")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=clients)
    return parser


def experiment_markdown(title: str, results: dict, description: str, header: list[str]) -> str:
    """An experiment's report: title, how it was made, what was run, and its table."""
    return "\n".join([
        f"# {title}", "",
        f"Made by `{results['command']}` on {results['machine']} in {results['seconds']:.0f} s ({results['date']}).",
        "", description, "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in results["table"]),
        "",
    ])



class ProtocolClients:
    """``count`` protocol-level clients in this process (numpy only, no TensorFlow): a DEALER each,
    joined as soon as its connection is up (the server may still be starting). :meth:`poll` gives
    back what the server sent, by client; WELCOMEs set the clients' ids, FINISHes are answered with a
    LEAVE, an ERROR raises."""

    def __init__(self, address: str, count: int, num_examples=lambda i: 100, io_threads: int = 1):
        import zmq

        from pyfed.wire.transport import ClientTransport

        self.context = zmq.Context(io_threads=io_threads)
        self.context.set(zmq.MAX_SOCKETS, 3 * count + 64)  # a ClientTransport is a DEALER plus two monitors
        self.transports = [ClientTransport(address, context=self.context) for _ in range(count)]
        self._poller = zmq.Poller()
        self._index = {}
        for index, transport in enumerate(self.transports):
            self._poller.register(transport.socket, zmq.POLLIN)
            self._index[transport.socket] = index
        self._joins = {i: protocol_message("join", body={"num_examples": num_examples(i)}) for i in range(count)}
        self.client_ids: dict[int, str] = {}
        self.finished: set[int] = set()

    def poll(self, timeout_ms: int = 200) -> list:
        from pyfed.wire import protocol
        from pyfed.wire.protocol import Message, MessageType

        for i in list(self._joins):
            if self.transports[i].send(self._joins[i]):
                del self._joins[i]
        received = []
        for socket, _ in self._poller.poll(timeout_ms):
            i = self._index[socket]
            message = protocol.decode(socket.recv_multipart(copy=False))
            if message.type is MessageType.WELCOME:
                self.client_ids[i] = message.client_id
            elif message.type is MessageType.FINISH:
                self.transports[i].send(protocol.encode(Message(MessageType.LEAVE, client_id=self.client_ids[i])))
                self.finished.add(i)
            elif message.type is MessageType.ERROR:
                raise RuntimeError(f"client {i}: server error {message.body}")
            received.append((i, message))
        return received

    def send(self, i: int, kind: str, *, deadline: float, **fields) -> None:
        """Send client ``i``'s message (an UPDATE in chunks when large, as clients do), waiting while its
        queue is full, until ``deadline``."""
        from pyfed.wire import protocol
        from pyfed.wire.protocol import Message, MessageType

        message = Message(MessageType(kind), client_id=self.client_ids[i], **fields)
        for frames in protocol.encode_update(message):
            while not self.transports[i].send(frames):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"client {i} could not send its {kind} in time")
                time.sleep(0.01)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        self.context.term()


def protocol_message(kind: str, **fields) -> list:
    from pyfed.wire import protocol
    from pyfed.wire.protocol import Message, MessageType

    return protocol.encode(Message(MessageType(kind), **fields))


def experiment_args(doc: str, argv: list[str] | None, *, name: str, rounds: int, clients: int,
                    more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """An experiment's parsed options (experiment_parser's, ``more``'s and --out for NAME.md and
    NAME.json), warnings-only logging, and --quick's sizes: 2 rounds of 1 epoch, 1 seed."""
    parser = experiment_parser(doc, rounds=rounds, clients=clients)
    if more is not None:
        more(parser)
    parser.add_argument("--out", type=Path, default=BENCH, help=f"directory for {name}.md and {name}.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.rounds, args.seeds, args.epochs = 2, 1, 1
    return args


def mean_and_spread(values: list[float]) -> str:
    """``mean ± standard deviation`` of an experiment's values over its seeds (± 0 for one)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"
