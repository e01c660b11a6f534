"""The original PyFed, measured in the same run as PyFed: wire and round overhead.

It is installed from PyPI (pyfed==0.0.25, its declared dependencies joblib and tensorflow) into a
virtualenv of its own under bench/.venv-original. That virtualenv sees this machine's TensorFlow
(--system-site-packages) so both run on the same TensorFlow build; its own site-packages come
first, so ``import pyfed`` there is the original. The patches are listed in original_driver.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BENCH, finish, kill, median, start, tail

VENV = BENCH / ".venv-original"
DRIVER = BENCH / "original_driver.py"
ORIGINAL = "pyfed==0.0.25"


def python() -> str:
    """The original's virtualenv python, created and filled on first use. It is built beside its
    place and moved there only once the original imports from it, so an interrupted or failed
    install is made again next time instead of being used half-made; a failure says why."""
    interpreter = VENV / "bin" / "python"
    if not interpreter.exists():
        building = VENV.with_name(f"{VENV.name}.building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(building)], check=True)
        _run([str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", ORIGINAL,
              "joblib>=1.2.0"], "installing the original")
        _check(building)
        building.rename(VENV)  # venv's scripts name their directory; the interpreter path below is VENV's
    _check(VENV)
    return str(interpreter)


def _check(venv: Path) -> None:
    found = _run([str(venv / "bin" / "python"), "-P", "-c", "import pyfed.ml_socket as m; print(m.__file__)"],
                 "importing the original")
    assert str(venv) in found, f"the original's virtualenv imports pyfed from {found}"


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def driver(*args: str) -> list[str]:
    """The command running the driver in the original's virtualenv; -P keeps this repository's pyfed out."""
    return [python(), "-P", str(DRIVER), *args]


def wire(repeats: int, port: int) -> dict:
    """Median seconds and MB/s for one seed-model copy through ml_send / ml_recv."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "wire.json"
        sender = start(driver("wire-sender", str(port), str(repeats), str(out)), Path(tmp) / "sender.log")
        receiver = start(driver("wire-receiver", str(port), str(repeats)), Path(tmp) / "receiver.log")
        for process in (sender, receiver):
            done = finish(process, 600)
            assert done.returncode == 0, tail(process.log_path)
        seconds = median(json.loads(out.read_text())["seconds"])
    return {"seconds": seconds, "mb_per_s": 21_608_040 / seconds / 1e6}


ATTEMPTS = 3


def rounds(shards: list[Path], rounds_: int, epochs: int, batch_size: int, port: int, workdir: Path) -> dict:
    """:func:`run_rounds`, retried: the original's framing sometimes truncates a model.

    ``ml_recv`` stops as soon as the last 4 bytes received contain ``End``, which the HDF5 bytes
    of a model can contain, and ``ml_send`` ignores ``socket.send``'s return value; a client
    then fails with "truncated file". Each failed attempt is recorded in the result.
    """
    failures = []
    for attempt in range(1, ATTEMPTS + 1):
        try:
            result = run_rounds(shards, rounds_, epochs, batch_size, port + attempt - 1, workdir)
            return {**result, "failed_attempts": failures}
        except AssertionError as error:
            reason = next((line for line in reversed(str(error).splitlines()) if "Error" in line), str(error)[-200:])
            failures.append(reason.strip())
            print(f"original PyFed attempt {attempt} failed: {reason.strip()}", flush=True)
    raise RuntimeError(f"the original PyFed failed {ATTEMPTS} times: {failures}")


def run_rounds(shards: list[Path], rounds_: int, epochs: int, batch_size: int, port: int, workdir: Path) -> dict:
    """Run the original server and one process per shard; per-round wall, slowest fit, overhead."""
    events = workdir / "original-events.jsonl"
    events.unlink(missing_ok=True)
    server = start(driver("server", str(port), str(len(shards)), str(rounds_), str(events)),
                   workdir / "original-server.log", cwd=workdir)
    time.sleep(1.0)
    clients = [start(driver("client", f"client_{i}", str(port), str(shard), str(epochs), str(batch_size), str(events)),
                     workdir / f"original-client-{i}.log", cwd=workdir)
               for i, shard in enumerate(shards, start=1)]
    client_results = [finish(process, 900) for process in clients]
    if any(done.returncode != 0 for done in client_results):
        kill(server)
    server_done = finish(server, 900)
    for process, done in zip(clients, client_results):
        assert done.returncode == 0, tail(process.log_path)
    assert server_done.returncode == 0, tail(server.log_path)
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    accepted = min(e["t"] for e in recorded if e["event"] == "accepted")  # round 1 starts with the first send
    ends = sorted(e["t"] for e in recorded if e["event"] == "aggregated")
    starts = [accepted, *ends[:-1]]
    fits_by_client: dict[str, list[dict]] = {}
    for event in recorded:
        if event["event"] == "fit":
            fits_by_client.setdefault(event["client"], []).append(event)
    per_round = []
    for index, (round_start, round_end) in enumerate(zip(starts, ends)):
        slowest = max(fits[index]["end"] - fits[index]["start"] for fits in fits_by_client.values())
        per_round.append({"wall_s": round_end - round_start, "slowest_fit_s": slowest,
                          "overhead_s": round_end - round_start - slowest})
    warm = per_round[1:] or per_round  # as for PyFed: rounds 2..R
    return {"rounds": per_round, "server_peak_rss_mb": server_done.peak_rss_mb, "server_wall_s": server_done.wall_s,
            **{f"median_{key}": median([r[key] for r in warm]) for key in warm[0]}}
