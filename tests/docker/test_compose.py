"""The Docker Compose system end to end: images built with BASE_IMAGE, real containers, TensorBoard's HTTP API.

These tests need a Docker engine with the Compose v2 plugin. They fail (never skip) without one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.docker.support import (REPO, base_settings, client_was_lost, container_pid, docker, steps_once,
                                  wait_for_tensorboard_runs, wait_for_text)
from tests.site_data import write_csv, write_image_folder

pytestmark = pytest.mark.docker

ROUND_TIMEOUT_S = 600


class Project:
    """One Compose project under a unique name, always torn down with `down -v`."""

    def __init__(self, tmp_path: Path, files: tuple[str, ...] = ("compose.yaml",), **settings: str):
        self.name = f"pyfedtest{uuid.uuid4().hex[:8]}"
        self.files = [arg for f in files for arg in ("-f", str(REPO / f))]
        self.env = {k: str(v) for k, v in settings.items()}
        self.tmp_path = tmp_path

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return docker("compose", "-p", self.name, *self.files, *args, env=self.env, timeout=timeout, check=check)

    def containers(self, service: str) -> list[dict]:
        out = self.compose("ps", "-a", "--format", "json", service).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines()]

    def wait_exit(self, container: str, timeout_s: float = ROUND_TIMEOUT_S) -> int:
        result = docker("wait", container, timeout=timeout_s)
        return int(result.stdout.strip())

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def copy_out(self, container: str, path: str) -> Path:
        target = self.tmp_path / f"{self.name}-{Path(path).name}"
        docker("cp", f"{container}:{path}", str(target))
        return target

    def wait_finished(self) -> str:
        """Wait for the server and every client replica to exit 0; return the server's container name."""
        server = f"{self.name}-server-1"
        assert self.wait_exit(server) == 0, self.logs("server")
        for client in self.containers("client"):
            assert self.wait_exit(client["Name"], 120) == 0, self.logs("client")
        return server

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", timeout=300, check=False)


@pytest.fixture
def project_factory(tmp_path, docker_ready):
    projects: list[Project] = []

    def make(**kwargs) -> Project:
        project = Project(tmp_path, **kwargs)
        projects.append(project)
        return project

    yield make
    for project in reversed(projects):
        project.down()


