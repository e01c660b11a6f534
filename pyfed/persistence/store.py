"""The run store: a run's checkpoints, how a run resumes, and the writer that persists each round.

* :class:`RunStore` owns the checkpoint directory: ``round-NNNNNN.npz`` after every round (the
  newest ``keep`` kept), each stamped with the run's fingerprint (model structure, strategy,
  shards). :meth:`RunStore.resume` loads the newest checkpoint that loads; one that does not (corrupt,
  truncated, wrong field types) is renamed ``*.corrupt``, logged, and the next older one is tried,
  while a sound checkpoint of another run (:class:`CheckpointMismatch`) stops the start-up.
* :class:`Persister` writes each finished round in a thread of its own, checkpoint first, then the
  logs (summary.json and TensorBoard), so the next round's clients already train meanwhile; a
  checkpoint write that fails (no free descriptor, a full disk) is retried for a minute, and a log
  write that fails is a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pyfed.persistence.files import CheckpointError, CheckpointMismatch, load_state, save_state
from pyfed.persistence.tracking import RoundRecord, RunLog, archive_previous_run

log = logging.getLogger("pyfed.store")

CHECKPOINT_GLOB = "round-*.npz"
CHECKPOINT_RETRY_S = 60.0  # a checkpoint write that fails is retried this long (one try a second)
T = TypeVar("T")


def checkpoint_path(directory: Path, server_round: int) -> Path:
    return Path(directory) / f"round-{server_round:06d}.npz"


def list_checkpoints(directory: Path) -> list[Path]:
    """The directory's checkpoints, oldest first (temp files of an interrupted write are ignored)."""
    return sorted(p for p in Path(directory).glob(CHECKPOINT_GLOB) if p.name[6:12].isdigit())


def save_checkpoint(directory: Path, server_round: int, state: dict[str, Any], keep: int) -> Path:
    """Write the state after ``server_round`` atomically, then delete all but the newest ``keep``."""
    path = checkpoint_path(directory, server_round)
    save_state(path, state)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def check_fingerprint(path: Path, saved: Any, current: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with a different model or strategy, naming what differs."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: has no run fingerprint; it was not written by a PyFed server")
    for key, value in current.items():
        if saved.get(key) != value:
            raise CheckpointMismatch(
                f"{path}: was written by a run with a different {key} ({str(saved.get(key))[:80]} here, "
                f"{str(value)[:80]} now); resume with the original settings, or pass --fresh-start to "
                f"archive it and begin a new run")


def model_fingerprint(model_json: str, compile_config: dict[str, Any], specs: Sequence[tuple[str, tuple]]) -> str:
    """A short hash of the model's structure: its layer classes, array shapes and compile settings.

    Names are left out on purpose: Keras numbers them per process (``dense_3``), so the same
    architecture built again after a restart must still match its checkpoint.
    """
    def without_names(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_names(v) for k, v in value.items() if k != "name"}
        if isinstance(value, list):
            return [without_names(v) for v in value]
        return value

    classes: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            if "class_name" in value:
                classes.append(str(value["class_name"]))
            for child in value.values():
                collect(child)
        elif isinstance(value, list):
            for child in value:
                collect(child)

    collect(json.loads(model_json))
    document = [classes, [[dtype, list(shape)] for dtype, shape in specs], without_names(compile_config)]
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunStore:
    """One run's checkpoints in ``directory`` (None: the run keeps none)."""

    def __init__(self, directory: Path | None, fingerprint: dict[str, Any], *, keep: int = 3):
        self.directory = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.directory) if self.directory else []

    def resume(self, load: Callable[[Path, dict[str, Any]], T]) -> tuple[T, Path] | None:
        """The newest checkpoint of an unfinished run that loads, as ``load(path, state)`` makes it, or
        None (no checkpoint, none loadable, or the run finished). ``load`` raises CheckpointError for
        a checkpoint it cannot use; a :class:`CheckpointMismatch` propagates."""
        for path in reversed(self.checkpoints()):
            try:
                state = load_state(path)
                if state.get("finished") is True:
                    log.info("the run in %s finished all its rounds; starting a new run", self.directory)
                    return None
                check_fingerprint(path, state.get("fingerprint"), self.fingerprint)
                return load(path, state), path
            except CheckpointMismatch:
                raise
            except CheckpointError as error:
                aside = path.with_name(path.name + ".corrupt")
                path.rename(aside)
                log.warning("skipped a checkpoint that does not load (%s); kept it as %s", error, aside.name)
        if self.directory is not None and self.directory.exists() and any(self.directory.glob("*.corrupt")):
            log.warning("no checkpoint in %s could be loaded; starting a new run", self.directory)
        return None

    @property
    def set_aside(self) -> list[int]:
        """The rounds of the checkpoints found unusable and set aside (``*.corrupt``), now or before."""
        if self.directory is None or not self.directory.exists():
            return []
        return sorted(int(p.name[6:12]) for p in self.directory.glob(CHECKPOINT_GLOB + ".corrupt")
                      if p.name[6:12].isdigit())

    def archive(self, logdir: Path | None) -> Path | None:
        """Move the checkpoints (and ``*.corrupt`` files) of an earlier run aside, unless they live in
        ``logdir``'s ``checkpoints`` folder, which the run log archives with the logs."""
        if self.directory is None or (logdir is not None and self.directory.parent == Path(logdir)):
            return None
        leftovers = [*self.checkpoints(), *sorted(self.directory.glob("*.corrupt"))]
        if not leftovers:
            return None
        archived = archive_previous_run(self.directory, tuple(p.name for p in leftovers))
        log.info("moved the previous run's checkpoints to %s", archived)
        return archived

    def save(self, state: dict[str, Any]) -> Path | None:
        """Checkpoint ``state`` (its ``round``), retrying a failed write for CHECKPOINT_RETRY_S; after that
        the run goes on and the next checkpoint covers this round. The path, or None if not written."""
        if self.directory is None:
            return None
        state = {**state, "fingerprint": self.fingerprint}
        deadline = time.monotonic() + CHECKPOINT_RETRY_S
        tries = 0
        while True:
            try:
                path = save_checkpoint(self.directory, state["round"], state, keep=self.keep)
            except OSError as error:
                tries += 1
                if time.monotonic() >= deadline:
                    log.error("could not write the checkpoint after round %d (%s); the run goes on and the next "
                              "checkpoint will cover this round", state["round"], error)
                    return None
                if tries <= 20 or tries % 20 == 0:
                    log.warning("could not write the checkpoint after round %d (%s); retrying", state["round"], error)
                time.sleep(1.0)
                continue
            log.info("%s checkpoint written: %s", "final" if state.get("finished") else "round", path)
            return path


