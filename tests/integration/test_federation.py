"""A server and three client processes on loopback, on digits: the core's end-to-end behaviour."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
import time

import numpy as np
import pytest
import zmq

from pyfed.wire import protocol
from tests.integration.support import free_port, run_dir, scalar_steps, start_server
from tests.site_data import write_csv, write_image_folder

pytestmark = pytest.mark.integration

ROUNDS = 3
CLIENTS = ["auto-1", "auto-2", "auto-3"]  # no --client-id: the server names them


def throw_garbage(address: str, port: int) -> list[str]:
    """Send a raw TCP blob and malformed ZeroMQ messages; return the error codes the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(os.urandom(4096))
    context = zmq.Context()
    codes = []
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(address)
        bad_update = protocol.encode(protocol.Message(
            protocol.MessageType.UPDATE, round=1, client_id="client-1", arrays=[np.zeros(3, np.float32)],
            body={"attempt": 1, "num_examples": 5, "fit_s": 0.1, "history": {}}))
        leave = protocol.encode(protocol.Message(protocol.MessageType.LEAVE, client_id="client-1"))
        for frames in ([b"\x00\xff" * 10], [b'{"v": 99, "type": "join"}'], [b'{"v": 1, "type": "rm -rf"}'],
                       bad_update, leave, [b"{}", b"x" * 100]):
            dealer.send_multipart(frames)
            if dealer.poll(10_000):
                reply = protocol.decode(dealer.recv_multipart())
                codes.append(reply.body["code"])
    finally:
        context.destroy(linger=0)
    return codes


def test_three_clients_train_digits_to_90_percent_and_log_everything(tmp_path, processes):
    shards, logdir = tmp_path / "shards", tmp_path / "logs"
    partition = processes.pyfed("partition", "--dataset", "digits", "--clients", "3", "--out", str(shards), name="partition")
    assert processes.wait(partition, 120) == 0
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    server = processes.pyfed("server", "--address", address, "--rounds", str(ROUNDS), "--min-clients", "3",
                             "--test-data", str(shards / "test.npz"), "--logdir", str(logdir), name="server")
    processes.wait_for_line(server, "listening on")

    codes = throw_garbage(address, port)
    assert codes == ["bad_message", "bad_message", "bad_message", "bad_message", "not_joined", "bad_message"]

    # A client whose data does not fit the model is told why and leaves; the server carries on.
    np.savez(tmp_path / "wrong.npz", x=np.zeros((10, 5), np.float32), y=np.zeros(10, np.int64))
    wrong = processes.pyfed("client", "--server", address, "--data", str(tmp_path / "wrong.npz"),
                            "--client-id", "bad-site", name="wrong-client")
    assert processes.wait(wrong, 120) == 1
    assert f"{tmp_path / 'wrong.npz'}: examples have shape [5] but the server's model takes [64]" in \
        wrong.log_path.read_text()

    clients = [processes.pyfed("client", "--server", address, "--data", str(shards / f"client-{i}.npz"),
                               name=f"client-{i}") for i in (1, 2, 3)]
    processes.wait_for_line(server, "round 1/3 started")
    codes_mid_run = throw_garbage(address, port)
    assert codes_mid_run[0] == "bad_message"

    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)

    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for record in summary["rounds"]:
        assert record["clients"] == CLIENTS
        assert set(record["fit_s"]) == set(CLIENTS) and all(v > 0 for v in record["fit_s"].values())
        assert sum(record["num_examples"].values()) == 1797 - round(0.2 * 1797)
        assert record["bytes_sent"] > 3 * 4 * 10_000 and record["bytes_received"] > 3 * 4 * 10_000
        assert record["duration_s"] > 0 and 0 <= record["test_accuracy"] <= 1
        assert set(record["train_history"]) == set(CLIENTS)
    assert summary["final"]["test_accuracy"] >= 0.90
    assert summary["rounds"][-1]["test_accuracy"] == summary["final"]["test_accuracy"]

    client_log = clients[0].log_path.read_text()  # local training's progress: the first epoch's line, each round
    assert all(re.search(rf"round {r}: epoch 1/\d+: loss [\d.]+, accuracy [\d.]+", client_log) for r in (1, 2, 3))

    server_log = server.log_path.read_text()
    assert "rejected message [bad_message]" in server_log and "unsupported protocol version '99'" in server_log
    assert "client bad-site dropped: left (" in server_log and "wrong.npz: examples have shape [5]" in server_log

    check_tensorboard_events(logdir)
    check_model_files(logdir, shards / "test.npz", summary)


