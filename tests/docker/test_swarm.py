"""The Swarm stack end to end on a one-node swarm: `docker stack deploy` of swarm.yaml, node-local
keys (each replica its own pair) and data, scaling clients mid-run, and the restart policies.

Each step is run exactly as the README's "Try it on one machine" block writes it (a unit test checks
they are there), with its variables pointed at this test's directories and ports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.docker.support import (REPO, base_settings, client_was_lost, container_pid, docker, scalar_steps,
                                  steps_once, wait_for_tensorboard_runs, wait_for_text)

pytestmark = pytest.mark.docker

#: the README's one-machine recipe, step by step (tests/unit/test_readme.py checks the README shows them)
BUILD = "docker compose build"
INIT = "docker swarm init --advertise-addr 127.0.0.1"
LABEL = ("docker node update --label-add pyfed.server=true --label-add pyfed.client=true "
         "\"$(docker info --format '{{.Swarm.NodeID}}')\"")
#: each node makes its own keys (here one node: the server's pair, and one pair per client replica);
#: only the public halves are copied (into the server's authorized/, the server's into the sites' folder)
SERVER_KEYS = ('docker run --rm -u 0 -v "$NODE_KEYS_DIR/server:/keys" pyfed-server python -m pyfed keys --out /keys '
               "--clients 0 --owner 10001:10001")
SITE_KEYS = ('for k in 1 2 3 4; do docker run --rm -u 0 -v "$NODE_KEYS_DIR/site:/keys" pyfed-client python -m pyfed '
             'keys --site "site-$k" --out /keys --owner 10001:10001; done')
COPY_PUBLIC_KEYS = ('docker run --rm -u 0 -v "$NODE_KEYS_DIR:/keys" pyfed-server sh -c \'mkdir -p /keys/authorized && '
                    "cp /keys/site/*.key /keys/authorized/ && cp /keys/server/server.key /keys/site/'")
MAKE_KEYS = (SERVER_KEYS, SITE_KEYS, COPY_PUBLIC_KEYS)
MAKE_DATA = ('docker run --rm -u "$(id -u):$(id -g)" -v "$NODE_DATA_DIR:/data" '
             "pyfed-server python -m pyfed partition --clients 4 --out /data")
DEPLOY = 'docker stack deploy -c swarm.yaml -c swarm.one-node.yaml "$STACK"'
SCALE_UP = 'docker service scale --detach "${STACK}_client=4"'
SCALE_DOWN = 'docker service scale --detach "${STACK}_client=3"'
REMOVE = 'docker stack rm "$STACK"'
LEAVE = "docker swarm leave --force"
RECIPE = (BUILD, INIT, LABEL, *MAKE_KEYS, MAKE_DATA, DEPLOY, SCALE_UP, SCALE_DOWN, REMOVE, LEAVE)
RUN_TIMEOUT_S = 600


def sh(command: str, env: dict[str, str], timeout: float = 900) -> str:
    """Run one recipe step with bash in the repository, as a user would type it."""
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, **{k: str(v) for k, v in env.items()}})
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def swarm(docker_ready):
    """A one-node swarm on loopback, labelled for the server and the clients; yields the node's
    hostname. A swarm this fixture made is left at the end; an existing one (a developer's) is used,
    and only the labels added here are removed."""
    sh(BUILD, base_settings())
    made = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
    if made:
        sh(INIT, {})
    node = docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    had = json.loads(docker("node", "inspect", "--format", "{{json .Spec.Labels}}", node).stdout) or {}
    sh(LABEL, {})
    hostname = docker("node", "inspect", "--format", "{{.Description.Hostname}}", node).stdout.strip()
    yield hostname
    if made:
        sh(LEAVE, {})
    else:
        added = [arg for label in ("pyfed.server", "pyfed.client") if label not in had for arg in ("--label-rm", label)]
        if added:
            docker("node", "update", *added, node, check=False)


class Stack:
    """One deployed stack under a unique name, with its own keys and node-local data directories."""

    def __init__(self, tmp_path: Path, **settings):
        self.name = f"pyfedtest{uuid.uuid4().hex[:8]}"
        keys, data = tmp_path / "node-keys", tmp_path / "node-data"
        for directory in (keys, data):
            directory.mkdir()
            directory.chmod(0o755)   # the containers run as uid 10001
        self.env = {"STACK": self.name, "NODE_KEYS_DIR": str(keys), "NODE_DATA_DIR": str(data),
                    **{k: str(v) for k, v in base_settings(**settings).items()}}
        self.tensorboard_port = int(self.env["TENSORBOARD_PORT"])
        self.tmp_path = tmp_path

    def run(self, *steps: str) -> str:
        return "".join(sh(step, self.env) for step in steps)

    def containers(self, service: str) -> list[dict]:
        """Every container of a service (all its tasks, running or exited), oldest first."""
        out = docker("ps", "-a", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={self.name}_{service}",
                     "--format", "{{json .}}").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda row: row["CreatedAt"])

    def logs(self, service: str, newest: bool = False) -> str:
        """Every task's log (or the newest task's), one container after another, each in the order written."""
        rows = self.containers(service)[-1:] if newest else self.containers(service)
        outputs = [docker("logs", row["ID"], check=False) for row in rows]
        return "".join(output.stdout + output.stderr for output in outputs)

    def wait_for_log(self, service: str, text: str, timeout_s: float = 300, newest: bool = False) -> None:
        wait_for_text(lambda: self.logs(service, newest), text, f"{service} logs", timeout_s)

    def wait_until_finished(self, service: str, count: int, timeout_s: float = RUN_TIMEOUT_S) -> list[dict]:
        """Wait until `count` containers of a service exited 0 and none is running; return them all."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.containers(service)
            if not any(row["State"] in ("running", "created", "restarting") for row in rows) and \
                    sum(row["Status"].startswith("Exited (0)") for row in rows) >= count:
                return rows
            time.sleep(3)
        raise AssertionError(f"{service} did not finish: {[row['Status'] for row in self.containers(service)]}\n"
                             f"{self.logs(service)[-3000:]}")

    def summary(self) -> dict:
        server = self.containers("server")[-1]["ID"]
        target = self.tmp_path / "summary.json"
        docker("cp", f"{server}:/logs/summary.json", str(target))
        return json.loads(target.read_text())

    def remove(self) -> None:
        """`docker stack rm`, then its volumes once its containers are gone (Swarm leaves volumes)."""
        sh(REMOVE, self.env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and docker(
                "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={self.name}").stdout.strip():
            time.sleep(2)
        volumes = docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.name}").stdout.split()
        if volumes:
            docker("volume", "rm", *volumes, check=False)