def test_compose_up_scale_3_trains_and_tensorboard_shows_every_client(project_factory):
    settings = base_settings(ROUNDS=2, RUN_NAME="digits-3")
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")

    assert project.wait_exit(f"{project.name}-server-1") == 0, project.logs("server")
    clients = project.containers("client")
    assert len(clients) == 3
    for client in clients:
        assert project.wait_exit(client["Name"], 120) == 0, project.logs("client")
    data_log = project.logs("data")
    assert "wrote 3 client shards" in data_log

    summary = json.loads(project.copy_out(f"{project.name}-server-1", "/logs/summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    assert run == "digits-3"  # RUN_NAME
    ids = ["client-1", "client-2", "client-3"]
    assert {cid: c["shard"] for cid, c in summary["clients"].items()} == {cid: f"{cid}.npz" for cid in ids}
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients"] == ids for r in summary["rounds"])
    assert summary["status"] == "finished" and summary["final"]["test_accuracy"] > 0.8

    port = settings["TENSORBOARD_PORT"]
    tags = wait_for_tensorboard_runs(port, {f"{run}/server", *(f"{run}/clients/{cid}" for cid in ids)})
    assert {"test/loss", "test/accuracy", "round/duration_s", "round/participants"} <= set(tags[f"{run}/server"])
    assert steps_once(port, f"{run}/server", "test/accuracy", 2)
    for cid in ids:
        assert {"epoch/loss", "round/loss", "round/accuracy", "round/fit_s"} <= set(tags[f"{run}/clients/{cid}"])
        assert steps_once(port, f"{run}/clients/{cid}", "round/loss", 2)

    # the README's export command: the best model into a host folder, in every format, owned by its user
    exported = project.tmp_path / "exported"
    exported.mkdir()
    project.env["EXPORT_DIR"] = str(exported)
    project.compose("run", "--rm", "-u", f"{os.getuid()}:{os.getgid()}", "export", timeout=600)
    assert sorted(p.name for p in exported.iterdir()) == ["model-savedmodel", "model.keras", "model.tflite"]
    assert all(p.stat().st_uid == os.getuid() for p in exported.rglob("*"))
    check_exported_models(exported)
    # a folder the container's user cannot write into: one line saying what to do, no traceback
    locked = project.tmp_path / "locked"
    locked.mkdir(mode=0o755)
    project.env["EXPORT_DIR"] = str(locked)
    refused = project.compose("run", "--rm", "export", check=False, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "cannot write there (Permission denied)" in refused.stderr and "-u \"$(id -u):$(id -g)\"" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr and not list(locked.iterdir())
    # TensorBoard keeps serving after training ends
    assert project.containers("tensorboard")[0]["State"] == "running"
    # encrypted by default: the keys step made the pairs, the server admitted the replicas' keys, and each
    # replica took a pair of its own (so each is a party to secure aggregation)
    server_log = project.logs("server")
    assert "(CurveZMQ)" in server_log and "admitting clients whose public key is in /keys (3 keys)" in server_log
    taken = re.findall(r"using key pair (replica-\d+)\.key_secret", project.logs("client"))
    assert sorted(taken) == ["replica-1", "replica-2", "replica-3"], taken
    assert "created /keys/server.key" in project.logs("keys")
    assert "refused a connection" not in server_log  # the healthcheck reads /proc, it does not connect
    # the server's memory limit (mem_limit) is the container's, and the server planned within it
    assert "limit 4,295 MB (the container's memory limit); max-inflight-updates 4 (auto)" in server_log


def test_scaled_replicas_get_distinct_shards_and_an_extra_replica_is_turned_away(project_factory):
    # also: strategy, non-IID partition and federated evaluation are chosen by environment variables
    settings = base_settings(ROUNDS=1, NUM_CLIENTS=4, EPOCHS=1, STRATEGY="fedprox", PROXIMAL_MU="0.1",
                             PARTITION_SCHEME="dirichlet", PARTITION_ALPHA="0.3", CLIENT_EVAL_FRACTION="0.2",
                             INSECURE="1")
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=5")

    assert project.wait_exit(f"{project.name}-server-1") == 0, project.logs("server")
    statuses = [project.wait_exit(c["Name"], 120) for c in project.containers("client")]
    assert statuses == [0] * 5
    client_log = project.logs("client")
    assert client_log.count("not taking part: all 4 data shards are taken; this client is not needed") == 1
    summary = json.loads(project.copy_out(f"{project.name}-server-1", "/logs/summary.json").read_text())
    shards = [c["shard"] for c in summary["clients"].values()]
    assert sorted(shards) == [f"client-{k}.npz" for k in (1, 2, 3, 4)]
    assert summary["rounds"][0]["clients"] == [f"client-{k}" for k in (1, 2, 3, 4)]
    assert summary["config"]["strategy"] == "fedprox" and summary["config"]["proximal_mu"] == 0.1
    assert summary["rounds"][0]["federated_evaluation"]["num_examples"] > 0
    assert client_log.count("with proximal mu 0.1") == 4
    assert "dirichlet split" in project.logs("data")
    assert "traffic is NOT encrypted" in project.logs("server") and "(NOT encrypted)" in project.logs("server")


def test_a_client_on_another_network_joins_through_the_published_port(project_factory, tmp_path):
    from pyfed.learning.data import load_dataset, write_partitions

    settings = base_settings(ROUNDS=1, NUM_CLIENTS=2, MIN_CLIENTS=2, EPOCHS=1)
    server_side = project_factory(**settings)
    server_side.compose("up", "-d", "--build", "--scale", "client=1")

    # The remote site's own data, on "its" disk, mounted read-only into its container.
    local_data = tmp_path / "site-data"
    x, y = load_dataset("digits")
    write_partitions(x, y, local_data, 2, seed=0)
    local_data.chmod(0o755)
    for f in local_data.iterdir():
        f.chmod(0o644)
    # The README's recipe: a key pair for the remote site, made in (and so admitted by) the server's
    # keys volume, handed over with the server's public key.
    keys = tmp_path / "site-keys"
    keys.mkdir()
    server_side.compose("run", "--rm", "--no-deps", "-T", "keys", "python", "-m", "pyfed", "keys", "--out", "/keys",
                        "--clients", "2")
    for source, target in (("server.key", "server.key"), ("client-2.key_secret", "client.key_secret")):
        output = server_side.compose("run", "--rm", "--no-deps", "-T", "keys", "cat", f"/keys/{source}").stdout
        (keys / target).write_text(output)
    remote = project_factory(files=("compose.client.yaml",),
                             SERVER_ADDRESS=f"tcp://host.docker.internal:{settings['SERVER_PORT']}",
                             CLIENT_ID="remote-site", LOCAL_DATA_DIR=str(local_data), LOCAL_KEYS_DIR=str(keys),
                             DATA_SHARD="/data/client-2.npz",
                             **({"BASE_IMAGE": settings["BASE_IMAGE"]} if "BASE_IMAGE" in settings else {}))
    remote.compose("up", "-d", "--build")
    remote_container = f"{remote.name}-client-1"

    networks = json.loads(docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", remote_container).stdout)
    server_networks = json.loads(docker("inspect", "--format", "{{json .NetworkSettings.Networks}}",
                                        f"{server_side.name}-server-1").stdout)
    assert not set(networks) & set(server_networks), (networks.keys(), server_networks.keys())

    assert server_side.wait_exit(f"{server_side.name}-server-1") == 0, server_side.logs("server")
    assert remote.wait_exit(remote_container, 120) == 0, remote.logs("client")
    summary = json.loads(server_side.copy_out(f"{server_side.name}-server-1", "/logs/summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    assert summary["rounds"][0]["clients"] == ["client-1", "remote-site"]
    tags = wait_for_tensorboard_runs(settings["TENSORBOARD_PORT"],
                                     {f"{run}/server", f"{run}/clients/client-1", f"{run}/clients/remote-site"})
    assert "round/loss" in tags[f"{run}/clients/remote-site"]


def check_exported_models(folder: Path) -> None:
    """The three exported files load outside PyFed (in a child process: TensorFlow stays out of the
    test worker) and predict what the .keras model predicts."""
    script = f"""
import numpy as np, keras, tensorflow as tf
model = keras.saving.load_model("{folder}/model.keras")
served = tf.saved_model.load("{folder}/model-savedmodel")
lite = tf.lite.Interpreter(model_path="{folder}/model.tflite")
lite.allocate_tensors()
sample = np.random.default_rng(0).random((1, *model.input_shape[1:]), np.float32)
lite.set_tensor(lite.get_input_details()[0]["index"], sample)
lite.invoke()
expected = model.predict(sample, verbose=0)
assert np.allclose(served.serve(sample).numpy(), expected, atol=1e-5)
assert np.allclose(lite.get_tensor(lite.get_output_details()[0]["index"]), expected, atol=1e-5)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def wait_for_log(project: Project, service: str, text: str, timeout_s: float = 300) -> None:
    wait_for_text(lambda: project.logs(service), text, f"{service} logs", timeout_s)


def restarts(container: str) -> int:
    return int(docker("inspect", "--format", "{{.RestartCount}}", container).stdout.strip())


def test_killed_client_containers_are_dropped_and_rejoin(project_factory):
    """`docker kill` of a client mid-round: the server drops it at once, and the container started
    again takes its shard back. A client process that crashes (SIGKILL from the host) is restarted
    by the restart policy and rejoins by itself. With MIN_FIT_CLIENTS=3 each broken round is
    retried once the client is back, so every round ends with all three."""
    settings = base_settings(ROUNDS=3, EPOCHS=40, MIN_FIT_CLIENTS=3)
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")
    wait_for_log(project, "server", "round 2/3 started")
    victim = project.containers("client")[0]["Name"]
    docker("kill", victim)
    wait_for_log(project, "server", "dropped: connection lost")
    docker("start", victim)  # Docker does not restart a container it was told to kill; the operator does
    wait_for_log(project, "server", "rejoined")
    crashing = project.containers("client")[1]["Name"]
    os.kill(container_pid(crashing), 9)  # a crash: the restart policy brings it back
    assert project.wait_exit(f"{project.name}-server-1") == 0, project.logs("server")
    assert restarts(crashing) == 1
    for client in project.containers("client"):
        assert project.wait_exit(client["Name"], 120) == 0, project.logs("client")

    summary = json.loads(project.copy_out(f"{project.name}-server-1", "/logs/summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    ids = ["client-1", "client-2", "client-3"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(r["clients"] == ids for r in summary["rounds"])
    failed = [a for r in summary["rounds"] for a in r["failed_attempts"]]
    assert all(any(client_was_lost(reason) for reason in a["dropped"].values()) for a in failed), failed
    # (a kill costs its round an attempt only if it lands while that client owes an update and the
    # restarted client is not back before the others finish; otherwise it is sent its FIT again, or
    # simply takes part in the next round: all three end every round above either way)
    print(f"\nthe two kills cost {len(failed)} attempt(s); FIT sent again "
          f"{project.logs('server').count('is back; sent its FIT again')} time(s)")
    assert sorted(c["shard"] for c in summary["clients"].values()) == [f"{cid}.npz" for cid in ids]
    assert project.logs("server").count("rejoined") >= 2
    port = settings["TENSORBOARD_PORT"]
    wait_for_tensorboard_runs(port, {f"{run}/server"})
    assert steps_once(port, f"{run}/server", "test/accuracy", 3)


def test_killed_server_container_resumes_from_its_checkpoint(project_factory):
    """The server crashes (SIGKILL from the host) mid-run: the restart policy restarts it and it
    resumes from its checkpoint; later `docker kill` + `docker start`: it resumes again. The same
    client containers carry on, and every round is in summary.json and TensorBoard once."""
    settings = base_settings(ROUNDS=5, EPOCHS=40)
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")
    server = f"{project.name}-server-1"
    wait_for_log(project, "server", "round 2/5 started")
    # checkpoints are written in the background: kill once round 1's is on disk (a kill before it
    # starts the run afresh, which the registry test of clients back at a forgetful server covers)
    wait_for_log(project, "server", "round checkpoint written: /checkpoints/round-")
    os.kill(container_pid(server), 9)
    wait_for_log(project, "server", "resuming from /checkpoints/round-")
    assert restarts(server) == 1
    wait_for_log(project, "server", "round 4/5 started")
    docker("kill", server)
    docker("start", server)
    assert project.wait_exit(server) == 0, project.logs("server")
    server_log = project.logs("server")
    assert server_log.count("resuming from /checkpoints/round-") == 2
    clients = project.containers("client")
    for client in clients:
        assert project.wait_exit(client["Name"], 120) == 0, project.logs("client")
        assert restarts(client["Name"]) == 0  # the same client processes carried on
    assert project.logs("client").count("rejoining as client-") >= 6

    summary = json.loads(project.copy_out(server, "/logs/summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4, 5]
    assert all(r["clients"] == ["client-1", "client-2", "client-3"] for r in summary["rounds"])
    port = settings["TENSORBOARD_PORT"]
    wait_for_tensorboard_runs(port, {f"{run}/server", f"{run}/clients/client-1"})
    assert steps_once(port, f"{run}/server", "test/accuracy", 5)
    assert steps_once(port, f"{run}/clients/client-1", "round/loss", 5)


def test_the_gpu_override_merges_into_a_valid_configuration(docker_ready):
    """This machine has no GPU: what can be checked is that Compose accepts the merged file and that it
    builds the clients with CUDA TensorFlow and reserves one NVIDIA GPU for each."""
    done = docker("compose", "-f", str(REPO / "compose.yaml"), "-f", str(REPO / "compose.gpu.yaml"),
                  "config", "--format", "json", env={k: str(v) for k, v in base_settings().items()}, timeout=120)
    client = json.loads(done.stdout)["services"]["client"]
    assert client["build"]["args"]["TENSORFLOW"] == "tensorflow[and-cuda]==2.21.0"
    assert client["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    server = json.loads(done.stdout)["services"]["server"]
    assert "deploy" not in server or "reservations" not in server["deploy"].get("resources", {})


def test_your_model_from_models_trains_and_a_second_run_starts_from_the_firsts_best_model(project_factory):
    """MODEL=/models/cnn.py:build: the server runs the file from the read-only `models` mount, the
    clients train the CNN they were sent as JSON, TensorBoard shows its layers, and the trained model
    comes out as files; a second run starts from the first one's best.keras (INITIAL_WEIGHTS)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    settings = base_settings(ROUNDS=2, MODEL="/models/cnn.py:build")
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")
    server = project.wait_finished()
    assert "model has 6 arrays" in project.logs("server")  # the CNN's kernels and biases, not the default MLP

    first = json.loads(project.copy_out(server, "/logs/summary.json").read_text())
    best = first["model"]["best"]
    assert first["model"]["latest"] == {"file": "model/latest.keras", "round": 2}
    assert best["metric"] == "test_accuracy" and best["value"] == max(r["test_accuracy"] for r in first["rounds"])
    events = project.copy_out(server, f"/logs/{first['run_name']}/server")  # the run's events, under its name
    accumulator = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    layers = tensor_util.make_ndarray(accumulator.Tensors("model/summary")[0].tensor_proto).item().decode()
    assert "Conv2D" in layers and "Reshape" in layers
    assert b"Conv2D" in tensor_util.make_ndarray(accumulator.Tensors("keras")[0].tensor_proto).item()
    # HISTOGRAMS is on in Compose: every global weight array, by its variable path, after each round
    arrays = [f"digits_cnn/{layer}/{part}" for layer in ("conv2d", "conv2d_1", "dense") for part in ("kernel", "bias")]
    assert sorted(tag for tag in accumulator.Tags()["tensors"] if tag.startswith("weights/")) == sorted(
        f"weights/{name}" for name in arrays)
    for name in arrays:
        assert [event.step for event in accumulator.Tensors(f"weights/{name}")] == [1, 2], name

    project.env.update(INITIAL_WEIGHTS="/logs/model/best.keras", ROUNDS="1")
    project.compose("up", "-d", "--scale", "client=3")
    assert project.wait_exit(server) == 0, project.logs("server")
    second_log = project.logs("server").split("the initial global model's weights come from")[-1]
    assert second_log.startswith(" /logs/model/best.keras")
    assert "global model before round 1: test loss" in second_log
    assert f"accuracy {best['value']:.4f}" in second_log.split("global model before round 1:")[1].splitlines()[0]


def remote_site(project_factory, server_settings: dict, tmp_path: Path, client_id: str, data_dir: Path,
                data_shard: str, **settings: str) -> Project:
    """A site on "another machine" (compose.client.yaml) with its own data dir, started; INSECURE, as
    these tests are about data (keys for remote sites are tested above)."""
    keys = tmp_path / "no-keys"
    keys.mkdir(exist_ok=True)
    site = project_factory(files=("compose.client.yaml",), CLIENT_ID=client_id, LOCAL_DATA_DIR=str(data_dir),
                           LOCAL_KEYS_DIR=str(keys), DATA_SHARD=data_shard, INSECURE="1",
                           SERVER_ADDRESS=f"tcp://host.docker.internal:{server_settings['SERVER_PORT']}",
                           **{k: v for k, v in server_settings.items() if k == "BASE_IMAGE"}, **settings)
    site.compose("up", "-d")
    return site


def finish_with_sites(project: Project, sites: list[Project], clients: int) -> dict:
    """Wait for the server and every client (the Compose replicas and the remote sites) to exit 0;
    return summary.json."""
    server = project.wait_finished()
    for site in sites:
        assert site.wait_exit(f"{site.name}-client-1", 120) == 0, site.logs("client")
    summary = json.loads(project.copy_out(server, "/logs/summary.json").read_text())
    assert summary["status"] == "finished" and all(len(r["clients"]) == clients for r in summary["rounds"])
    return summary


def two_replicas_and_a_site(project_factory, tmp_path: Path, **settings: str) -> tuple[Project, dict]:
    """The data step splits DATASET from INPUT_DIR (tmp_path/input) into 2 shards for 2 replicas, and
    every round waits for a third client: a remote site with its own data. Started, a replica joined.
    Every directory under tmp_path is made readable to the containers' user (uid 10001)."""
    for path in (tmp_path, *tmp_path.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    settings = base_settings(ROUNDS=2, NUM_CLIENTS=2, MIN_CLIENTS=3, MIN_FIT_CLIENTS=3, INSECURE=1,
                             INPUT_DIR=str(tmp_path / "input"), **settings)
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=2")
    wait_for_log(project, "server", "joined", 300)
    return project, settings


def refused(site: Project, message: str) -> None:
    """A site whose data does not fit is told why in one line (then stopped: its restart policy
    would try again, in vain, with Docker's growing delay)."""
    wait_for_text(lambda: site.logs("client"), message, "remote site's logs", 180)
    site.down()


def test_csv_sites_in_compose_and_a_site_whose_csv_does_not_fit_is_told_why(project_factory, tmp_path):
    """DATASET=csv:... : the data step splits the user's CSV (INPUT_DIR, mounted at /input) into the
    replicas' shards and the held-out set; a remote site trains on its own CSV; a site whose CSV has
    too few features is refused in one line while the others wait and then train."""
    from pyfed.learning.data import load_dataset

    x, y = load_dataset("digits")
    write_csv(tmp_path / "input" / "digits.csv", x[:1500], y[:1500], label_column="digit")
    write_csv(tmp_path / "site" / "records.csv", x[1500:], y[1500:], label_column="digit")
    write_csv(tmp_path / "narrow" / "records.csv", x[1500:, :60], y[1500:], label_column="digit")
    project, settings = two_replicas_and_a_site(project_factory, tmp_path, DATASET="csv:/input/digits.csv",
                                                LABEL_COLUMN="digit")
    narrow = remote_site(project_factory, settings, tmp_path, "narrow-site", tmp_path / "narrow",
                         "csv:/data/records.csv", LABEL_COLUMN="digit")
    refused(narrow, "/data/records.csv: examples have shape [60] but the server's model takes [64]")
    site = remote_site(project_factory, settings, tmp_path, "csv-site", tmp_path / "site", "csv:/data/records.csv",
                       LABEL_COLUMN="digit")

    summary = finish_with_sites(project, [site], clients=3)
    assert summary["rounds"][0]["clients"] == ["client-1", "client-2", "csv-site"]
    assert summary["clients"]["csv-site"]["num_examples"] == len(y) - 1500
    assert summary["final"]["test_accuracy"] > 0.8
    assert "csv:/input/digits.csv" in project.logs("data")
    assert "every round also needs 1 site(s) that bring their own data" in project.logs("server")


def test_image_folder_sites_in_compose_and_sites_whose_images_do_not_fit_are_told_why(project_factory, tmp_path):
    """DATASET=images:... : the data step reads the user's image folder (one subfolder per class) into
    shards; a remote site trains on its own folder of larger RGB images, brought to the model's 8x8
    grayscale by IMAGE_SIZE and COLOR_MODE; sites with the wrong image size or more classes than
    the model predicts are each refused in one line."""
    from pyfed.learning.data import load_dataset

    x, y = load_dataset("digits")
    write_image_folder(tmp_path / "input" / "digits", x[:1500], y[:1500])
    write_image_folder(tmp_path / "site" / "scans", x[1500:], y[1500:], side=16, rgb=True)
    write_image_folder(tmp_path / "classes" / "scans", x[1500:1550], y[1500:1550] + 3)  # classes 3..12
    project, settings = two_replicas_and_a_site(project_factory, tmp_path, DATASET="images:/input/digits",
                                                COLOR_MODE="grayscale")
    unsized = remote_site(project_factory, settings, tmp_path, "unsized-site", tmp_path / "site", "images:/data/scans",
                          COLOR_MODE="grayscale")
    refused(unsized, "/data/scans: examples have shape [16, 16, 1] but the server's model takes [8, 8, 1]")
    classes = remote_site(project_factory, settings, tmp_path, "classes-site", tmp_path / "classes",
                          "images:/data/scans", COLOR_MODE="grayscale")
    refused(classes, "/data/scans: labels go up to 12 but the server's model predicts 10 classes")
    site = remote_site(project_factory, settings, tmp_path, "image-site", tmp_path / "site", "images:/data/scans",
                       COLOR_MODE="grayscale", IMAGE_SIZE="8x8")

    summary = finish_with_sites(project, [site], clients=3)
    assert summary["rounds"][0]["clients"] == ["client-1", "client-2", "image-site"]
    assert summary["clients"]["image-site"]["num_examples"] == len(y) - 1500
    assert summary["final"]["test_accuracy"] > 0.8
    assert "images:/input/digits" in project.logs("data")


def test_a_private_compose_run_stops_at_its_budget_and_tensorboard_shows_epsilon(project_factory):
    """DP_NOISE_MULTIPLIER with DP_TARGET_EPSILON: the noise is fixed and the server ends the run, cleanly,
    before the round that would spend more than the target; TensorBoard has privacy/epsilon per round.
    With DP_LOCAL_NOISE_MULTIPLIER the client containers noise their own updates and log their own
    local epsilon, and the server reports the worst client's."""
    from pyfed.federation.privacy import RoundEvent, epsilon, local_epsilon

    event = RoundEvent(3, 3, 1.0)
    target = (epsilon([(event, 2)], 1e-5) + epsilon([(event, 3)], 1e-5)) / 2  # allows 2 of the 5 rounds
    settings = base_settings(ROUNDS=5, EPOCHS=2, DP_NOISE_MULTIPLIER="1.0", DP_TARGET_EPSILON=f"{target:.6f}",
                             DP_LOCAL_NOISE_MULTIPLIER="0.5")
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")
    server = project.wait_finished()
    log = project.logs("server")
    assert "allows 2 of the 5 planned rounds" in log and "ending the run after 2 of 5 rounds" in log
    summary = json.loads(project.copy_out(server, "/logs/summary.json").read_text())
    run = summary["run_name"]  # TensorBoard lists the run's curves under its name
    assert summary["status"] == "finished" and "above the target" in summary["final"]["ended_early"]
    spent = [r["privacy"]["epsilon"] for r in summary["rounds"]]
    assert len(spent) == 2 and spent[-1] <= target
    assert [r["privacy"]["local_epsilon"] for r in summary["rounds"]] == pytest.approx(
        [local_epsilon(0.5, k, 1e-5) for k in (1, 2)], rel=1e-5)
    assert project.logs("client").count("2 noised updates sent (noise multiplier 0.5): this site's local epsilon") == 3
    port = settings["TENSORBOARD_PORT"]
    wait_for_tensorboard_runs(port, {f"{run}/server"})
    assert steps_once(port, f"{run}/server", "privacy/epsilon", 2)
    assert steps_once(port, f"{run}/server", "privacy/local_epsilon", 2)


def test_a_compose_run_with_secure_aggregation_learns_and_the_server_sees_no_single_update(project_factory):
    """SECURE_AGGREGATION=1: the three replicas mask their updates; every round's sum is unmasked by
    the server, no individual update reaches it, and the model learns as a plain run's does."""
    settings = base_settings(ROUNDS=2, EPOCHS=5, SECURE_AGGREGATION="1", SECAGG_CLIP="2")
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")
    server = project.wait_finished()
    log = project.logs("server")
    assert log.count("secure aggregation: the weighted sum of 3 updates") == 2
    assert "update from" not in log
    assert project.logs("client").count("secure aggregation: masked update sent") == 6
    summary = json.loads(project.copy_out(server, "/logs/summary.json").read_text())
    assert [len(r["clients"]) for r in summary["rounds"]] == [3, 3]
    assert summary["rounds"][-1]["test_accuracy"] > 0.6


def test_a_compose_run_with_compressed_updates_and_broadcasts_learns_and_reports_its_compression(project_factory):
    """UPDATE_COMPRESSION=int8 and BROADCAST_COMPRESSION=fp16 from the environment: the replicas get
    them in the plan (no client setting), the model learns, and summary.json says how much came."""
    settings = base_settings(ROUNDS=2, EPOCHS=5, UPDATE_COMPRESSION="int8", BROADCAST_COMPRESSION="fp16")
    project = project_factory(**settings)
    project.compose("up", "-d", "--build", "--scale", "client=3")
    server = project.wait_finished()
    assert project.logs("server").count("updates compressed 4.0x") == 2
    summary = json.loads(project.copy_out(server, "/logs/summary.json").read_text())
    assert [len(r["clients"]) for r in summary["rounds"]] == [3, 3]
    assert all(r["update_compression_ratio"] > 3.9 for r in summary["rounds"])
    assert summary["rounds"][-1]["test_accuracy"] > 0.6


def test_a_checkout_runs_its_own_code_though_another_took_its_image_tag(project_factory):
    """Two checkouts on one engine name their images alike; another's build (here: an image without
    PyFed at all, under this checkout's tag) must not be what `docker compose run` starts."""
    tag = f"other-checkout-{uuid.uuid4().hex[:6]}"
    base = os.environ.get("BASE_IMAGE", "python:3.11-slim")
    for image in ("pyfed-server", "pyfed-client"):
        docker("tag", base, f"{image}:{tag}")
    try:
        project = project_factory(**base_settings(PYFED_TAG=tag))
        done = project.compose("run", "--rm", "--no-deps", "keys", "python", "-c", "import pyfed; print('pyfed here')")
        assert done.stdout.strip().endswith("pyfed here"), done.stdout + done.stderr
        project.compose("up", "--no-start")  # what `up` starts is built first, the clients' image too
        for image in ("pyfed-server", "pyfed-client"):  # both rebuilt from this checkout under the tag
            assert docker("image", "inspect", "--format", "{{.Id}}", f"{image}:{tag}").stdout != docker(
                "image", "inspect", "--format", "{{.Id}}", base).stdout, image
    finally:
        docker("rmi", f"pyfed-server:{tag}", f"pyfed-client:{tag}", check=False)
