"""summary.json and the log tree: atomic writes, archived earlier runs."""

import json
import os
import re
import tempfile
from pathlib import Path

from pyfed.persistence.files import remove_interrupted_writes, staged_beside, write_atomic, write_json_atomic
from pyfed.persistence.tracking import RoundRecord, RunDescription, RunLog, archive_previous_run, check_run_name
import pytest

pytestmark = pytest.mark.unit


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"a": 1})
    write_json_atomic(tmp_path / "summary.json", {"a": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_what_a_write_killed_midway_leaves_is_found_and_removed_and_nothing_else(tmp_path):
    """A process SIGKILLed inside write_atomic (an out-of-memory kill while writing a checkpoint)
    leaves its temp file beside the intact old file; a killed save_keras leaves its staging folder.
    The sweep removes exactly those, never a user's files or what a symlink points at."""
    import multiprocessing
    import signal

    write_json_atomic(tmp_path / "summary.json", {"round": 1})

    def killed_midway() -> None:
        def write(handle) -> None:
            handle.write(b"half of a checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomic(tmp_path / "summary.json", write)

    child = multiprocessing.get_context("fork").Process(target=killed_midway)
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    (left,) = [name for name in os.listdir(tmp_path) if name != "summary.json"]
    staging = Path(tempfile.mkdtemp(**staged_beside(tmp_path / "latest.keras")))  # save_keras's, killed midway
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "model.weights.h5").write_bytes(b"weights")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "keep").write_text("not ours")
    kept = {".hidden", "notes.tmp", ".a.tmp", ".a.TOOLONG12.tmp", ".link.abcdefgh.tmp"}
    for name in kept - {".link.abcdefgh.tmp"}:
        (tmp_path / name).write_text("the user's")
    (tmp_path / ".link.abcdefgh.tmp").symlink_to(outside, target_is_directory=True)

    assert remove_interrupted_writes(tmp_path) == sorted([left, staging.name])
    assert set(os.listdir(tmp_path)) == {"summary.json", *kept}
    assert json.loads((tmp_path / "summary.json").read_text()) == {"round": 1}  # the old file, intact
    assert (outside / "keep").read_text() == "not ours"
    assert remove_interrupted_writes(tmp_path) == [] and remove_interrupted_writes(tmp_path / "absent") == []
    assert remove_interrupted_writes(None) == []


def test_a_previous_run_is_archived_not_overwritten(tmp_path):
    assert archive_previous_run(tmp_path) is None
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "events").write_text("old")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "unrelated.txt").write_text("kept")
    target = archive_previous_run(tmp_path)
    assert target.parent == tmp_path / "archive"
    assert (target / "server" / "events").read_text() == "old" and (target / "summary.json").exists()
    assert not (tmp_path / "server").exists() and (tmp_path / "unrelated.txt").exists()
    (tmp_path / "summary.json").write_text("{}")
    second = archive_previous_run(tmp_path)
    assert second != target and second.parent == tmp_path / "archive"


def test_run_log_writes_summary_per_round_and_final(tmp_path):
    run_log = RunLog(tmp_path, run_name="r", config={"rounds": 1})
    run_log.clients["a"] = {"shard": None, "num_examples": 3}
    run_log.record_round(RoundRecord(round=1, clients=["a"], selected=["a"], duration_s=0.5, fit_s={"a": 0.2},
                                     num_examples={"a": 3}, bytes_sent=10, bytes_received=20, test_loss=float("nan"),
                                     test_accuracy=0.5, train_history={"a": {"loss": [1.0, None, 0.5]}}))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "running" and summary["rounds"][0]["test_loss"] is None
    run_log.finish(0.4, 0.6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final"] == {"test_loss": 0.4, "test_accuracy": 0.6}
    assert summary["clients"] == {"a": {"shard": None, "num_examples": 3}}
    assert list((tmp_path / "r" / "clients" / "a").glob("events.out.tfevents.*"))


def test_run_log_marks_where_each_server_process_started(tmp_path):
    run_log = RunLog(tmp_path, run_name="r", config={})
    run_log.record_start(0)
    assert [step for step, _ in read_scalars(tmp_path / "r" / "server")["run/start"]] == [0]


def test_an_atomic_write_gives_the_file_the_permissions_of_a_plain_open(tmp_path):
    """Not the temp file's 0600: shards made by one user are read by the services' own user."""
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]
            for tag in plugin_tags(accumulator, "scalars")}


