"""Shared helpers: free loopback ports and processes that are always cleaned up, by PID."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port that no other test worker, and no earlier call in this one, hands out.

    Tests run in parallel (pytest-xdist). Asking the kernel for port 0 and closing it leaves a window in
    which another worker's server can be given the same port; instead each worker picks from a band of
    its own, below the kernel's ephemeral range (32768 and up) so no outgoing connection takes it
    either, and never twice (a Compose test asks for two ports at once: the server's and TensorBoard's,
    and the same port twice fails `compose up` with "port is already allocated"). The port is checked
    free on every address, as Docker publishes it there; at most 200 tries."""
    import random
    import socket

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (index % 8) * 1500
    for _ in range(200):
        port = random.randrange(low, low + 1500)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise AssertionError(f"no free port in {low}-{low + 1499} after 200 tries ({len(_HANDED_OUT)} handed out)")


# Tests run on several workers (pytest-xdist, --dist loadgroup; see pyproject.toml). The Docker tests
# share this host's engine, its published ports and its Compose project names, and the multi-host
# tests share one test bed (its namespaces, bridge and registry are fixed names): each of the two runs
# on one worker, in order, while the other workers take the rest. Longest first, so the run's tail is
# short: the two groups (xdist puts the biggest groups first), then the benchmarks, the processes on
# loopback, and the unit tests, which fill the gaps.
SERIAL_GROUPS = ("docker", "multihost")
ORDER = ("multihost", "docker", "bench", "integration", "unit")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        names = {mark.name for mark in item.iter_markers()}
        return next((i for i, name in enumerate(ORDER) if name in names), len(ORDER))

    for item in items:
        group = next((g for g in SERIAL_GROUPS if item.get_closest_marker(g)), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=rank)


# The suite is bound by its two cores once it runs in parallel, so its summary lists the tests that
# cost the most processor time: the test's own and that of the processes it started and reaped
# (containers are the Docker engine's, not counted).
_CPU_REPORTS: list[tuple[float, str]] = []


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._cpu_started = _cpu_seconds()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" and hasattr(item, "_cpu_started"):
        report.user_properties.append(("cpu_s", round(_cpu_seconds() - item._cpu_started, 1)))


_LAYER_COSTS: dict[str, list[float]] = {}  # layer -> [tests, wall seconds, processor seconds]


def pytest_runtest_logreport(report):
    layer = next((name for name in ORDER if name in report.keywords), "other")
    costs = _LAYER_COSTS.setdefault(layer, [0, 0.0, 0.0])
    costs[1] += report.duration
    if report.when == "teardown":
        costs[0] += 1
        cpu = dict(report.user_properties).get("cpu_s")
        if cpu is not None:
            _CPU_REPORTS.append((cpu, report.nodeid))
            costs[2] += cpu


def pytest_terminal_summary(terminalreporter):
    if not _CPU_REPORTS:
        return
    total = sum(cpu for cpu, _ in _CPU_REPORTS)
    terminalreporter.section(f"most processor time (of {total:,.0f} s in all)")
    for cpu, nodeid in sorted(_CPU_REPORTS, reverse=True)[:25]:
        terminalreporter.write_line(f"{cpu:8.1f}s cpu  {nodeid}")
    terminalreporter.section("each layer: tests, wall time summed over its tests, processor time")
    for layer, (count, wall, cpu) in sorted(_LAYER_COSTS.items(), key=lambda item: -item[1][1]):
        serial = " (one worker, in turn)" if layer in SERIAL_GROUPS else ""
        terminalreporter.write_line(f"{layer:12} {count:4.0f} tests {wall:8,.0f} s wall {cpu:8,.0f} s cpu{serial}")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs the CLI in-process points the root logger at its captured stderr, which pytest
    closes after the test: later tests' log lines then failed with 'I/O operation on closed file'."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Processes:
    """Starts processes with their output in log files; kills whatever is left, by PID, at teardown."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], cwd: Path | None = None, env: dict | None = None,
              preexec_fn=None) -> subprocess.Popen:
        log_path = self.logdir / f"{name}.log"
        handle = open(log_path, "wb")
        process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, preexec_fn=preexec_fn,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        handle.close()
        process.log_path = log_path
        self.started.append((process, log_path))
        return process

    def pyfed(self, *args: str, name: str, **kwargs) -> subprocess.Popen:
        """Run ``python -m pyfed ARGS``, logging to ``NAME.log``."""
        return self.start(name, [sys.executable, "-m", "pyfed", *args], **kwargs)

    def wait_for_line(self, process: subprocess.Popen, text: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in process.log_path.read_text(errors="replace"):
                return
            if process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen in {process.log_path.name}:\n{self.tail(process)}")

    def wait(self, process: subprocess.Popen, timeout_s: float) -> int:
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{process.log_path.name} still running after {timeout_s}s:\n{self.tail(process)}")

    @staticmethod
    def tail(process: subprocess.Popen, lines: int = 40) -> str:
        return "\n".join(process.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cleanup(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.cleanup()
