"""The server's record of a run: TensorBoard events and ``summary.json`` under one log directory.

The server is the only writer. Clients send their per-epoch training history with each update,
so a client on another machine shows up without a shared disk. Layout::

    LOGDIR/summary.json          rewritten atomically after every round
    LOGDIR/server/               global test loss/accuracy, federated (client-side) loss/accuracy,
                                 round duration, participants, bytes
    LOGDIR/clients/<client_id>/  that client's per-epoch training curves, continuing across rounds
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import write_atomic


@dataclass
class RoundRecord:
    """What happened in one round, as it appears in summary.json."""

    round: int
    clients: list[str]
    selected: list[str]
    duration_s: float
    fit_s: dict[str, float]
    num_examples: dict[str, int]
    bytes_sent: int
    bytes_received: int
    test_loss: float | None = None
    test_accuracy: float | None = None
    eval_s: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)
    train_history: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    federated_evaluation: dict[str, Any] | None = None  # {loss, accuracy, num_examples, clients}
    failed_attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier tries with too few updates

    @classmethod
    def build(cls, server_round: int, selected: list[str], results: dict[str, Any], *, duration_s: float,
              test: tuple[float | None, float | None], eval_s: float, dropped: dict[str, str],
              federated: dict[str, Any] | None, bytes_sent: int = 0, bytes_received: int = 0) -> "RoundRecord":
        """A round's record from its FitResults (by client id), as the server and the simulation make it."""
        ordered = sorted(results.items())
        return cls(round=server_round, clients=[cid for cid, _ in ordered], selected=selected,
                   duration_s=round(duration_s, 4), fit_s={cid: r.metrics["fit_s"] for cid, r in ordered},
                   num_examples={cid: r.num_examples for cid, r in ordered}, bytes_sent=bytes_sent,
                   bytes_received=bytes_received, test_loss=test[0], test_accuracy=test[1], eval_s=round(eval_s, 4),
                   dropped=dropped, train_history={cid: r.metrics["history"] for cid, r in ordered},
                   federated_evaluation=federated)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (a diverged model's NaN loss becomes null)."""
        entry = asdict(self)
        entry["test_loss"] = _finite_or_none(self.test_loss)
        entry["test_accuracy"] = _finite_or_none(self.test_accuracy)
        return entry

    def describe(self, rounds: int) -> str:
        """The round's one log line."""
        federated = self.federated_evaluation
        retried = f" (attempt {len(self.failed_attempts) + 1})" if self.failed_attempts else ""
        return (f"round {self.round}/{rounds}{retried} finished in {self.duration_s:.2f}s: {len(self.clients)}/"
                f"{len(self.selected)} updates, test loss {format_metric(self.test_loss)}, accuracy {format_metric(self.test_accuracy)}"
                + (f"; federated loss {format_metric(federated['loss'])}, accuracy {format_metric(federated['accuracy'])} "
                   f"on {federated['num_examples']} held-out examples" if federated else ""))


def write_json_atomic(path: Path, document: Any) -> None:
    """Write ``document`` to ``path`` so that a reader sees the old or the new file, never half of one."""
    data = json.dumps(document, indent=2, allow_nan=False).encode()
    write_atomic(path, lambda handle: handle.write(data))


RUN_ENTRIES = ("summary.json", "server", "clients", "checkpoints")


def archive_previous_run(logdir: Path, entries: tuple[str, ...] = RUN_ENTRIES) -> Path | None:
    """Move an earlier run's files under ``logdir/archive/<its start time>/``, so a new run starts
    clean and nothing is lost (TensorBoard shows the old run as ``archive/<time>/...``)."""
    present = [logdir / name for name in entries if (logdir / name).exists()]
    if not present:
        return None
    started = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(min(p.stat().st_mtime for p in present)))
    target = logdir / "archive" / started
    suffix = 1
    while target.exists():
        suffix += 1
        target = logdir / "archive" / f"{started}-{suffix}"
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)
    return target


