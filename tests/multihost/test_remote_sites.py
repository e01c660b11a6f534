"""Scenario 1: the README's remote-site recipe, verbatim, across three machines.

Machine a runs the Compose server side (`docker compose up` with one local replica); machines b and
c each run one site with `compose.client.yaml`, with its own data on its own disk and its own key
pair, made on its own machine by the README's commands: only its public key goes to a. All three engines pull the images from
a's registry (IMAGE_PREFIX). A site whose key the server never listed is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker.support import REPO, wait_for_tensorboard_runs
from tests.multihost.sites import Site, write_site_data

pytestmark = pytest.mark.multihost

#: the README's "Clients on other machines", step by step (tests/unit/test_readme.py checks the README shows them):
#: the site makes its own pair on its machine, the server's operator admits its public key and sends
#: back the server's public key
SITE_MAKES_KEYS = (
    "mkdir site-a-keys",
    "SERVER_ADDRESS=tcp://<server-ip>:5555 CLIENT_ID=site-a LOCAL_KEYS_DIR=./site-a-keys \\\n"
    "docker compose -f compose.client.yaml run --rm keys",
)
SERVER_ADMITS = (
    "docker compose run --rm --no-deps keys",
    "docker compose run --rm --no-deps -T keys sh -c 'cat > /keys/site-a.key' < site-a.key",
    "docker compose run --rm --no-deps -T keys cat /keys/server.key > server.key",
)
SITE_UP = ("SERVER_ADDRESS=tcp://<server-ip>:5555 CLIENT_ID=site-a \\\n"
           "LOCAL_DATA_DIR=./my-data DATA_SHARD=/data/site-a.npz LOCAL_KEYS_DIR=./site-a-keys \\\n"
           "docker compose -f compose.client.yaml up")
SERVER_UP = "NUM_CLIENTS=2 MIN_CLIENTS=3 docker compose up --scale client=2"
ROUNDS = 3


def for_site(step: str, site: str, server_ip: str, keys_dir: Path, exchange: Path) -> str:
    """A README step for ``site``: its key folder at ``keys_dir``; the files the operators send each
    other (``site-a.key``, ``server.key``) in ``exchange``, the folder both machines' steps run in."""
    return (step.replace("<server-ip>", server_ip).replace("./site-a-keys", str(keys_dir))
            .replace("site-a-keys", str(keys_dir)).replace("< site-a.key", f"< {exchange / (site + '.key')}")
            .replace("> server.key", f"> {exchange / 'server.key'}").replace("site-a", site))


def site_up(site: str, server_ip: str, data_dir: Path, keys_dir: Path) -> str:
    return (SITE_UP.replace("<server-ip>", server_ip).replace("site-a.npz", f"{site}.npz")
            .replace("CLIENT_ID=site-a", f"CLIENT_ID={site}").replace("./my-data", str(data_dir))
            .replace("./site-a-keys", str(keys_dir)))