@pytest.fixture
def stack_factory(tmp_path, swarm):
    stacks: list[Stack] = []

    def make(**settings) -> Stack:
        directory = tmp_path / f"stack{len(stacks)}"
        directory.mkdir()
        stack = Stack(directory, **settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.remove()


def rounds_with(summary: dict, client_id: str) -> list[int]:
    return [r["round"] for r in summary["rounds"] if client_id in r["clients"]]


def test_stack_deploy_trains_and_clients_scale_up_and_down_mid_run(stack_factory, swarm):
    """3 client replicas; mid-run scaled to 4 (the new one trains from the next round on), then back
    to 3 (Swarm stops one, which leaves, and the run goes on without it)."""
    stack = stack_factory(ROUNDS=6, EPOCHS=150, MIN_CLIENTS=3)
    stack.run(*MAKE_KEYS)
    stack.run(MAKE_DATA)
    stack.run(DEPLOY)
    node = swarm
    added = f"{node}-4"
    stack.wait_for_log("server", "round 2/6 started")
    scaled = time.monotonic()
    stack.run(SCALE_UP)
    stack.wait_for_log("server", f"client {added} joined")
    print(f"\nscaled 3 -> 4: the new client joined within {time.monotonic() - scaled:.0f} s")
    stack.wait_for_log("server", f"update from {added}")
    stack.run(SCALE_DOWN)
    stack.wait_until_finished("server", 1)
    stack.wait_until_finished("client", 3, timeout_s=120)

    summary = stack.summary()
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    assert summary["status"] == "finished" and summary["final"]["test_accuracy"] > 0.8
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4, 5, 6]
    first = [f"{node}-{slot}" for slot in (1, 2, 3)]
    assert summary["rounds"][0]["clients"] == first
    # the added client joined during a round and trained from the next one on
    server_log = stack.logs("server")
    assert "limit 4,295 MB (the container's memory limit)" in server_log  # the task's resources.limits
    joined_at = server_log.index(f"client {added} joined")
    next_round = int(re.compile(r"round (\d)/6 started").search(server_log, joined_at).group(1))
    assert 3 <= next_round <= 5 and rounds_with(summary, added)[0] == next_round, (next_round, summary["rounds"])
    assert re.search(rf"round {next_round}/6 started: 4 of 4 clients \(.*{added}", server_log)
    # scaled down: one client (Swarm picks which) left, and no later round waited for it
    leavers = re.findall(r"client (\S+) dropped: left \(SIGTERM\)", server_log) + re.findall(
        r"round (?:\d+): dropped client (\S+) before its update: left \(SIGTERM\)", server_log)
    assert len(set(leavers)) == 1, leavers
    leaver = leavers[0]
    last = max(rounds_with(summary, leaver))
    assert last < 6 and all(len(r["clients"]) == 3 for r in summary["rounds"][last:]), summary["rounds"]
    assert all(len(r["clients"]) >= 3 for r in summary["rounds"])
    print(f"{added} trained from round {next_round}; {leaver} left after round {last}; clients per round "
          f"{[len(r['clients']) for r in summary['rounds']]}; round durations "
          f"{[round(r['duration_s'], 1) for r in summary['rounds']]} s")
    # each client's own data: replica k read client-k.npz from the node's directory
    node_data = Path(stack.env["NODE_DATA_DIR"])
    assert {cid: c["num_examples"] for cid, c in summary["clients"].items()} == {
        f"{node}-{k}": len(np.load(node_data / f"client-{k}.npz")["y"]) for k in (1, 2, 3, 4)}
    # each replica on its own pair from the node's folder, only their public halves admitted
    assert "(CurveZMQ)" in server_log and "admitting clients whose public key is in /authorized (4 keys)" in server_log
    claims = {row["Names"]: re.findall(r"using key pair (site-\d)\.key_secret|(error: .*)", docker(
        "logs", row["ID"], check=False).stderr) for row in stack.containers("client")}
    pairs = [pair for found in claims.values() for pair, _ in found if pair]  # (Swarm removes a scaled-down task)
    assert len(pairs) == len(set(pairs)) == len(claims) >= 3, claims  # each replica a pair of its own
    keys = Path(stack.env["NODE_KEYS_DIR"])
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == [f"site-{k}.key" for k in (1, 2, 3, 4)]
    for secret in (keys / "site").glob("*.key_secret"):
        assert secret.stat().st_mode & 0o777 == 0o600 and secret.stat().st_uid == 10001

    port = stack.tensorboard_port
    tags = wait_for_tensorboard_runs(port, {f"{run}/server", *(f"{run}/clients/{cid}" for cid in (*first, added))})
    assert {"test/loss", "test/accuracy", "round/participants"} <= set(tags[f"{run}/server"])
    assert steps_once(port, f"{run}/server", "test/accuracy", 6)
    assert scalar_steps(port, f"{run}/clients/{added}", "round/loss") == rounds_with(summary, added)


