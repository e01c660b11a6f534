"""The server's record of a run: TensorBoard events and ``summary.json`` under one log directory.

The server is the only writer. Clients send their per-epoch training history with each update,
so a client on another machine shows up without a shared disk. Layout::

    LOGDIR/summary.json          rewritten atomically after every round
    LOGDIR/server/               global test loss/accuracy, federated (client-side) loss/accuracy,
                                 round duration, participants, bytes
    LOGDIR/clients/<client_id>/  that client's per-epoch training curves, continuing across rounds

Writing logs never stops a run: the server checkpoints a round before it logs it, and a log write
that fails (a full disk, no free descriptor) is logged as a warning; summary.json is rewritten
whole after the next round, and a resumed run rewrites every round's events from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyfed.persistence import events
from pyfed.persistence.events import EventFile
from pyfed.persistence.files import write_json_atomic
from pyfed.wire.protocol import is_client_id

log = logging.getLogger("pyfed.tracking")


@dataclass(frozen=True)
class RunDescription:
    """What TensorBoard shows of a run once, in the server's run: the model's layers (its Keras JSON,
    the Graphs dashboard) and summary table (Text), and, when set, the names of the global weight
    arrays, each histogrammed every round."""

    model_json: str | None = None
    model_summary: str | None = None
    weight_names: tuple[str, ...] | None = None


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
    refused: str | None = None  # why the round's new global model was refused (the previous one was kept)
    privacy: dict[str, float] | None = None  # differential privacy: epsilon spent so far, delta, clip norm ...
    update_compression_ratio: float | None = None  # compressed updates: their dense bytes / the bytes that came

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
                   federated_evaluation=federated, update_compression_ratio=_compression_ratio(results.values()))

    @classmethod
    def from_json(cls, entry: Any) -> "RoundRecord":
        """A record read back from a checkpoint, every field's type checked (ValueError names the field)."""
        if not isinstance(entry, dict):
            raise ValueError(f"a round record must be a mapping, got {type(entry).__name__}")
        unknown = set(entry) - set(_RECORD_FIELDS)
        if unknown:
            raise ValueError(f"round record has unknown field(s) {sorted(unknown)[:3]}")
        for name, check in _RECORD_FIELDS.items():
            if name in entry and not check(entry[name]):
                raise ValueError(f"round record field {name!r} has a bad value {str(entry[name])[:60]!r}")
        for name in ("round", "clients", "selected", "duration_s", "fit_s", "num_examples", "bytes_sent",
                     "bytes_received"):
            if name not in entry:
                raise ValueError(f"round record lacks {name!r}")
        return cls(**entry)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (a diverged model's NaN loss becomes null)."""
        entry = asdict(self)
        entry["test_loss"] = _finite_or_none(self.test_loss)
        entry["test_accuracy"] = _finite_or_none(self.test_accuracy)
        return entry

    def describe(self, rounds: int, *, tested: bool = True) -> str:
        """The round's log line; ``tested=False``: said before the test evaluation, which follows in
        :meth:`describe_test` (the server tests the model while the next round trains)."""
        federated = self.federated_evaluation
        retried = f" (attempt {len(self.failed_attempts) + 1})" if self.failed_attempts else ""
        test = (f", test loss {format_metric(self.test_loss)}, accuracy {format_metric(self.test_accuracy)}" if tested
                else "; testing the new model")
        return (f"round {self.round}/{rounds}{retried} finished in {self.duration_s:.2f}s: {len(self.clients)}/"
                f"{len(self.selected)} updates{test}"
                + (f"; federated loss {format_metric(federated['loss'])}, accuracy {format_metric(federated['accuracy'])} "
                   f"on {federated['num_examples']} held-out examples" if federated else "")
                + (f"; epsilon spent {self.privacy['epsilon']:.4g} (delta {self.privacy['delta']:g})"
                   if self.privacy else "")
                + (f"; updates compressed {self.update_compression_ratio:.1f}x" if self.update_compression_ratio else ""))

    def describe_test(self, rounds: int) -> str:
        """The line that follows ``describe(tested=False)`` once the round's model is tested."""
        return (f"round {self.round}/{rounds} tested: test loss {format_metric(self.test_loss)}, "
                f"accuracy {format_metric(self.test_accuracy)}")


#: what ``best.keras`` is chosen by; the accuracies are maximised, the losses minimised
BEST_METRICS = ("test_accuracy", "test_loss", "federated_accuracy", "federated_loss")


def metric_of(record: RoundRecord, metric: str) -> float | None:
    """A round's value of one of BEST_METRICS (None if it was not measured, or not finite)."""
    if metric not in BEST_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(BEST_METRICS)}")
    source, _, name = metric.partition("_")
    value = getattr(record, metric) if source == "test" else (record.federated_evaluation or {}).get(name)
    return _finite_or_none(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_round(records: list[RoundRecord], metric: str) -> RoundRecord | None:
    """The round whose global model scored best on ``metric`` (the earliest of equals); None if no
    round measured it."""
    sign = -1.0 if metric.endswith("_loss") else 1.0
    best, best_value = None, None
    for record in records:
        value = metric_of(record, metric)
        if value is not None and (best_value is None or sign * value > sign * best_value):
            best, best_value = record, value
    return best


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(is_client_id(v) for v in value)


def _by_client(check: Any) -> Any:
    return lambda value: isinstance(value, dict) and all(is_client_id(k) and check(v) for k, v in value.items())


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _history(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and isinstance(series, list) and all(v is None or _number(v) for v in series)
        for name, series in value.items())


def _compression_ratio(results: Any) -> float | None:
    """Dense over encoded bytes of the round's compressed updates (``dense_bytes`` and ``encoded_bytes``
    in their metrics), or None if none was compressed."""
    encoded = [r.metrics for r in results if "encoded_bytes" in r.metrics]
    wire = sum(m["encoded_bytes"] for m in encoded)
    return round(sum(m["dense_bytes"] for m in encoded) / wire, 3) if encoded and wire else None


_RECORD_FIELDS = {
    "round": _count, "clients": _ids, "selected": _ids, "duration_s": _number, "fit_s": _by_client(_number),
    "num_examples": _by_client(_count), "bytes_sent": _count, "bytes_received": _count,
    "test_loss": _optional(_number), "test_accuracy": _optional(_number), "eval_s": _number,
    "dropped": _by_client(lambda v: isinstance(v, str)), "train_history": _by_client(_history),
    "federated_evaluation": _optional(lambda v: isinstance(v, dict)),
    "failed_attempts": lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v),
    "refused": _optional(lambda v: isinstance(v, str)),
    "privacy": _optional(lambda v: isinstance(v, dict) and all(isinstance(k, str) and (_number(x) or x is None)
                                                               for k, x in v.items())),
    "update_compression_ratio": _optional(_number),
}