def test_the_remote_site_recipe_runs_across_three_machines(testbed, images, tmp_path):
    import numpy as np

    from pyfed.learning.data import load_dataset

    a, b, c = testbed["a"], testbed["b"], testbed["c"]
    common = {"IMAGE_PREFIX": images, "ROUNDS": str(ROUNDS), "EPOCHS": "20"}  # the images from a's registry:
    server_env = {**common, "COMPOSE_PROJECT_NAME": "pyfed", "PULL_POLICY": "missing"}  # pulled, not built
    server_up = SERVER_UP.replace("NUM_CLIENTS=2", "NUM_CLIENTS=1").replace("client=2", "client=1") + " -d"
    started = time.monotonic()
    a.sh(server_up, env=server_env, cwd=REPO)
    print(f"\non a: `{server_up}` (pulling from the registry) took {time.monotonic() - started:.0f} s")

    # each site's own data, on its own machine's disk: a tenth of the digits each
    x, y = load_dataset("digits")
    order = np.random.default_rng(1).permutation(len(y))
    sites = {}
    for machine, site, part in ((b, "site-b", order[:400]), (c, "site-c", order[400:800])):
        keys, exchange = machine.state / f"{site}-keys", tmp_path / f"{site}-exchange"
        exchange.mkdir()
        for step in SITE_MAKES_KEYS:  # on the site's machine: its own pair
            machine.sh(for_site(step, site, a.address, keys, exchange), env={"IMAGE_PREFIX": images}, cwd=REPO)
        assert (keys / f"{site}.key_secret").stat().st_mode & 0o777 == 0o600
        assert (keys / f"{site}.key_secret").stat().st_uid == 10001  # the client container's user, no other
        shutil.copy(keys / f"{site}.key", exchange)  # "send site-a.key to the server's operator": the public half only
        for step in SERVER_ADMITS:  # on the server's machine
            a.sh(for_site(step, site, a.address, keys, exchange), env=server_env, cwd=REPO)
        shutil.copy(exchange / "server.key", keys)  # "send it back, into site-a-keys/server.key"
        assert sorted(p.name for p in exchange.iterdir()) == ["server.key", f"{site}.key"]  # no secret travelled
        data = write_site_data(machine.state / "my-data", site, x[part], y[part])
        sites[site] = Site(machine, site_up(site, a.address, data, keys), {"IMAGE_PREFIX": images}, site)
        made = keys
    # a site whose key pair was made elsewhere: never listed by the server
    rogue_keys = c.state / "rogue-keys"
    subprocess.run(["python", "-m", "pyfed", "keys", "--site", "rogue", "--out", str(rogue_keys)],
                   check=True, capture_output=True, timeout=120)
    shutil.copy(made / "server.key", rogue_keys / "server.key")
    os.chown(rogue_keys / "rogue.key_secret", 10001, 10001)  # readable by the container's user, as the keys step does
    rogue_data = write_site_data(c.state / "rogue-data", "rogue", x[order[800:900]], y[order[800:900]])
    rogue = Site(c, site_up("rogue", a.address, rogue_data, rogue_keys),
                 {"IMAGE_PREFIX": images, "COMPOSE_PROJECT_NAME": "rogue"}, "rogue")
    try:
        deadline = time.monotonic() + 300
        while "refused the connection" not in rogue.log() and time.monotonic() < deadline:
            time.sleep(2)
        rogue.stop()
        for site in sites.values():
            assert site.wait(900) == 0, site.log()[-3000:]
    finally:
        for site in (*sites.values(), rogue):
            site.stop()

    server_log = a.sh("docker compose logs --no-color server", env=server_env, cwd=REPO).stdout
    assert a.docker("inspect", "--format", "{{.State.ExitCode}}", "pyfed-server-1").stdout.strip() == "0", server_log[-3000:]
    a.docker("cp", "pyfed-server-1:/logs/summary.json", str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    print(f"rounds: {[(r['round'], r['clients']) for r in summary['rounds']]}")
    assert summary["status"] == "finished"
    assert [r["clients"] for r in summary["rounds"]] == [["client-1", "site-b", "site-c"]] * ROUNDS
    assert {cid: c["num_examples"] for cid, c in summary["clients"].items() if cid != "client-1"} == {
        "site-b": 400, "site-c": 400}
    # the sites reached a at its address on the subnet, from other machines
    for site in ("site-b", "site-c"):
        assert f"client {site} joined" in server_log
    assert f"the server at tcp://{a.address}:5555 refused the connection" in rogue.log()
    assert "refused a connection: public key" in server_log and "rogue" not in json.dumps(summary["clients"])
    tags = wait_for_tensorboard_runs(6006, {f"{run}/server", f"{run}/clients/site-b", f"{run}/clients/site-c"},
                                     host=a.address)
    assert "round/loss" in tags[f"{run}/clients/site-b"] and "round/loss" in tags[f"{run}/clients/site-c"]
    a.sh("docker compose down -v", env=server_env, cwd=REPO, check=False)