def test_restart_policies_bring_back_a_crashed_client_and_a_crashed_server(stack_factory, swarm):
    """A client process and then the server process die (SIGKILL from the host, as in a crash).
    Swarm starts a new task for each: the client rejoins under its id, the server resumes from its
    checkpoint and the clients find it again by name. Every round ends with all three clients.
    The model is the user's own, models/cnn.py, which reaches the server (and its restarted task) as
    a Swarm config: no image build."""
    stack = stack_factory(ROUNDS=4, EPOCHS=150, MIN_CLIENTS=3, MIN_FIT_CLIENTS=3, MODEL="/models/cnn.py:build")
    stack.run(*MAKE_KEYS)
    stack.run(MAKE_DATA)
    stack.run(DEPLOY)
    node = swarm
    stack.wait_for_log("server", "round 2/4 started")
    crashing = next(row for row in stack.containers("client")  # a task that failed to start is there too
                    if row["Names"].startswith(f"{stack.name}_client.2.") and row["State"] == "running")
    os.kill(container_pid(crashing["ID"]), 9)
    killed = time.monotonic()
    stack.wait_for_log("server", f"client {node}-2 rejoined")
    print(f"\nclient SIGKILLed: a new task rejoined within {time.monotonic() - killed:.0f} s")
    stack.wait_for_log("server", "round 3/4 started")
    server = next(row for row in reversed(stack.containers("server")) if row["State"] == "running")
    os.kill(container_pid(server["ID"]), 9)
    killed = time.monotonic()
    stack.wait_for_log("server", "resuming from /checkpoints/round-")
    stack.wait_for_log("server", "round 3/4 started", newest=True)
    print(f"server SIGKILLed: a new task resumed, and round 3 restarted with all clients, within "
          f"{time.monotonic() - killed:.0f} s")
    servers = stack.wait_until_finished("server", 1)
    clients = stack.wait_until_finished("client", 3, timeout_s=120)

    assert [row["Status"].split(")")[0] for row in servers] == ["Exited (137", "Exited (0"]
    assert sorted(row["Status"].split(")")[0] for row in clients) == ["Exited (0"] * 3 + ["Exited (137"]
    ids = [f"{node}-{slot}" for slot in (1, 2, 3)]
    summary = stack.summary()
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    assert summary["model"]["latest"] == {"file": "model/latest.keras", "round": 4}
    server_logs = [output.stdout + output.stderr for output in (docker("logs", row["ID"]) for row in servers)]
    assert all("model has 6 arrays" in log for log in server_logs), server_logs[-1][-2000:]  # the CNN, both tasks
    assert all(r["clients"] == ids for r in summary["rounds"]), summary["rounds"]
    # the first server task dropped the crashed client (its id is refused while its old connection is
    # registered), then the new task rejoined under its id; what the crash cost depends on when it
    # landed: an attempt (it owed an update and was not back before the others finished), its FIT sent
    # again (back in time), or nothing (it fell during evaluation or between rounds)
    lost = re.search(rf"client {node}-2 dropped: ([^\n]*)", server_logs[0])
    assert lost and server_logs[0].find(f"client {node}-2 rejoined", lost.end()) > 0, server_logs[0][-3000:]
    print(f"the crashed client was dropped: {lost.group(1)}")
    retried = sum(client_was_lost(reason) for r in summary["rounds"] for a in r["failed_attempts"]
                  for reason in a["dropped"].values())
    print(f"the crash cost {retried} attempt(s); FIT sent again: {'is back; sent its FIT again' in server_logs[0]}")
    assert stack.logs("client").count("rejoining as") >= 3   # each client found the restarted server
    port = stack.tensorboard_port
    wait_for_tensorboard_runs(port, {f"{run}/server", f"{run}/clients/{node}-2"})
    assert steps_once(port, f"{run}/server", "test/accuracy", 4)
    assert steps_once(port, f"{run}/clients/{node}-2", "round/loss", 4)
