"""Scenario 1: the README's remote-site recipe, verbatim, across three machines.

Machine a runs the Compose server side (`docker compose up` with one local replica); machines b and
c each run one site with `compose.client.yaml`, with its own data on its own disk and its own key
pair, made on a by the README's commands and copied over. All three engines pull the images from
a's registry (IMAGE_PREFIX). A site whose key the server never listed is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker.support import REPO, wait_for_tensorboard_runs
from tests.multihost.sites import Site, write_site_data

pytestmark = pytest.mark.multihost

#: the README's "Clients on other machines", step by step (tests/unit/test_readme.py checks the README shows them)
SITE_KEYS = (
    "mkdir site-a-keys",
    "docker compose run --rm --no-deps -T keys python -m pyfed keys --out /keys --clients 2",
    "docker compose run --rm --no-deps -T keys cat /keys/server.key > site-a-keys/server.key",
    "docker compose run --rm --no-deps -T keys cat /keys/client-2.key_secret > site-a-keys/client.key_secret",
)
SITE_UP = ("SERVER_ADDRESS=tcp://<server-ip>:5555 CLIENT_ID=site-a \\\n"
           "LOCAL_DATA_DIR=./my-data DATA_SHARD=/data/site-a.npz LOCAL_KEYS_DIR=./site-a-keys \\\n"
           "docker compose -f compose.client.yaml up")
SERVER_UP = "NUM_CLIENTS=2 MIN_CLIENTS=3 docker compose up --scale client=2"
ROUNDS = 3


def site_keys(site: str, key_index: int, keys_dir: Path) -> list[str]:
    """The README's key steps for ``site``, the ``key_index``-th pair, written to ``keys_dir``."""
    return [step.replace("site-a-keys", str(keys_dir)).replace("--clients 2", f"--clients {key_index}")
            .replace("client-2.key_secret", f"client-{key_index}.key_secret") for step in SITE_KEYS]


def site_up(site: str, server_ip: str, data_dir: Path, keys_dir: Path) -> str:
    return (SITE_UP.replace("<server-ip>", server_ip).replace("site-a.npz", f"{site}.npz")
            .replace("CLIENT_ID=site-a", f"CLIENT_ID={site}").replace("./my-data", str(data_dir))
            .replace("./site-a-keys", str(keys_dir)))


def test_the_remote_site_recipe_runs_across_three_machines(testbed, images, tmp_path):
    import numpy as np

    from pyfed.learning.data import load_dataset

    a, b, c = testbed["a"], testbed["b"], testbed["c"]
    common = {"IMAGE_PREFIX": images, "ROUNDS": str(ROUNDS), "EPOCHS": "20"}
    server_env = {**common, "COMPOSE_PROJECT_NAME": "pyfed"}
    server_up = SERVER_UP.replace("NUM_CLIENTS=2", "NUM_CLIENTS=1").replace("client=2", "client=1") + " -d"
    started = time.monotonic()
    a.sh(server_up, env=server_env, cwd=REPO)
    print(f"\non a: `{server_up}` (pulling from the registry) took {time.monotonic() - started:.0f} s")

    # each site's own data, on its own machine's disk: a tenth of the digits each
    x, y = load_dataset("digits")
    order = np.random.default_rng(1).permutation(len(y))
    sites = {}
    for machine, site, key_index, part in ((b, "site-b", 2, order[:400]), (c, "site-c", 3, order[400:800])):
        made = tmp_path / f"{site}-keys"
        for step in site_keys(site, key_index, made):
            a.sh(step, env=server_env, cwd=REPO)
        keys = machine.state / f"{site}-keys"   # "copy site-a-keys/ to the remote machine"
        shutil.copytree(made, keys)
        data = write_site_data(machine.state / "my-data", site, x[part], y[part])
        sites[site] = Site(machine, site_up(site, a.address, data, keys), {"IMAGE_PREFIX": images}, site)
    # a site whose key pair was made elsewhere: never listed by the server
    rogue_keys = c.state / "rogue-keys"
    subprocess.run(["python", "-m", "pyfed", "keys", "--out", str(tmp_path / "elsewhere"), "--clients", "1"],
                   check=True, capture_output=True, timeout=120)
    rogue_keys.mkdir()
    shutil.copy(tmp_path / "elsewhere" / "client-1.key_secret", rogue_keys / "client.key_secret")
    shutil.copy(made / "server.key", rogue_keys / "server.key")
    (rogue_keys / "client.key_secret").chmod(0o644)  # readable by the container's user, as `cat >` makes it
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
    tags = wait_for_tensorboard_runs(6006, {"server", "clients/site-b", "clients/site-c"}, host=a.address)
    assert "round/loss" in tags["clients/site-b"] and "round/loss" in tags["clients/site-c"]
    a.sh("docker compose down -v", env=server_env, cwd=REPO, check=False)