RUN_ENTRIES = ("summary.json", "server", "clients", "checkpoints", "model")

#: a run's name: its folder under LOGDIR, and TensorBoard's prefix for its curves
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: what else lives in LOGDIR, which a run's folder must not be
RESERVED_RUN_NAMES = frozenset({*RUN_ENTRIES, "archive", "exported", "privacy-ledger.jsonl"})


def check_run_name(name: str) -> str:
    """``name`` if it can name a run (ValueError saying why not)."""
    if not RUN_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name[:80]!r} cannot name a run: use 1-64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    if name.lower() in RESERVED_RUN_NAMES:
        raise ValueError(f"{name!r} cannot name a run: LOGDIR already holds a {name!r} of its own")
    return name


def default_run_name(now: float | None = None) -> str:
    """The name of a run nobody named: the local time it started, e.g. ``2026-12-07T19-30-05``."""
    return time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(now))


def previous_run_name(logdir: Path) -> str | None:
    """The name ``LOGDIR/summary.json`` gives its run, if it names one (None when it is missing,
    unreadable or written before runs had names)."""
    try:
        name = json.loads((logdir / "summary.json").read_text()).get("run_name")
        return check_run_name(name) if isinstance(name, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def archive_previous_run(logdir: Path, entries: tuple[str, ...] = RUN_ENTRIES, *,
                         also: tuple[str, ...] = ()) -> Path | None:
    """Move an earlier run's files under ``logdir/archive/<its name>/`` (or ``<its start time>``
    when it had none), so a new run starts clean and nothing is lost: TensorBoard then shows it as
    ``archive/<name>/server``. Its events folder (``LOGDIR/<its name>/``, named in its summary.json)
    is moved with it, flattened into the archive; so are the folders named in ``also`` (a
    leftover that holds the new run's name)."""
    name = previous_run_name(logdir) if "summary.json" in entries else None
    folders = [logdir / folder for folder in dict.fromkeys((*((name,) if name else ()), *also))
               if (logdir / folder).is_dir()]
    present = [logdir / entry for entry in entries if (logdir / entry).exists()]
    if not present and not folders:
        return None
    started = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(min(p.stat().st_mtime for p in present + folders)))
    base = logdir / "archive" / (name or (folders[0].name if folders and not present else started))
    target, suffix = base, 1
    while target.exists():
        suffix += 1
        target = base.with_name(f"{base.name}-{suffix}")
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)
    for folder in folders:
        for child in list(folder.iterdir()):
            destination = target / child.name
            if destination.exists():  # a run's folder holding what its top level also held: keep both
                destination = target / f"{folder.name}-{child.name}"
            child.rename(destination)
        folder.rmdir()
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
    checkpoint was. Its events go to ``LOGDIR/<run_name>/``.
    """

    def __init__(self, logdir: Path, *, config: dict[str, Any], run_name: str | None = None,
                 resume: list[RoundRecord] | None = None,
                 clients: dict[str, dict[str, Any]] | None = None,
                 model_files: Callable[[], dict[str, Any]] | None = None,
                 description: RunDescription = RunDescription()):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.run_name = check_run_name(run_name or default_run_name())
        self.events_dir = self.logdir / self.run_name
        self.summary_path = self.logdir / "summary.json"
        if resume is None:
            self.archived_to = archive_previous_run(self.logdir, also=(self.run_name,))
        else:
            self.archived_to = None
            for events_dir in (self.logdir, self.events_dir):  # the top level: a run from before runs had names
                for name in ("server", "clients"):
                    shutil.rmtree(events_dir / name, ignore_errors=True)
        self.rounds: list[RoundRecord] = []
        self.config = config
        self.model_files = model_files  # which round each model file holds, when they are written
        self.weight_names = description.weight_names  # set: a histogram of each global weight array per round
        self._server_events = EventFile(self.events_dir / "server")
        self._client_events: dict[str, EventFile] = {}
        self._client_epochs: dict[str, int] = {}
        self.final: dict[str, Any] | None = None
        self.clients: dict[str, dict[str, Any]] = dict(clients or {})  # client id -> {"shard", "num_examples"}
        self._describe_run(description)
        for record in resume or []:
            self._write_events(record)
            self.rounds.append(record)
        self.write_summary()  # names the run from its start

    def _describe_run(self, description: RunDescription) -> None:
        """Once per server process, in the server's run: the settings (HParams dashboard), the
        model's layers (Graphs, as Keras draws them) and its summary table (Text)."""
        summaries = [(events.hyperparameters(self.config), 0)]
        if description.model_json:
            summaries.append((events.keras_model_graph(description.model_json), 0))
        if description.model_summary:
            summaries.append((events.text("model/summary", description.model_summary), 0))
        try:
            self._server_events.write(summaries)
        except Exception as error:  # noqa: BLE001 - logs never stop a run
            log.warning("could not write the run's description to TensorBoard (%s: %s)",
                        error.__class__.__name__, str(error)[:200])

    def _client_event_file(self, client_id: str) -> EventFile:
        if client_id not in self._client_events:
            self._client_events[client_id] = EventFile(self.events_dir / "clients" / client_id)
        return self._client_events[client_id]

    def record_client(self, client_id: str, *, shard: str | None, num_examples: int) -> None:
        """Note a client that took part (its shard and the examples it trained on) for summary.json."""
        self.clients[client_id] = {"shard": shard, "num_examples": int(num_examples)}

    def record_round(self, record: RoundRecord, weights: list | None = None) -> None:
        """Log one finished round to TensorBoard (with ``weights``' histograms, if they are kept) and
        rewrite summary.json; a failed write is a warning."""
        self.rounds.append(record)
        try:
            self._write_events(record)
            if self.weight_names is not None and weights is not None:
                self._server_events.write((events.histogram(f"weights/{name}", array), record.round)
                                          for name, array in zip(self.weight_names, weights))
        except Exception as error:  # noqa: BLE001 - logs never stop a run
            log.warning("could not write round %d's TensorBoard events (%s: %s); the round is in the "
                        "checkpoint, and a resumed run writes its events again", record.round,
                        error.__class__.__name__, str(error)[:200])
        self.write_summary()

    def record_start(self, completed_rounds: int) -> None:
        """Mark in TensorBoard where this server process started (``run/start``, at the completed
        round it starts from: 0, or the round a resume continues after); a failed write is a warning."""
        try:
            self._server_events.write_scalars([("run/start", completed_rounds, completed_rounds)])
        except Exception as error:  # noqa: BLE001 - logs never stop a run
            log.warning("could not write to TensorBoard (%s: %s)", error.__class__.__name__, str(error)[:200])

    def _write_events(self, record: RoundRecord) -> None:
        step = record.round
        scalars = [("test/loss", record.test_loss, step), ("test/accuracy", record.test_accuracy, step)]
        federated = record.federated_evaluation or {}
        scalars += [(f"federated/{name}", _finite_or_none(federated.get(name)), step) for name in ("loss", "accuracy")]
        scalars += [("round/duration_s", record.duration_s, step), ("round/participants", len(record.clients), step),
                    ("round/bytes_sent", record.bytes_sent, step), ("round/bytes_received", record.bytes_received, step),
                    ("round/update_compression_ratio", record.update_compression_ratio, step)]
        scalars += [(f"privacy/{name}", value, step) for name, value in (record.privacy or {}).items()
                    if name != "delta"]
        self._server_events.write_scalars([s for s in scalars if s[1] is not None])
        for client_id in record.clients:
            self._record_client(client_id, record)

    def _record_client(self, client_id: str, record: RoundRecord) -> None:
        history = record.train_history.get(client_id, {})
        first_epoch = self._client_epochs.get(client_id, 0)
        num_epochs = max((len(series) for series in history.values()), default=0)
        scalars = []
        for name, series in history.items():
            scalars += [(f"epoch/{name}", value, first_epoch + offset + 1) for offset, value in enumerate(series)
                        if value is not None and math.isfinite(value)]
            last = series[-1] if series else None
            if last is not None and math.isfinite(last):
                scalars.append((f"round/{name}", last, record.round))
        scalars += [("round/fit_s", record.fit_s.get(client_id, 0.0), record.round),
                    ("round/num_examples", record.num_examples.get(client_id, 0), record.round)]
        self._client_event_file(client_id).write_scalars(scalars)
        self._client_epochs[client_id] = first_epoch + num_epochs

    def finish(self, test_loss: float | None, test_accuracy: float | None, ended_early: str | None = None) -> None:
        """Record the final global evaluation and mark the run finished (``ended_early``: why before its
        planned rounds, e.g. its privacy budget)."""
        self.final = {"test_loss": _finite_or_none(test_loss), "test_accuracy": _finite_or_none(test_accuracy),
                      **({"ended_early": ended_early} if ended_early else {})}
        self.write_summary()

    def model_summary(self) -> dict[str, Any]:
        """Which round's global model each model file holds, and the best one's score."""
        written = self.model_files()
        best = written.get("best")
        if best is not None:
            record = next((r for r in self.rounds if r.round == best["round"]), None)
            best = {**best, "value": metric_of(record, best["metric"]) if record and best["metric"] in BEST_METRICS
                    else None}
        return {**written, "best": best}

    def write_summary(self) -> bool:
        """Rewrite summary.json; False (and a warning) if it could not be written this time."""
        rounds = [record.to_json() for record in self.rounds]
        try:
            write_json_atomic(self.summary_path, {
                "run_name": self.run_name,
                "status": "finished" if self.final is not None else "running",
                "config": self.config,
                "clients": self.clients,
                "rounds": rounds,
                "final": self.final,
                **({"model": self.model_summary()} if self.model_files is not None else {}),
            })
        except OSError as error:
            log.warning("could not write %s (%s); it is rewritten whole after the next round",
                        self.summary_path, error)
            return False
        return True
