"""summary.json and the log tree: atomic writes, archived earlier runs."""

import json
import os

from pyfed.persistence.files import write_json_atomic
from pyfed.persistence.tracking import RoundRecord, RunLog, archive_previous_run
import pytest

pytestmark = pytest.mark.unit


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"a": 1})
    write_json_atomic(tmp_path / "summary.json", {"a": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["summary.json"]


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
    run_log = RunLog(tmp_path, config={"rounds": 1})
    run_log.clients["a"] = {"shard": None, "num_examples": 3}
    run_log.record_round(RoundRecord(round=1, clients=["a"], selected=["a"], duration_s=0.5, fit_s={"a": 0.2},
                                     num_examples={"a": 3}, bytes_sent=10, bytes_received=20, test_loss=float("nan"),
                                     test_accuracy=0.5, train_history={"a": {"loss": [1.0, None, 0.5]}}))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "running" and summary["rounds"][0]["test_loss"] is None
    run_log.finish(0.4, 0.6)
    run_log.close()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final"] == {"test_loss": 0.4, "test_accuracy": 0.6}
    assert summary["clients"] == {"a": {"shard": None, "num_examples": 3}}
    assert list((tmp_path / "clients" / "a").glob("events.out.tfevents.*"))


def test_run_log_marks_where_each_server_process_started(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    run_log = RunLog(tmp_path, config={})
    run_log.record_start(0)
    run_log.close()
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "server"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Tensors("run/start")] == [0]


def test_an_atomic_write_gives_the_file_the_permissions_of_a_plain_open(tmp_path):
    """Not the temp file's 0600: shards made by one user are read by the services' own user."""
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
