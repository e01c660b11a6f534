"""What the multi-host scenarios share: a remote site's Compose client on its machine, and its data."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from tests.docker.support import REPO
from tests.multihost.testbed import Machine, stop_process


class Site:
    """A remote site's `docker compose -f compose.client.yaml up`, attached, on its machine."""

    def __init__(self, machine: Machine, command: str, env: dict[str, str], name: str):
        self.machine, self.name = machine, name
        self.log_path = machine.state / f"{name}.log"
        handle = open(self.log_path, "wb")
        self.process = subprocess.Popen(["bash", "-c", command], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                        env={**machine.env(), **env}, start_new_session=True)
        handle.close()
        self.env = env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} on {self.machine.name} still running after {timeout_s} s:\n"
                                 f"{self.log()[-3000:]}") from None

    def stop(self) -> None:
        stop_process(self.process, 30)
        self.machine.sh("docker compose -f compose.client.yaml down --remove-orphans", env=self.env, cwd=REPO,
                        check=False)


def write_site_data(directory: Path, site: str, x, y) -> Path:

    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / f"{site}.npz", x=x, y=y)
    directory.chmod(0o755)
    (directory / f"{site}.npz").chmod(0o644)
    return directory
