"""The privacy ledger's file: every differentially private release, appended and fsynced before the
model it produced is released, never rewritten, archived or rolled back.

A checkpoint is a snapshot and can be lost (a corrupt newest checkpoint is skipped for an older
one; all of them can be corrupt); a privacy budget must not be. So the releases live in a file of
their own, ``privacy-ledger.jsonl`` in the run's log directory (beside, not inside, what a new run
archives), one JSON object per line:

* ``{"release": ROUND, "run": RUN, "population": n, "sampled": m, "noise_multiplier": z,
  "delta": delta, "local": [client ids], "at": "<UTC time>"}``: a round's noised aggregate was
  computed (written before the engine may publish it, so a release the file does not hold never
  left the server); ``local`` names the clients whose locally noised updates were in it;
* ``{"finished": RUN, "at": ...}``: the run ended (all its rounds, or its budget).

Each line is written whole, then the file is fsynced. A last line without its newline is the trace
of a crash inside that write, before the release it describes could happen: it is cut off (and
said). Any other line that does not parse, or does not hold what it must, makes the whole file
unreadable: :class:`LedgerError` names the file and the line, and the server refuses to start on it
(the epsilon already spent cannot be known) unless told to set it aside.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyfed.wire.protocol import RUN_ID_PATTERN, is_client_id

LEDGER_NAME = "privacy-ledger.jsonl"
MAX_LINE_BYTES = 1 << 20  # a release names at most the clients of one round
MAX_POPULATION = 10**9


class LedgerError(ValueError):
    """The privacy ledger cannot be read or written, or it forbids what was asked; says why."""


@dataclass(frozen=True)
class Release:
    """One round's private release, as the ledger file records it."""

    run: str
    round: int
    population: int
    sampled: int
    noise_multiplier: float
    delta: float
    local: tuple[str, ...] = ()


def _release(entry: dict[str, Any]) -> Release:
    run, server_round = entry.get("run"), entry.get("release")
    population, sampled = entry.get("population"), entry.get("sampled")
    z, delta, local = entry.get("noise_multiplier"), entry.get("delta"), entry.get("local", [])
    if not (isinstance(run, str) and RUN_ID_PATTERN.fullmatch(run)):
        raise ValueError(f"run {str(run)[:40]!r} is not a run id")
    for name, value, low in (("release", server_round, 1), ("population", population, 1), ("sampled", sampled, 1)):
        if type(value) is not int or not low <= value <= MAX_POPULATION:
            raise ValueError(f"{name} {str(value)[:20]!r} is not a count")
    if sampled > population:
        raise ValueError(f"sampled {sampled} is more than the population {population}")
    if not (type(z) in (int, float) and math.isfinite(z) and z > 0):
        raise ValueError(f"noise_multiplier {str(z)[:20]!r} is not a positive number")
    if not (type(delta) in (int, float) and 0 < delta < 1):
        raise ValueError(f"delta {str(delta)[:20]!r} is not in (0, 1)")
    if not (isinstance(local, list) and all(is_client_id(cid) for cid in local)):
        raise ValueError("local is not a list of client ids")
    return Release(run, server_round, population, sampled, float(z), float(delta), tuple(local))


class LedgerFile:
    """The append-only file of releases (see the module docstring). ``releases`` and ``finished``
    hold what it recorded when it was opened and what was appended since."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.releases: list[Release] = []
        self.finished: set[str] = set()
        self.cut_off: str | None = None  # a torn last line that was removed on opening
        self._read()

    def _read(self) -> None:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise LedgerError(f"{self.path}: not a regular file")
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            raise LedgerError(f"{self.path}: cannot be read ({error})") from None
        lines = data.split(b"\n")
        torn = lines.pop()  # after the last newline: empty, or a line whose write was cut short
        for number, line in enumerate(lines, start=1):
            try:
                if len(line) > MAX_LINE_BYTES:
                    raise ValueError(f"{len(line)} bytes long")
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
                if "finished" in entry:
                    if not (isinstance(entry["finished"], str) and RUN_ID_PATTERN.fullmatch(entry["finished"])):
                        raise ValueError("finished does not name a run")
                    self.finished.add(entry["finished"])
                else:
                    self.releases.append(_release(entry))
            except ValueError as error:  # json.JSONDecodeError is one
                raise LedgerError(f"{self.path}, line {number}: not a ledger entry ({str(error)[:200]})") from None
        if torn:
            self.cut_off = torn[:80].decode("utf-8", "replace")
            with open(self.path, "r+b") as handle:  # the write a crash cut short: its release never happened
                handle.truncate(len(data) - len(torn))
                os.fsync(handle.fileno())

    def runs(self) -> list[str]:
        """The runs with releases here, in the order of their first release."""
        return list(dict.fromkeys(release.run for release in self.releases))

    def of_run(self, run: str) -> list[Release]:
        return [release for release in self.releases if release.run == run]

    def record(self, release: Release) -> None:
        """Append ``release`` and fsync it (LedgerError if that fails: the release must not happen)."""
        self._append({"release": release.round, "run": release.run, "population": release.population,
                      "sampled": release.sampled, "noise_multiplier": release.noise_multiplier,
                      "delta": release.delta, "local": list(release.local)})
        self.releases.append(release)

    def finish(self, run: str) -> None:
        self._append({"finished": run})
        self.finished.add(run)

    @staticmethod
    def set_aside_path(path: Path) -> Path:
        """Rename an unreadable ledger out of the way (``*.unreadable-<time>``): a new one starts empty."""
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        return aside

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                          separators=(",", ":")).encode() + b"\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            descriptor = os.open(self.path, flags, 0o644)
            size = os.fstat(descriptor).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(descriptor, line[written:])
                os.fsync(descriptor)
            except OSError:
                os.ftruncate(descriptor, size)  # no half line stays to make the file unreadable
                raise
            finally:
                os.close(descriptor)
            if created:  # the new file's name is durable too
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except OSError as error:
            raise LedgerError(f"{self.path}: cannot record a release ({error})") from None


def open_ledger(directory: Path | None) -> LedgerFile | None:
    """The ledger file in ``directory`` (None: nowhere to keep one, as in a simulation without logs)."""
    return LedgerFile(Path(directory) / LEDGER_NAME) if directory is not None else None