class Persister:
    """Persists each finished round in one background thread: its checkpoint, then its logs.

    ``submit`` waits for the previous round's job before it hands over the next, so the files are
    written in order and at most one round is ever unwritten. The thread owns every write, the
    TensorBoard ones included; the engine's thread only computes and talks to clients.

    It is one thread for the whole run, not one per round, and :meth:`call` lets the engine use it
    before the server listens: TensorFlow opens ``/dev/urandom`` the first time a thread runs an
    op, and a new thread doing so while connections hold every descriptor aborts the process.
    """

    def __init__(self, store: RunStore, run_log: RunLog | None = None):
        self.store, self.run_log = store, run_log
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="pyfed-persister", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as error:  # noqa: BLE001 - reported by wait(), in the engine's thread
                self._failure = error
            finally:
                self._idle.set()

    def _hand_over(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._closed:
            raise RuntimeError("the persister was closed")
        self._idle.clear()
        self._jobs.put(job)

    def call(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the persister's thread and wait for it; re-raise what it raised."""
        self._hand_over(job)
        self.wait()

    def submit(self, snapshot: dict[str, Any], record: RoundRecord, summary_clients: dict[str, Any],
               before: Callable[[], None] | None = None) -> None:
        """Write the round in the background; ``before`` (the round's evaluation) runs first, there,
        and may complete ``record``, which is then what the checkpoint holds as the round's last entry."""
        self._hand_over(lambda: self._write(snapshot, record, summary_clients, before))

    def _write(self, snapshot: dict[str, Any], record: RoundRecord, summary_clients: dict[str, Any],
               before: Callable[[], None] | None) -> None:
        if before is not None:
            before()
            snapshot["history"][-1] = record.to_json()
        self.store.save(snapshot)
        if self.run_log is not None:
            for client_id, entry in summary_clients.items():
                self.run_log.record_client(client_id, shard=entry["shard"], num_examples=entry["num_examples"])
            self.run_log.record_round(record, weights=snapshot["weights"])

    def wait(self) -> None:
        """Block until the job handed over last is done; re-raise what went wrong doing it."""
        self._idle.wait()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def close(self) -> None:
        """End the thread once its job is done (the run is over, or the server stops)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def finish(self, snapshot: dict[str, Any], final: tuple[float | None, float | None],
               ended_early: str | None = None) -> None:
        """The run is over: its final checkpoint, then summary.json marked finished (in this thread)."""
        self.wait()
        self.store.save(snapshot)
        if self.run_log is not None:
            self.run_log.finish(*final, ended_early=ended_early)
