"""Scenario 2: the README's multi-machine Swarm recipe on three machines.

Machine a is the manager (and the server's node, and a client node); b and c join as workers. The
recipe's steps run as the README writes them: labels, each node's own data in /srv/pyfed/data and
its own keys in /srv/pyfed/keys (only public keys copied between machines), `docker stack deploy
-c swarm.yaml`. One client runs on each node, on that node's data. Mid-run, machine b fails (its cable pulled and every process on it killed): the
run goes on without it; b comes back (its engine started again) and its client rejoins. Then
`docker service scale` takes a client away and brings one back, as the README says it does.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.docker.support import REPO, wait_for_tensorboard_runs
from tests.multihost.testbed import Machine

pytestmark = pytest.mark.multihost

#: the README's "Many machines: Docker Swarm" block, step by step (tests/unit/test_readme.py checks it)
INIT = "docker swarm init --advertise-addr <m1-ip>"
LABELS = ("docker node update --label-add pyfed.server=true --label-add pyfed.client=true m1",
          "docker node update --label-add pyfed.client=true m2",
          "docker node update --label-add pyfed.client=true m3")
#: step 4: each node's own keys, made on it; only public keys travel between the machines
SERVER_KEYS = ('docker run --rm -u 0 -v /srv/pyfed/keys/server:/keys "${IMAGE_PREFIX}pyfed-server" python -m pyfed '
               "keys --out /keys --clients 0 --owner 10001:10001")
SITE_KEYS = ('docker run --rm -u 0 -v /srv/pyfed/keys/site:/keys "${IMAGE_PREFIX}pyfed-client" python -m pyfed keys '
             '--site "$(hostname -s)" --out /keys --owner 10001:10001')
M1_OWN_KEYS = ("mkdir -p /srv/pyfed/keys/authorized",
               "cp /srv/pyfed/keys/site/m1.key /srv/pyfed/keys/authorized/ && "
               "cp /srv/pyfed/keys/server/server.key /srv/pyfed/keys/site/")
#: what m1's operator does for m2 and m3 over ssh; the test bed's machines have no ssh, so the test
#: copies the same two public files between the machines' disks
OVER_SSH = ("ssh m2 cat /srv/pyfed/keys/site/m2.key > /srv/pyfed/keys/authorized/m2.key",
            "ssh m2 'cat > /srv/pyfed/keys/site/server.key' < /srv/pyfed/keys/server/server.key")
KEYS = (SERVER_KEYS, SITE_KEYS, *M1_OWN_KEYS, *OVER_SSH)
DEPLOY = "ROUNDS=10 docker stack deploy -c swarm.yaml pyfed"
SCALE = "docker service scale --detach pyfed_client=2"
ROUNDS = 14


def wait_for(read: callable, text: str, what: str, timeout_s: float = 300, start: int = 0) -> float:
    """Poll ``read()`` until ``text`` appears after offset ``start``; return when (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in read()[start:]:
            return time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in the {what} within {timeout_s} s:\n{read()[-3000:]}")


def node_data(machine: Machine, x: np.ndarray, y: np.ndarray, name: str) -> None:
    """A file in the machine's own /srv/pyfed/data (directory 755, files 644, as the README asks)."""
    directory = machine.disk / "data"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    np.savez(directory / name, x=x, y=y)
    (directory / name).chmod(0o644)


def test_the_swarm_recipe_runs_on_three_machines_survives_a_machine_failure_and_scales(testbed, images, tmp_path):
    a, b, c = testbed["a"], testbed["b"], testbed["c"]
    # m1's copy of the repository: what `docker stack deploy` reads (swarm.yaml, models/) and the keys
    m1_dir = tmp_path / "m1"
    m1_dir.mkdir()
    shutil.copy(REPO / "swarm.yaml", m1_dir / "swarm.yaml")
    shutil.copytree(REPO / "models", m1_dir / "models")
    env = {"IMAGE_PREFIX": images}

    try:
        run_recipe(testbed, m1_dir, env, tmp_path)
    finally:
        a.sh("docker stack rm pyfed", check=False)
        for machine in (c, b, a):
            machine.sh("docker swarm leave --force", check=False)


def run_recipe(testbed, m1_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    from pyfed.learning.data import load_dataset, split_dataset

    a, b, c = testbed["a"], testbed["b"], testbed["c"]
    machines = {"m1": a, "m2": b, "m3": c}
    # 1. the swarm, and the nodes' roles
    printed = a.sh(INIT.replace("<m1-ip>", a.address), cwd=m1_dir).stdout
    join = re.search(r"(docker swarm join --token \S+ \S+)", printed).group(1)
    for worker in (b, c):
        worker.sh(join)
    for step in LABELS:
        for label, machine in machines.items():
            step = re.sub(rf"{label}$", machine.hostname, step)
        a.sh(step)
    # 2. the images are in a's registry (the `images` fixture pushed them there)
    # 3. each node's own data: client.npz on every client node (sizes differ, to tell them apart)
    x, y = load_dataset("digits")
    [(x_train, y_train)], (x_test, y_test) = split_dataset(x, y, 1, seed=0)
    sizes = {"a": 300, "b": 400, "c": 500}
    start = 0
    for name, size in sizes.items():
        node_data(testbed[name], x_train[start:start + size], y_train[start:start + size], "client.npz")
        start += size
    node_data(a, x_test, y_test, "test.npz")
    # 4. the keys: the server's pair on m1, each node's own pair on it, only public keys copied
    a.sh(SERVER_KEYS, env=env, cwd=m1_dir)
    for machine in (a, b, c):  # the test bed's shells run on the host: the node's name is put in for hostname
        machine.sh(SITE_KEYS.replace('"$(hostname -s)"', machine.hostname), env=env)
    for step in M1_OWN_KEYS:  # files on m1's own disk (its /srv/pyfed, seen from the host)
        a.sh(step.replace("m1.key", f"{a.hostname}.key").replace("/srv/pyfed", str(a.disk)))
    for machine in (b, c):  # OVER_SSH, for m2 and m3
        shutil.copyfile(machine.disk / "keys" / "site" / f"{machine.hostname}.key",
                        a.disk / "keys" / "authorized" / f"{machine.hostname}.key")
        shutil.copyfile(a.disk / "keys" / "server" / "server.key", machine.disk / "keys" / "site" / "server.key")
    for machine in (a, b, c):  # each secret stayed on its machine, readable only by the images' user
        secret = machine.disk / "keys" / "site" / f"{machine.hostname}.key_secret"
        assert secret.stat().st_mode & 0o777 == 0o600 and secret.stat().st_uid == 10001
    assert not list((a.disk / "keys" / "authorized").glob("*.key_secret"))
    # 5. on m1: the stack
    deploy_env = {**env, "EPOCHS": "150"}
    a.sh(DEPLOY.replace("ROUNDS=10", f"ROUNDS={ROUNDS}"), env=deploy_env, cwd=m1_dir)
    def server_log() -> str:
        logs = a.sh("docker service logs --raw pyfed_server", check=False)
        return logs.stdout + logs.stderr

    wait_for(server_log, "round 2/", "server's log", 600)
    placement = a.sh("docker service ps --filter desired-state=running --format '{{.Node}}' pyfed_client").stdout.split()
    assert sorted(placement) == ["machine-a", "machine-b", "machine-c"], placement

    # machine b fails: cable out, every process killed
    failed_at = time.monotonic()
    b.power_off()
    dropped_at = wait_for(server_log, "client machine-b dropped", "server's log", 120)
    offset = len(server_log())
    why = re.search(r"client machine-b dropped: (.*?) \[", server_log()).group(1)
    print(f"\nmachine b powered off: the server dropped machine-b after {dropped_at - failed_at:.1f} s ({why})")
    wait_for(server_log, "round", "server's log", 120, start=offset)  # a round goes on without it
    time.sleep(10)
    back_at = time.monotonic()
    b.set_link(True)
    b.start_engine()
    rejoined_at = wait_for(server_log, "client machine-b rejoined", "server's log", 300, start=offset)
    print(f"machine b back: machine-b rejoined {rejoined_at - back_at:.1f} s after power came back")
    # b takes part again before the scale-down below: scaling down one of only two clients in the
    # round b's rejoin came too late for would leave that round one update, a fair outcome this test
    # does not check (CI saw it once)
    wait_for(server_log, "update from machine-b", "server's log", 300, start=offset)

    # scale down: Swarm stops one client, which leaves; scale up: one comes back
    offset = len(server_log())
    a.sh(SCALE)
    left = wait_for(server_log, "dropped: left (SIGTERM)", "server's log", 120, start=offset)
    leaver = re.search(r"client (\S+) dropped: left \(SIGTERM\)", server_log()[offset:]).group(1)
    a.sh(SCALE.replace("=2", "=3"))
    joined = wait_for(server_log, "joined", "server's log", 300, start=offset)
    print(f"scaled to 2: {leaver} left; back to 3: a client joined {joined - left:.1f} s later")

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and "run finished" not in server_log():
        time.sleep(3)
    a.docker("cp", f"{server_container(a)}:/logs/summary.json", str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    rounds = [(r["round"], r["clients"], {cid: reason for a_ in r["failed_attempts"] for cid, reason in a_["dropped"].items()})
              for r in summary["rounds"]]
    print("rounds (round, who took part, who was dropped and why):\n" + "\n".join(map(str, rounds)))
    assert summary["status"] == "finished", server_log()[-3000:]
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    assert {cid: c["num_examples"] for cid, c in summary["clients"].items()} == {
        f"machine-{name}": size for name, size in sizes.items()}
    without_b = [r["round"] for r in summary["rounds"] if "machine-b" not in r["clients"]]
    assert without_b and all(len(r["clients"]) >= 2 for r in summary["rounds"])
    # b took part again after the rounds it missed (the scale-down may then stop b's own task: Swarm
    # chooses which replica goes, so b need not be in the last rounds)
    assert any("machine-b" in r["clients"] for r in summary["rounds"] if r["round"] > min(without_b))
    tags = wait_for_tensorboard_runs(6006, {f"{run}/server", *(f"{run}/clients/machine-{m}" for m in "abc")},
                                     host=a.address)
    assert "test/accuracy" in tags[f"{run}/server"]


def server_container(a: Machine) -> str:
    return a.docker("ps", "-a", "--filter", "label=com.docker.swarm.service.name=pyfed_server",
                    "--format", "{{.ID}}").stdout.split()[0]