def plugin_tags(accumulator, plugin: str) -> dict:
    try:
        return accumulator.PluginTagToContent(plugin)
    except KeyError:  # no summary of that plugin
        return {}


def test_event_files_hold_what_tensorboard_reads_as_scalars_and_no_descriptor_stays_open(tmp_path):
    from pyfed.persistence.events import EventFile

    events = EventFile(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # created on the first write
    before = len(os.listdir("/proc/self/fd"))
    events.write_scalars([("round/loss", 1.5, 1), ("round/accuracy", 0.25, 1)])
    events.write_scalars([("round/loss", 0.75, 2)])
    assert len(os.listdir("/proc/self/fd")) == before
    assert read_scalars(tmp_path / "run") == {"round/loss": [(1, 1.5), (2, 0.75)], "round/accuracy": [(1, 0.25)]}
    assert len(list((tmp_path / "run").iterdir())) == 1


def test_after_a_failed_event_write_the_next_one_starts_a_new_file(tmp_path, monkeypatch):
    """The new file is read after the old one even when it is the process's 10th file of that
    second (TensorBoard reads a run's files in name order: an unpadded number put it first)."""
    import itertools

    from pyfed.persistence import events as events_module

    monkeypatch.setattr(events_module, "_file_numbers", itertools.count(9))
    monkeypatch.setattr(events_module.time, "time", lambda: 1_700_000_000.0)
    events = events_module.EventFile(tmp_path / "run")
    events.write_scalars([("a", 1.0, 1)])
    first = events.path

    fdopen = os.fdopen

    def full_disk(descriptor, mode):
        with fdopen(descriptor, mode) as handle:
            handle.write(b"\x00\x01")  # a record cut short
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(events_module.os, "fdopen", full_disk)
    with pytest.raises(OSError, match="No space left"):
        events.write_scalars([("a", 2.0, 2)])
    monkeypatch.setattr(events_module.os, "fdopen", fdopen)
    events.write_scalars([("a", 3.0, 3)])
    assert events.path != first
    assert read_scalars(tmp_path / "run") == {"a": [(1, 1.0), (3, 3.0)]}


def test_an_event_file_replaced_by_a_symlink_is_not_written_through(tmp_path):
    """Someone with write access to the log directory swaps the server's event file for a link to
    another file: the next append refuses the link (the target is untouched) and a new file starts."""
    from pyfed.persistence.events import EventFile

    events = EventFile(tmp_path / "run")
    events.write_scalars([("a", 1.0, 1)])
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    events.path.unlink()
    events.path.symlink_to(target)
    with pytest.raises(OSError):
        events.write_scalars([("a", 2.0, 2)])
    events.write_scalars([("a", 3.0, 3)])
    assert target.read_bytes() == b"keep me"
    assert read_scalars(tmp_path / "run") == {"a": [(3, 3.0)]}


def test_a_checkpoint_replaced_by_a_link_or_a_pipe_is_set_aside_never_followed_or_waited_on(tmp_path):
    import logging

    from pyfed.persistence.store import RunStore, save_checkpoint

    directory = tmp_path / "checkpoints"
    for server_round in (1, 2, 3):
        save_checkpoint(directory, server_round, {"round": server_round, "fingerprint": {}}, keep=5)
    (directory / "round-000003.npz").unlink()
    (directory / "round-000003.npz").symlink_to("/dev/zero")
    (directory / "round-000002.npz").unlink()
    os.mkfifo(directory / "round-000002.npz")
    store = RunStore(directory, {})
    resumed = store.resume(lambda path, state: state["round"])
    assert resumed == (1, directory / "round-000001.npz")
    assert store.set_aside == [2, 3]
    assert sorted(p.name for p in directory.glob("*.corrupt")) == ["round-000002.npz.corrupt",
                                                                  "round-000003.npz.corrupt"]


def test_run_log_writes_every_client_curve_and_the_servers_round_scalars(tmp_path):
    run_log = RunLog(tmp_path, run_name="r", config={})
    for round_number in (1, 2):
        run_log.record_round(RoundRecord(
            round=round_number, clients=["a", "b"], selected=["a", "b"], duration_s=0.5, fit_s={"a": 0.2, "b": 0.3},
            num_examples={"a": 3, "b": 4}, bytes_sent=10, bytes_received=20, test_loss=0.5, test_accuracy=0.75,
            federated_evaluation={"loss": 0.25, "accuracy": None},
            train_history={"a": {"loss": [1.0, None]}, "b": {"loss": [2.0, 1.0]}}))
    server = read_scalars(tmp_path / "r" / "server")
    assert server["test/accuracy"] == [(1, 0.75), (2, 0.75)] and server["federated/loss"] == [(1, 0.25), (2, 0.25)]
    assert "federated/accuracy" not in server and server["round/participants"] == [(1, 2.0), (2, 2.0)]
    b = read_scalars(tmp_path / "r" / "clients" / "b")
    assert b["epoch/loss"] == [(1, 2.0), (2, 1.0), (3, 2.0), (4, 1.0)]  # epochs continue across rounds
    assert b["round/loss"] == [(1, 1.0), (2, 1.0)] and b["round/num_examples"] == [(1, 4.0), (2, 4.0)]
    assert read_scalars(tmp_path / "r" / "clients" / "a")["epoch/loss"] == [(1, 1.0), (3, 1.0)]


def scored(round_number: int, test_accuracy=None, test_loss=None, federated=None) -> RoundRecord:
    return RoundRecord(round=round_number, clients=[], selected=[], duration_s=0.1, fit_s={}, num_examples={},
                       bytes_sent=0, bytes_received=0, test_loss=test_loss, test_accuracy=test_accuracy,
                       federated_evaluation=federated)


def test_the_best_round_maximises_accuracies_minimises_losses_and_skips_unmeasured_rounds():
    from pyfed.persistence.tracking import best_round, metric_of

    records = [scored(1, 0.5, 2.0, {"accuracy": 0.4, "loss": 1.0}), scored(2, None, float("nan"), None),
               scored(3, 0.7, 1.5, {"accuracy": 0.3, "loss": 0.2}), scored(4, 0.7, 1.0, {"accuracy": None})]
    assert best_round(records, "test_accuracy").round == 3  # the earliest of equals
    assert best_round(records, "test_loss").round == 4
    assert best_round(records, "federated_accuracy").round == 1
    assert best_round(records, "federated_loss").round == 3
    assert best_round([scored(1)], "test_accuracy") is None and best_round([], "test_loss") is None
    assert metric_of(records[1], "test_loss") is None  # not finite: never best
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        metric_of(records[0], "accuracy")


def test_summary_json_says_which_round_each_model_file_holds(tmp_path):
    written = {"latest": None, "best": None}
    run_log = RunLog(tmp_path, run_name="r", config={}, model_files=lambda: written)
    run_log.record_round(scored(1, 0.5))
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == {"latest": None, "best": None}
    written.update(latest={"file": "model/latest.keras", "round": 2},
                   best={"file": "model/best.keras", "round": 1, "metric": "test_accuracy"})
    run_log.record_round(scored(2, 0.25))
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == {
        "latest": {"file": "model/latest.keras", "round": 2},
        "best": {"file": "model/best.keras", "round": 1, "metric": "test_accuracy", "value": 0.5}}
    assert "model" not in json.loads((RunLog(tmp_path / "other", run_name="r", config={}).write_summary() and
                                      (tmp_path / "other" / "summary.json").read_text()))


def test_the_servers_run_shows_its_settings_model_graph_and_summary(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    RunLog(tmp_path, run_name="r", config={"rounds": 3, "strategy": "fedavg", "model": None},
           description=RunDescription(model_json='{"class_name": "Sequential"}', model_summary="```\nDense\n```"))
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "r" / "server"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert all(plugin_tags(accumulator, plugin) for plugin in ("hparams", "graph_keras_model", "text"))
    graph = accumulator.Tensors("keras")[0]
    assert tensor_util.make_ndarray(graph.tensor_proto).item() == b'{"class_name": "Sequential"}'
    text = accumulator.Tensors("model/summary")[0]
    assert tensor_util.make_ndarray(text.tensor_proto).item() == b"```\nDense\n```"
    hparams = plugin_tags(accumulator, "hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"fedavg" in hparams["_hparams_/session_start_info"] and b"rounds" in hparams["_hparams_/session_start_info"]


def test_with_weight_names_each_round_writes_a_histogram_of_every_global_array(tmp_path):
    import numpy as np
    from tensorboard.backend.event_processing import event_accumulator

    run_log = RunLog(tmp_path, run_name="r", config={},
                     description=RunDescription(weight_names=("dense/kernel", "dense/bias")))
    for round_number in (1, 2):
        run_log.record_round(scored(round_number, 0.5), weights=[np.full((3, 2), round_number, np.float32),
                                                                 np.zeros(2, np.float32)])
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "r" / "server"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert set(plugin_tags(accumulator, "histograms")) == {"weights/dense/kernel", "weights/dense/bias"}
    assert [e.step for e in accumulator.Tensors("weights/dense/kernel")] == [1, 2]
    RunLog(tmp_path / "off", run_name="r", config={}).record_round(scored(1, 0.5), weights=[np.zeros(2, np.float32)])
    off = event_accumulator.EventAccumulator(str(tmp_path / "off" / "r" / "server"), size_guidance={"tensors": 0})
    off.Reload()
    assert not plugin_tags(off, "histograms")


def test_a_rounds_compression_ratio_is_its_dense_over_received_update_bytes_and_is_logged_and_kept(tmp_path):
    from types import SimpleNamespace

    def result(metrics):
        return SimpleNamespace(num_examples=5, metrics={"fit_s": 0.1, "history": {}, **metrics})

    build = dict(duration_s=1.0, test=(None, None), eval_s=0.0, dropped={}, federated=None)
    compressed = {"a": result({"encoded_bytes": 100, "dense_bytes": 400}),
                  "b": result({"encoded_bytes": 300, "dense_bytes": 400})}
    record = RoundRecord.build(1, ["a", "b"], compressed, **build)
    assert record.update_compression_ratio == 2.0 and "updates compressed 2.0x" in record.describe(3)
    assert RoundRecord.build(1, ["a"], {"a": result({})}, **build).update_compression_ratio is None
    assert RoundRecord.from_json(record.to_json()).update_compression_ratio == 2.0
    with pytest.raises(ValueError, match="update_compression_ratio"):
        RoundRecord.from_json({**record.to_json(), "update_compression_ratio": "lots"})
    run_log = RunLog(tmp_path, run_name="r", config={})
    run_log.record_round(record)
    assert read_scalars(tmp_path / "r" / "server")["round/update_compression_ratio"] == [(1, 2.0)]


def test_a_round_tested_in_the_background_is_said_finished_first_then_tested():
    from pyfed.persistence.tracking import RoundRecord

    record = RoundRecord(round=2, clients=["a", "b"], selected=["a", "b", "c"], duration_s=3.25, fit_s={},
                         num_examples={}, bytes_sent=0, bytes_received=0, dropped={"c": "left"})
    assert record.describe(5, tested=False) == "round 2/5 finished in 3.25s: 2/3 updates; testing the new model"
    record.test_loss, record.test_accuracy = 0.5, 0.875
    assert record.describe_test(5) == "round 2/5 tested: test loss 0.5000, accuracy 0.8750"
    assert record.describe(5) == "round 2/5 finished in 3.25s: 2/3 updates, test loss 0.5000, accuracy 0.8750"


@pytest.mark.parametrize("name, reason", [
    ("", "cannot name a run"), ("../up", "cannot name a run"), ("a/b", "cannot name a run"),
    ("-flag", "cannot name a run"), ("x" * 65, "cannot name a run"), ("lr 0.1", "cannot name a run"),
    ("archive", "LOGDIR already holds"), ("Checkpoints", "LOGDIR already holds"), ("server", "LOGDIR already holds"),
])
def test_a_name_that_would_leave_logdir_or_clash_with_its_files_cannot_name_a_run(name, reason):
    with pytest.raises(ValueError, match=reason):
        check_run_name(name)


def test_a_runs_events_live_under_its_name_and_a_later_run_archives_them_under_it(tmp_path):
    first = RunLog(tmp_path, run_name="lr-0.01", config={"rounds": 1})
    first.record_round(scored(1, 0.5))
    assert json.loads((tmp_path / "summary.json").read_text())["run_name"] == "lr-0.01"
    assert read_scalars(tmp_path / "lr-0.01" / "server")["test/accuracy"] == [(1, 0.5)]
    (tmp_path / "checkpoints").mkdir()
    second = RunLog(tmp_path, run_name="lr-0.1", config={"rounds": 1})
    assert second.archived_to == tmp_path / "archive" / "lr-0.01"
    assert read_scalars(second.archived_to / "server")["test/accuracy"] == [(1, 0.5)]  # archive/lr-0.01/server
    assert {p.name for p in second.archived_to.iterdir()} == {"summary.json", "checkpoints", "server"}
    assert not (tmp_path / "lr-0.01").exists() and (tmp_path / "lr-0.1" / "server").is_dir()
    # a new run of the same name archives the old one beside the first archive, never into it
    third = RunLog(tmp_path, run_name="lr-0.01", config={"rounds": 1})
    assert third.archived_to == tmp_path / "archive" / "lr-0.1"
    assert RunLog(tmp_path, run_name="lr-0.01", config={}).archived_to == tmp_path / "archive" / "lr-0.01-2"


def test_an_unnamed_run_is_named_by_its_start_time_and_a_run_from_before_names_is_archived_by_time(tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "events").write_text("old")
    (tmp_path / "summary.json").write_text("{not json")
    run_log = RunLog(tmp_path, config={})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", run_log.run_name)
    assert (run_log.archived_to / "server" / "events").read_text() == "old"
    assert run_log.archived_to.name[:4].isdigit() and run_log.events_dir == tmp_path / run_log.run_name


def test_a_leftover_folder_holding_the_new_runs_name_is_archived_not_mixed_in(tmp_path):
    (tmp_path / "mine" / "server").mkdir(parents=True)
    (tmp_path / "mine" / "server" / "events").write_text("a crashed start's")
    run_log = RunLog(tmp_path, run_name="mine", config={})
    assert (run_log.archived_to / "server" / "events").read_text() == "a crashed start's"
    assert run_log.archived_to == tmp_path / "archive" / "mine"
    assert [p.name for p in (tmp_path / "mine" / "server").iterdir()][0].startswith("events.out.tfevents")


def test_tensorboards_graph_plugin_draws_the_servers_model_as_the_graphs_tab_does(tmp_path):
    """The Graphs tab asks the graph plugin for the conceptual (Keras) graph of a run; this asks the
    same plugin, over the same data provider TensorBoard serves, for the model PyFed describes."""
    import keras
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.compat.proto import graph_pb2
    from tensorboard.context import RequestContext
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.graph.graphs_plugin import GraphsPlugin
    from google.protobuf import text_format

    from pyfed.learning.model import describe_model

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.BatchNormalization(name="norm"), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(3, activation="softmax", name="out")])
    RunLog(tmp_path, run_name="graph-run", config={"rounds": 1}, description=describe_model(model))
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    plugin = GraphsPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(tmp_path), multiplexer=multiplexer))
    context = RequestContext()
    info = plugin.info_impl(context, experiment="")
    assert "keras" in info["graph-run/server"]["tags"]  # the run TensorBoard lists, by its name
    assert info["graph-run/server"]["tags"]["keras"]["conceptual_graph"]
    body, mime = plugin.graph_impl(context, "graph-run/server", "keras", is_conceptual=True, experiment="")
    graph = text_format.Parse(body, graph_pb2.GraphDef())
    names = {node.name.split("/")[-1] for node in graph.node}
    assert mime == "text/x-protobuf" and {"conv", "norm", "flat", "out"} <= names, names