def format_metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class RunLog:
    """Writes TensorBoard scalars and summary.json for each finished round.

    A new run archives the previous one's files. A resumed run (``resume`` = the rounds restored
    from a checkpoint) rewrites the TensorBoard events from those rounds instead, so each round
    appears exactly once even if the crash came after its events were written but before its
    checkpoint was.
    """

    def __init__(self, logdir: Path, *, config: dict[str, Any], resume: list[RoundRecord] | None = None,
                 clients: dict[str, dict[str, Any]] | None = None):
        import shutil

        import tensorflow as tf

        self._tf = tf
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.logdir / "summary.json"
        if resume is None:
            self.archived_to = archive_previous_run(self.logdir)
        else:
            self.archived_to = None
            for name in ("server", "clients"):
                shutil.rmtree(self.logdir / name, ignore_errors=True)
        self.rounds: list[RoundRecord] = []
        self.config = config
        self._server_writer = tf.summary.create_file_writer(str(self.logdir / "server"))
        self._client_writers: dict[str, Any] = {}
        self._client_epochs: dict[str, int] = {}
        self.final: dict[str, Any] | None = None
        self.clients: dict[str, dict[str, Any]] = dict(clients or {})  # client id -> {"shard", "num_examples"}
        for record in resume or []:
            self._write_events(record)
            self.rounds.append(record)
        if resume:
            self.write_summary()

    def _client_writer(self, client_id: str):
        if client_id not in self._client_writers:
            self._client_writers[client_id] = self._tf.summary.create_file_writer(
                str(self.logdir / "clients" / client_id))
        return self._client_writers[client_id]

    def record_round(self, record: RoundRecord) -> None:
        """Log one finished round to TensorBoard and rewrite summary.json."""
        self._write_events(record)
        self.rounds.append(record)
        self.write_summary()

    def _write_events(self, record: RoundRecord) -> None:
        tf, step = self._tf, record.round
        with self._server_writer.as_default():
            if record.test_loss is not None:
                tf.summary.scalar("test/loss", record.test_loss, step=step)
            if record.test_accuracy is not None:
                tf.summary.scalar("test/accuracy", record.test_accuracy, step=step)
            federated = record.federated_evaluation or {}
            for name in ("loss", "accuracy"):
                if _finite_or_none(federated.get(name)) is not None:
                    tf.summary.scalar(f"federated/{name}", federated[name], step=step)
            tf.summary.scalar("round/duration_s", record.duration_s, step=step)
            tf.summary.scalar("round/participants", len(record.clients), step=step)
            tf.summary.scalar("round/bytes_sent", record.bytes_sent, step=step)
            tf.summary.scalar("round/bytes_received", record.bytes_received, step=step)
        self._server_writer.flush()
        for client_id in record.clients:
            self._record_client(client_id, record)

    def _record_client(self, client_id: str, record: RoundRecord) -> None:
        tf, history = self._tf, record.train_history.get(client_id, {})
        writer = self._client_writer(client_id)
        first_epoch = self._client_epochs.get(client_id, 0)
        num_epochs = max((len(series) for series in history.values()), default=0)
        with writer.as_default():
            for name, series in history.items():
                for offset, value in enumerate(series):
                    if value is not None and math.isfinite(value):
                        tf.summary.scalar(f"epoch/{name}", value, step=first_epoch + offset + 1)
                last = series[-1] if series else None
                if last is not None and math.isfinite(last):
                    tf.summary.scalar(f"round/{name}", last, step=record.round)
            tf.summary.scalar("round/fit_s", record.fit_s.get(client_id, 0.0), step=record.round)
            tf.summary.scalar("round/num_examples", record.num_examples.get(client_id, 0), step=record.round)
        writer.flush()
        self._client_epochs[client_id] = first_epoch + num_epochs

    def finish(self, test_loss: float | None, test_accuracy: float | None) -> None:
        """Record the final global evaluation and mark the run finished."""
        self.final = {"test_loss": _finite_or_none(test_loss), "test_accuracy": _finite_or_none(test_accuracy)}
        self.write_summary()

    def write_summary(self) -> None:
        rounds = [record.to_json() for record in self.rounds]
        write_json_atomic(self.summary_path, {
            "status": "finished" if self.final is not None else "running",
            "config": self.config,
            "clients": self.clients,
            "rounds": rounds,
            "final": self.final,
        })

    def close(self) -> None:
        for writer in [self._server_writer, *self._client_writers.values()]:
            writer.close()
