"""What the Docker tests share: the docker CLI, TensorBoard's HTTP API, fresh ports.

The Docker tests need a Docker engine with the Compose v2 plugin. They fail (never skip) without one.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def docker(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): {why_docker_failed(result)}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


#: Held while the images build: the Docker and multi-host tests run on two workers at once, and
#: each wants the images; one at a time, the second finds every layer cached instead of installing
#: TensorFlow beside the first (two cold builds at once took 525 s on CI's two cores).
BUILD_LOCK = Path(tempfile.gettempdir()) / "pyfed-test-image-build.lock"


def build_images(env: dict | None = None) -> None:
    """``docker compose build server client`` from the repository (BASE_IMAGE and the rest from the
    environment), one build at a time on this host."""
    with open(BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        docker("compose", "build", "server", "client", env=env, timeout=1800, cwd=REPO)


def why_docker_failed(result: subprocess.CompletedProcess) -> str:
    """The daemon's or Compose's own words for a failed command, first, so that a report that keeps
    only the head of a failure (a CI summary) still shows them: the last "Error" line of its output,
    else its last line. A build log comes before it, and can run to thousands of lines."""
    lines = [line.strip() for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:500]


def require_docker():
    """Docker and Compose must be there: a missing engine is a failure, not a skip."""
    try:
        docker("info", timeout=60)
        docker("compose", "version", timeout=60)
    except (FileNotFoundError, AssertionError) as error:
        pytest.fail(f"the Docker tests need a running Docker engine with Compose v2: {error}")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for_tensorboard_runs(port: int, runs: set[str], timeout_s: float = 120, host: str = "127.0.0.1") -> dict:
    """Poll TensorBoard's HTTP API until every run is listed; return {run: [tags]}."""
    deadline = time.monotonic() + timeout_s
    seen: object = None
    while time.monotonic() < deadline:
        try:
            seen = get_json(f"http://{host}:{port}/data/runs")
            tags = get_json(f"http://{host}:{port}/data/plugin/scalars/tags")
            if runs <= set(seen) and runs <= set(tags):
                return tags
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"TensorBoard on {host}:{port} lists {seen}, not all of {sorted(runs)}")


def scalar_steps(port: int, run: str, tag: str) -> list[int]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return [step for _, step, _ in get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}")]


def steps_once(port: int, run: str, tag: str, rounds: int, timeout_s: float = 60) -> bool:
    """Whether TensorBoard shows steps 1..rounds exactly once, waiting for its reload (every 5 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            steps = scalar_steps(port, run, tag)
        except urllib.error.HTTPError as error:  # 404 until TensorBoard's next reload has the tag
            if error.code != 404 or time.monotonic() > deadline:
                raise
            steps = []
        if steps == list(range(1, rounds + 1)) or time.monotonic() > deadline:
            assert steps == list(range(1, rounds + 1)), (run, tag, steps)
            return True
        time.sleep(2)


def base_settings(**extra) -> dict:
    settings = {"SERVER_PORT": free_port(), "TENSORBOARD_PORT": free_port()}
    if os.environ.get("BASE_IMAGE"):
        settings["BASE_IMAGE"] = os.environ["BASE_IMAGE"]
    settings.update(extra)
    return settings


def client_was_lost(reason: str) -> bool:
    """Whether a failed attempt's drop reason says the client's connection went away: the server saw it
    close, or found it gone when a request to it could not be delivered (both are "connection lost")."""
    return reason.startswith("connection lost")


def container_pid(container: str) -> int:
    """The host PID of a running container's main process. Docker says 0 for a container that is not
    running, and ``os.kill(0, ...)`` would signal the test's own process group: that is a failure."""
    pid = int(docker("inspect", "--format", "{{.State.Pid}}", container).stdout.strip())
    if pid <= 0:
        raise AssertionError(f"container {container} is not running (its State.Pid is {pid}): no process to signal")
    return pid


def wait_for_text(read_log: Callable[[], str], text: str, what: str, timeout_s: float = 300) -> None:
    """Poll a log until it contains ``text``; fail with the log's tail, naming ``what`` it is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in read_log():
            return
        time.sleep(1)
    raise AssertionError(f"{text!r} not in the {what}:\n{read_log()[-3000:]}")