def check_model_files(logdir, test_data, summary):
    """model/latest.keras and best.keras load in a fresh process, with Keras alone, and score on the
    test data exactly what summary.json reports for the rounds they hold. Loading warns of one thing
    only: the file has no optimizer slots (learning/export.py::save_keras says why)."""
    model = summary["model"]
    assert model["latest"] == {"file": "model/latest.keras", "round": ROUNDS}
    accuracies = {r["round"]: r["test_accuracy"] for r in summary["rounds"]}
    best_round = max(accuracies, key=lambda r: (accuracies[r], -r))
    assert model["best"] == {"file": "model/best.keras", "round": best_round, "metric": "test_accuracy",
                             "value": accuracies[best_round]}
    assert json.loads((logdir / "model" / "files.json").read_text()) == {
        "latest": model["latest"], "best": {k: v for k, v in model["best"].items() if k != "value"}}
    script = ("import sys, warnings, numpy as np, keras\n"
              "data = np.load(sys.argv[1])\n"
              "for path in sys.argv[2:]:\n"
              "    with warnings.catch_warnings(record=True) as caught:\n"
              "        warnings.simplefilter('always')\n"
              "        model = keras.saving.load_model(path)\n"
              "    others = [str(w.message) for w in caught\n"
              "              if not str(w.message).startswith('Skipping variable loading for optimizer')]\n"
              "    assert not others, others\n"
              "    result = model.evaluate(data['x'], data['y'], batch_size=1024, verbose=0, return_dict=True)\n"
              "    print(repr(result['accuracy']))\n")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script, str(test_data),
                           str(logdir / "model" / "latest.keras"), str(logdir / "model" / "best.keras")],
                          capture_output=True, text=True, timeout=300, check=True)
    latest_accuracy, best_accuracy = (float(line) for line in done.stdout.split())
    assert abs(latest_accuracy - accuracies[ROUNDS]) <= 1e-6
    assert abs(best_accuracy - accuracies[best_round]) <= 1e-6

    # pyfed export: the best model as a TensorFlow Lite file, which predicts as best.keras does
    lite = logdir.parent / "digits.tflite"
    exported = subprocess.run([sys.executable, "-m", "pyfed", "export", "--from", str(logdir), "--which", "best",
                               "--format", "tflite", "--out", str(lite)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"wrote {lite} (tflite) from {logdir}" in exported.stderr
    script = ("import sys, numpy as np, keras, tensorflow as tf\n"
              "x = np.load(sys.argv[1])['x'][:16].astype(np.float32)\n"
              "expected = keras.saving.load_model(sys.argv[2]).predict(x, verbose=0)\n"
              "lite = tf.lite.Interpreter(model_path=sys.argv[3])\n"
              "inp, out = lite.get_input_details()[0], lite.get_output_details()[0]\n"
              "lite.resize_tensor_input(inp['index'], x.shape)\n"
              "lite.allocate_tensors()\n"
              "lite.set_tensor(inp['index'], x)\n"
              "lite.invoke()\n"
              "print(float(np.abs(lite.get_tensor(out['index']) - expected).max()))\n")
    compared = subprocess.run([sys.executable, "-c", script, str(test_data), str(logdir / "model" / "best.keras"),
                               str(lite)], capture_output=True, text=True, timeout=300, check=True)
    assert float(compared.stdout.split()[-1]) < 1e-5


def check_tensorboard_events(logdir):
    server = scalar_steps(run_dir(logdir) / "server")
    for tag in ("test/loss", "test/accuracy", "round/duration_s", "round/participants",
                "round/bytes_sent", "round/bytes_received"):
        assert server[tag] == [1, 2, 3], tag
    for client_id in CLIENTS:
        client = scalar_steps(run_dir(logdir) / "clients" / client_id)
        assert client["round/loss"] == [1, 2, 3] and client["round/accuracy"] == [1, 2, 3]
        assert client["round/fit_s"] == [1, 2, 3]
        assert client["epoch/loss"] == list(range(1, 5 * ROUNDS + 1))  # 5 epochs a round, continuing


@pytest.mark.parametrize("args, message", [
    (["server", "--rounds", "zero"], "pyfed server: error: --rounds / ROUNDS: must be a positive integer, got 'zero'"),
    (["server"], "pyfed server: error: --model / MODEL or --test-data / TEST_DATA is needed"),
    (["server", "--test-data", "/nonexistent/test.npz"], "pyfed server: error: /nonexistent/test.npz: no such file"),
    (["client"], "pyfed client: error: --data / DATA_SHARD or --data-dir / DATA_DIR is required"),
    (["client", "--data", "/nonexistent.npz"], "pyfed client: error: /nonexistent.npz: no such file"),
    (["client", "--data", "x.npz", "--server", "localhost"], "pyfed client: error: --server / SERVER_ADDRESS: must look like"),
    (["partition", "--dataset", "npz:/nonexistent.npz"], "pyfed partition: error: /nonexistent.npz: no such file"),
    (["partition", "--clients", "5000"], "pyfed partition: error: digits: cannot give 5000 clients"),
    (["server", "--fraction-fit", "0"], "pyfed server: error: --fraction-fit / FRACTION_FIT: must be a number in (0, 1]"),
    (["export", "--out", "m.keras"], "pyfed export: error: --from / EXPORT_FROM and --out / EXPORT_OUT are required"),
    (["export", "--from", "/nonexistent.keras", "--out", "m.keras"], "pyfed export: error: /nonexistent.keras: no such file"),
    (["export", "--from", "/tmp", "--out", "m.keras"], "pyfed export: error: /tmp holds no latest.keras (nor model/latest.keras)"),
    (["export", "--from", "/nonexistent/round-000001.npz", "--out", "m.keras"],
     "pyfed export: error: /nonexistent/round-000001.npz: a checkpoint holds weights only; give --model / MODEL"),
    (["export", "--from", "/x.keras", "--out", "m.tflite", "--format", "onnx"],
     "pyfed export: error: --format / EXPORT_FORMAT: must be one of keras, savedmodel, tflite"),
    (["server", "--test-data", "x.npz", "--best-metric", "accuracy"],
     "pyfed server: error: --best-metric / BEST_METRIC: must be one of auto, test_accuracy"),
    (["server", "--strategy", "krum", "--min-clients", "5", "--dp-target-epsilon", "3"],
     "pyfed server: error: --strategy / STRATEGY with differential privacy: differential privacy needs a "
     "FedAvg-family strategy, whose sensitivity to one client is bounded by clipping; krum is not one"),
    (["server", "--min-clients", "10", "--dp-noise-multiplier", "5", "--dp-adaptive-quantile", "0.5"],
     "pyfed server: error: --dp-adaptive-quantile / DP_ADAPTIVE_QUANTILE: noise multiplier 5 leaves no room"),
    (["server", "--dp-target-delta", "1"], "pyfed server: error: --dp-target-delta / DP_TARGET_DELTA: must be"),
    (["simulate", "--dp-local-noise-multiplier", "2"],
     "pyfed simulate: error: --dp-local-noise-multiplier / DP_LOCAL_NOISE_MULTIPLIER is a layer on central "
     "differential privacy: give --dp-noise-multiplier or --dp-target-epsilon too"),
])
def test_cli_start_up_errors_exit_2_with_one_line(tmp_path, args, message):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "pyfed", *args], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "ROUNDS": "", "DATA_SHARD": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_environment_and_dotenv_configure_the_cli(tmp_path):
    import subprocess

    (tmp_path / ".env").write_text("ROUNDS=-3\n")
    result = subprocess.run([sys.executable, "-m", "pyfed", "server"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 2 and "(from the .env entry ROUNDS)" in result.stderr
    result = subprocess.run([sys.executable, "-m", "pyfed", "server"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "ROUNDS": "x"})
    assert result.returncode == 2 and "(from the environment variable ROUNDS)" in result.stderr


def test_server_assigns_each_shard_to_one_client_and_turns_away_extra_clients(tmp_path, processes):
    shards, logdir = tmp_path / "shards", tmp_path / "logs"
    partition = processes.pyfed("partition", "--clients", "2", "--out", str(shards), name="partition")
    assert processes.wait(partition, 120) == 0
    address = f"tcp://127.0.0.1:{free_port()}"
    server = processes.pyfed("server", "--address", address, "--rounds", "1", "--min-clients", "2", "--shards", "2",
                             "--epochs", "1", "--test-data", str(shards / "test.npz"), "--logdir", str(logdir),
                             name="server")
    clients = [processes.pyfed("client", "--server", address, name=f"replica-{i}", env={"DATA_DIR": str(shards)})
               for i in (1, 2, 3)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    statuses = [processes.wait(client, 120) for client in clients]
    assert statuses == [0, 0, 0]
    turned_away = [c for c in clients if "not taking part: all 2 data shards are taken" in c.log_path.read_text()]
    assert len(turned_away) == 1
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["clients"] == {
        "client-1": {"shard": "client-1.npz", "num_examples": 719},
        "client-2": {"shard": "client-2.npz", "num_examples": 719},
    }
    assert summary["rounds"][0]["clients"] == ["client-1", "client-2"]


def test_csv_sites_train_and_a_site_whose_csv_does_not_fit_is_told_why_while_the_others_carry_on(
        tmp_path, processes, shards):
    from pyfed.learning.data import load_shard

    for index in (1, 2):
        write_csv(tmp_path / f"site-{index}.csv", *load_shard(shards / f"client-{index}.npz"), label_column="diagnosis")
    x, y = load_shard(shards / "client-3.npz")
    write_csv(tmp_path / "narrow.csv", x[:, :60], y)  # 60 features; the model takes 64
    address, logdir = f"tcp://127.0.0.1:{free_port()}", tmp_path / "logs"
    server = start_server(processes, shards, logdir, address, "--rounds", "2", "--min-clients", "2",
                          "--min-fit-clients", "2", "--epochs", "10")
    # the sites whose data does not fit go first: each is told why and exits before the run starts
    narrow = processes.pyfed("client", "--server", address, "--data", f"csv:{tmp_path / 'narrow.csv'}",
                             name="narrow-site")
    assert processes.wait(narrow, 120) == 1
    assert (f"{tmp_path / 'narrow.csv'}: examples have shape [60] but the server's model takes [64]"
            in narrow.log_path.read_text())
    wrong_column = processes.pyfed("client", "--server", address, "--data", f"csv:{tmp_path / 'site-1.csv'}",
                                   name="wrong-column")
    assert processes.wait(wrong_column, 60) == 2
    assert "site-1.csv: has no column 'label' (--label-column / LABEL_COLUMN)" in wrong_column.log_path.read_text()
    clients = [processes.pyfed("client", "--server", address, "--data", f"csv:{tmp_path / f'site-{i}.csv'}",
                               "--label-column", "diagnosis", name=f"csv-site-{i}") for i in (1, 2)]
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in clients:
        assert processes.wait(client, 60) == 0, processes.tail(client)
    assert re.search(r"training on (CPU|GPU:\d+)\n", clients[0].log_path.read_text())  # each client says where
    assert "scales differ" not in clients[0].log_path.read_text()  # the digits' pixels are on one scale
    summary = json.loads((logdir / "summary.json").read_text())
    assert [len(r["clients"]) for r in summary["rounds"]] == [2, 2]
    assert summary["final"]["test_accuracy"] >= 0.85


def test_image_folder_sites_train_and_images_that_do_not_fit_are_refused_while_the_others_carry_on(
        tmp_path, processes):
    """The held-out set is partitioned from an image folder; one site trains on 8x8 grayscale images,
    another on 16x16 RGB images that --image-size and --color-mode bring to the model's input. Sites
    whose images are the wrong size, or whose classes the model cannot predict, are each told why."""
    from pyfed.learning.data import load_dataset

    x, y = load_dataset("digits")
    order = np.random.default_rng(0).permutation(len(y))
    held_out, site_1, site_2 = order[:360], order[360:1000], order[1000:]
    write_image_folder(tmp_path / "held-out", x[held_out], y[held_out])
    out = tmp_path / "shards"
    partition = processes.pyfed("partition", "--dataset", f"images:{tmp_path / 'held-out'}", "--color-mode",
                                "grayscale", "--clients", "1", "--test-fraction", "0.99", "--out", str(out),
                                name="partition")
    assert processes.wait(partition, 120) == 0, processes.tail(partition)
    write_image_folder(tmp_path / "site-1", x[site_1], y[site_1])
    write_image_folder(tmp_path / "site-2", x[site_2], y[site_2], side=16, rgb=True)
    write_image_folder(tmp_path / "too-many-classes", x[site_1[:50]], y[site_1[:50]] + 3)  # classes 3..12
    address, logdir = f"tcp://127.0.0.1:{free_port()}", tmp_path / "logs"
    server = start_server(processes, out, logdir, address, "--rounds", "2", "--min-clients", "2",
                          "--min-fit-clients", "2", "--epochs", "10")
    first = processes.pyfed("client", "--server", address, "--data", f"images:{tmp_path / 'site-1'}",
                            "--color-mode", "grayscale", "--client-id", "site-1", name="site-1")
    processes.wait_for_line(server, "client site-1 joined")
    # while site-1 waits for a second site: two sites whose images do not fit are each told why
    unsized = processes.pyfed("client", "--server", address, "--data", f"images:{tmp_path / 'site-2'}",
                              "--color-mode", "grayscale", name="unsized-site")
    assert processes.wait(unsized, 120) == 1
    assert (f"{tmp_path / 'site-2'}: examples have shape [16, 16, 1] but the server's model takes [8, 8, 1]"
            in unsized.log_path.read_text())
    labels = processes.pyfed("client", "--server", address, "--data", f"images:{tmp_path / 'too-many-classes'}",
                             "--color-mode", "grayscale", name="too-many-classes")
    assert processes.wait(labels, 120) == 1
    assert (f"{tmp_path / 'too-many-classes'}: labels go up to 12 but the server's model predicts 10 classes"
            in labels.log_path.read_text())
    second = processes.pyfed("client", "--server", address, "--data", f"images:{tmp_path / 'site-2'}",
                             "--image-size", "8x8", "--color-mode", "grayscale", "--client-id", "site-2",
                             name="site-2")
    assert processes.wait(server, 300) == 0, processes.tail(server)
    for client in (first, second):
        assert processes.wait(client, 60) == 0, processes.tail(client)
    summary = json.loads((logdir / "summary.json").read_text())
    assert [r["clients"] for r in summary["rounds"]] == [["site-1", "site-2"]] * 2
    assert summary["clients"]["site-2"]["num_examples"] == len(site_2)
    assert summary["final"]["test_accuracy"] >= 0.85


@pytest.mark.parametrize("args, message", [
    (["--memory-limit", "200m"], "pyfed server: error: the server would need {} MB at its peak, more than the 210 MB "
                                 "of --memory-limit / MEMORY_LIMIT: raise the limit"),
    (["--memory-limit", "200m", "--max-inflight-updates", "3"],
     "pyfed server: error: the server would need {} MB at its peak, more than the 210 MB of --memory-limit / "
     "MEMORY_LIMIT: lower --max-inflight-updates"),
    (["--memory-limit", "2g", "--strategy", "fedmedian", "--min-fit-clients", "100"],
     "pyfed server: error: the strategy holds every update of a round (22 MB each) and only {} fit in the 2,147 MB "
     "of --memory-limit / MEMORY_LIMIT"),
    (["--memory-limit", "lots"], "pyfed server: error: --memory-limit / MEMORY_LIMIT: must be a size such as 512m"),
    (["--max-inflight-updates", "0"], "pyfed server: error: --max-inflight-updates / MAX_INFLIGHT_UPDATES: must be"),
])
def test_a_server_that_cannot_fit_its_memory_limit_is_refused_at_start_up(tmp_path, args, message):
    """The seed's 5.4M-parameter model (21.6 MB) beside TensorFlow's runtime (hundreds of MB)."""
    import re
    import subprocess

    model = Path(__file__).resolve().parents[2] / "bench" / "seed_model.py"
    result = subprocess.run([sys.executable, "-m", "pyfed", "server", "--model", f"{model}:build", "--rounds", "1",
                             *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(re.escape(message).replace(re.escape("{}"), r"[\d,]+"), last), last
    assert "Traceback" not in result.stderr


def test_the_server_says_its_expected_peak_memory_at_start_up(tmp_path, processes):
    model = Path(__file__).resolve().parents[2] / "bench" / "seed_model.py"
    server = processes.pyfed("server", "--model", f"{model}:build", "--rounds", "1", "--memory-limit", "8g",
                             "--address", f"tcp://127.0.0.1:{free_port()}", "--logdir", str(tmp_path / "logs"), name="server")
    deadline = time.monotonic() + 120
    while "memory: expected peak" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    line = next(l for l in server.log_path.read_text().splitlines() if "memory: expected peak" in l)
    assert "4 model copies of 22 MB" in line and "max-inflight-updates 4 (auto)" in line
    assert "limit 8,590 MB (--memory-limit / MEMORY_LIMIT)" in line
