"""Privacy accounting for client-level differential privacy, with Google's ``dp-accounting``.

What is protected: one client's whole contribution (all its data, in every round). Two federations
are neighbours when one client's data is replaced by anything else, the number of clients staying
the same (the "replace one" relation: how many clients are connected in a round is public).

What is accounted, per released round (see strategy/dp.py for the mechanism): ``m`` of the ``n``
connected clients are sampled uniformly without replacement (PyFed's ``--fraction-fit`` sampling);
each sampled client's update is clipped to L2 norm ``C``; Gaussian noise of standard deviation
``z * C`` is added to their sum. Replacing one client's data moves that sum by at most ``2C`` (two
points of a ball of radius ``C``), so the Gaussian mechanism's noise multiplier, the standard
deviation over the sensitivity, is ``z / 2``.

The accountant is dp-accounting's Rényi DP accountant (Mironov, "Rényi Differential Privacy", CSF
2017) with its bound for the Gaussian mechanism under sampling without replacement and the
replace-one relation (Wang, Balle and Kasiviswanathan, "Subsampled Rényi Differential Privacy and
Analytical Moments Accountant", AISTATS 2019, Theorem 27); epsilon at a given delta by its
conversion. PyFed computes no bound itself: it only says which events happened.

Local DP (each client noises its own clipped update before sending) is accounted separately and is
weaker: the server sees each update, so there is no amplification by sampling or by the other
clients' updates; each participation is a Gaussian mechanism with noise multiplier ``z_local / 2``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant

from pyfed.persistence.ledger import LEDGER_NAME, LedgerError, LedgerFile, Release

log = logging.getLogger("pyfed.privacy")

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


@dataclass(frozen=True)
class RoundEvent:
    """One released round: ``sampled`` of ``population`` clients, noise multiplier ``noise_multiplier``
    (noise standard deviation over the clip norm, as the flags give it)."""

    population: int
    sampled: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not 1 <= self.sampled <= self.population:
            raise ValueError(f"a round samples between 1 and {self.population} clients, not {self.sampled}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"the noise multiplier must be positive, got {self.noise_multiplier}")

    def dp_event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)  # replace-one sensitivity is 2C
        if self.sampled == self.population:
            return gaussian
        return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.sampled, gaussian)


def epsilon(events: Iterable[tuple[RoundEvent, int]], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``(event, times)`` pairs.

    Rényi DP composes by adding each event's RDP curve ``times`` times. dp-accounting takes about
    0.2 s to compute the curve of one sampled-without-replacement event, and a run releases the same
    kind of round again and again, so each kind's curve is computed once (by dp-accounting, read
    from its accountant) and the sum converted by its ``compute_epsilon``; a unit test checks the
    result equals composing with dp-accounting's accountant directly."""
    total = np.zeros(len(rdp_privacy_accountant.DEFAULT_RDP_ORDERS))
    for event, times in events:
        if times:
            total = total + times * _rdp_curve(event)
    return float(rdp_privacy_accountant.compute_epsilon(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, total, delta)[0])


@functools.lru_cache(maxsize=1024)
def _rdp_curve(event: RoundEvent) -> np.ndarray:
    """One release's RDP at dp-accounting's default orders, from a fresh accountant that composed it."""
    accountant = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    accountant.compose(event.dp_event())
    curve = np.array(accountant._rdp, dtype=np.float64)  # noqa: SLF001 - see epsilon()
    curve.setflags(write=False)
    return curve


def local_epsilon(noise_multiplier: float, participations: int, delta: float) -> float:
    """Epsilon at ``delta`` of one client's updates under local DP: ``participations`` Gaussian
    releases with sensitivity 2C (no amplification: the server sees each update)."""
    return local_epsilon_of({noise_multiplier: participations}, delta)


def local_epsilon_of(releases: dict[float, int], delta: float) -> float:
    """Epsilon at ``delta`` of one client's noised updates, ``releases[z]`` of them at noise multiplier
    ``z``: each is a round of one client out of one (a Gaussian mechanism, no sampling)."""
    if not any(releases.values()):
        return 0.0
    return epsilon([(RoundEvent(1, 1, z), times) for z, times in releases.items()], delta)


def noise_for_target(target_epsilon: float, delta: float, rounds: int, population: int, sampled: int) -> float:
    """The smallest noise multiplier with which ``rounds`` rounds of ``sampled`` of ``population``
    clients stay within ``target_epsilon`` at ``delta`` (dp-accounting's calibration, Brent's method)."""
    if not target_epsilon > 0:
        raise ValueError(f"the target epsilon must be positive, got {target_epsilon}")

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(RoundEvent(population, sampled, z).dp_event(), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(neighboring_relation=REPLACE_ONE), event, target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6))


class PrivacyLedger:
    """The rounds released so far, and the budget: epsilon spent at ``delta``, and whether one more
    round fits within ``target_epsilon`` (None: no limit).

    Once :meth:`open` gives it the run's ledger file (persistence/ledger.py), every release is
    appended there, fsynced, before it is counted (and so before the model it produced can be
    released), and the run's releases are read back from it on resume: the file, not a checkpoint,
    says what a run has spent, so falling back to an older checkpoint or losing every checkpoint
    never makes epsilon go backwards. Its counts also go in the checkpoint."""

    def __init__(self, delta: float, target_epsilon: float | None = None, *, override: bool = False):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta, self.target_epsilon = delta, target_epsilon
        self.override = override  # --dp-override-ledger: start over an unreadable ledger, or replay rounds
        self.rounds: Counter[RoundEvent] = Counter()
        self.file: LedgerFile | None = None
        self.run: str | None = None
        self._known: dict[tuple, float] = {}  # epsilon of a composition, computed once (0.2 s each)

    def open(self, directory: Path | None, *, run: str, completed_rounds: int, resumed: bool,
             set_aside: Sequence[int] = (), fresh_start: bool = False) -> str:
        """Read the ledger file in ``directory`` for this run (see :meth:`check_start`), then record
        into it. Returns the run the releases belong to: ``run``, or an unfinished run that released
        no more than the round a crash before its first checkpoint can lose, which this run continues.
        LedgerError says why the run may not start."""
        if directory is None:
            self.run = run
            return run
        path = Path(directory) / LEDGER_NAME
        try:
            ledger = LedgerFile(path)
        except LedgerError as error:
            if not self.override:
                raise LedgerError(f"{error}. The epsilon already spent on these clients' data cannot be known: "
                                  f"repair or restore the file, or start with --dp-override-ledger / "
                                  f"DP_OVERRIDE_LEDGER=1 to set it aside and begin a new ledger") from None
            aside = LedgerFile.set_aside_path(path)
            log.warning("the privacy ledger could not be read (%s); set aside as %s (--dp-override-ledger): what it "
                        "recorded is no longer counted", error, aside.name)
            ledger = LedgerFile(path)
        if ledger.cut_off is not None:
            log.warning("the privacy ledger's last line was cut short by a crash while it was written (%r): removed; "
                        "the release it began was never made", ledger.cut_off)
        run = self.check_start(ledger, run=run, completed_rounds=completed_rounds, resumed=resumed,
                               set_aside=set_aside, fresh_start=fresh_start)
        counted = sum(self.rounds.values())  # what the resumed checkpoint counted
        if resumed and counted > len(ledger.of_run(run)):
            why = (f"the privacy ledger {path} holds {len(ledger.of_run(run))} release(s) of this run, its checkpoint "
                   f"counts {counted}: the file was replaced or cut")
            self._unless_overridden(why, "restore it, or start with --dp-override-ledger / DP_OVERRIDE_LEDGER=1 to go "
                                         "on from the checkpoint's count", "going on from the checkpoint's count")
        self.file, self.run = ledger, run
        mine = Counter(RoundEvent(r.population, r.sampled, r.noise_multiplier) for r in ledger.of_run(run))
        self.rounds = mine | self.rounds  # the file holds every release; a checkpoint's counts are a lower bound
        return run

    def check_start(self, ledger: LedgerFile, *, run: str, completed_rounds: int, resumed: bool,
                    set_aside: Sequence[int], fresh_start: bool) -> str:
        """Whether the run may start on what ``ledger`` recorded, and which run it is (see :meth:`open`).

        A resumed run may have released one round past its checkpoint (the round a crash loses); more,
        or a newer checkpoint set aside as unusable, means rounds already released would run and be
        released again: refused unless overridden (they stay counted either way). A new run over an
        unfinished run that released more than its first round (so had checkpoints, now all lost) is
        refused unless ``fresh_start`` says to begin anew, or overridden."""
        releases = ledger.of_run(run) if resumed else []
        beyond = sorted({r.round for r in releases if r.round > completed_rounds})
        newer_lost = [r for r in set_aside if r > completed_rounds]
        if resumed and (newer_lost or (beyond and beyond[-1] > completed_rounds + 1)):
            why = (f"the privacy ledger records releases of round(s) {', '.join(map(str, beyond))} of this run, past "
                   f"the checkpoint of round {completed_rounds} being resumed"
                   + (f" (the checkpoint(s) of round(s) {', '.join(map(str, newer_lost))} could not be loaded)"
                      if newer_lost else ""))
            self._unless_overridden(why, "resuming would release those rounds again. Every release stays counted; "
                                         "start with --dp-override-ledger / DP_OVERRIDE_LEDGER=1 to resume anyway, or "
                                         "--fresh-start to begin a new run",
                                    "resuming anyway: the rounds run again are counted again")
        if resumed or fresh_start:
            return run
        unfinished = [other for other in ledger.runs() if other not in ledger.finished]
        if not unfinished:
            return run
        last = unfinished[-1]
        rounds = sorted({r.round for r in ledger.of_run(last)})
        if rounds == [1] and not set_aside:  # a crash in round 1, before any checkpoint: continue that run
            log.warning("the privacy ledger records round 1 of run %s, which left no checkpoint (a crash in its first "
                        "round): this run continues it, and its release stays counted", last)
            return last
        why = (f"the privacy ledger records {len(ledger.of_run(last))} release(s) of run {last} (rounds up to "
               f"{rounds[-1]}), which did not finish, but no checkpoint of it could be loaded")
        self._unless_overridden(why, "pass --fresh-start to begin a new run (the old run's releases stay in the ledger "
                                     "and in its total), restore a checkpoint, or --dp-override-ledger",
                                "starting a new run anyway")
        return run

    def _unless_overridden(self, why: str, remedy: str, anyway: str) -> None:
        """LedgerError saying ``why`` and the ``remedy``; with --dp-override-ledger, a warning instead."""
        if not self.override:
            raise LedgerError(f"{why}: {remedy}")
        log.warning("%s; %s (--dp-override-ledger)", why, anyway)

    def record(self, event: RoundEvent, *, server_round: int = 0, local: Sequence[str] = ()) -> float:
        """Note a released round, first in the ledger file (LedgerError if it cannot be written: the
        round must then not be released); returns epsilon spent so far."""
        if self.file is not None:
            self.file.record(Release(self.run, server_round, event.population, event.sampled, event.noise_multiplier,
                                     self.delta, tuple(local)))
        self.rounds[event] += 1
        return self.spent()

    def finish(self) -> None:
        """The run ended (its rounds or its budget): the ledger says so."""
        if self.file is not None and self.run not in self.file.finished:
            self.file.finish(self.run)

    def spent_all_runs(self) -> float | None:
        """Epsilon of every release in the ledger file, every run's, on the same clients' data (None
        when the file holds this run only, or there is no file)."""
        if self.file is None or self.file.runs() in ([], [self.run]):
            return None
        return self._epsilon(Counter(RoundEvent(r.population, r.sampled, r.noise_multiplier)
                                     for r in self.file.releases))

    def spent(self) -> float:
        return self._epsilon(self.rounds) if self.rounds else 0.0

    def spent_after(self, event: RoundEvent) -> float:
        """Epsilon if ``event`` were released next (computed once: recording it then costs nothing)."""
        return self._epsilon(self.rounds + Counter([event]))

    def _epsilon(self, rounds: Counter[RoundEvent]) -> float:
        key = tuple(sorted(rounds.items(), key=_order))
        if key not in self._known:
            if len(self._known) > 64:
                self._known.clear()
            self._known[key] = epsilon(key, self.delta)
        return self._known[key]

    def why_not(self, event: RoundEvent) -> str | None:
        """Why the next round may not run (it would exceed the target), or None."""
        if self.target_epsilon is None:
            return None
        after = self.spent_after(event)
        if after > self.target_epsilon * (1 + 1e-9):
            return (f"one more round would spend epsilon {after:.4g}, above the target {self.target_epsilon:g} "
                    f"(delta {self.delta:g}); spent so far {self.spent():.4g}")
        return None

    def state(self) -> dict[str, Any]:
        return {"delta": self.delta, "rounds": [[e.population, e.sampled, e.noise_multiplier, count]
                                                for e, count in sorted(self.rounds.items(), key=_order)]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned; ValueError if it is malformed or for another delta.

        A ledger never forgets a release: loading an older state (the engine rolls a strategy back
        when it refuses a round's model, but that model was computed, and its refusal seen) keeps
        every round this ledger has counted; a fresh ledger (a resumed run) takes the checkpoint's."""
        try:
            rounds = Counter({RoundEvent(int(n), int(m), float(z)): int(count) for n, m, z, count in state["rounds"]})
            delta = float(state["delta"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"the privacy ledger in the checkpoint is malformed ({error})") from None
        if not math.isclose(delta, self.delta, rel_tol=1e-12):
            raise ValueError(f"the checkpoint accounted at delta {delta:g}, this run at {self.delta:g}")
        if any(count < 0 for count in rounds.values()):
            raise ValueError("the privacy ledger in the checkpoint has a negative count")
        self.rounds = rounds | self.rounds  # the larger count of each kind of round


def _order(item: tuple[RoundEvent, int]) -> tuple[int, int, float]:
    event = item[0]
    return event.population, event.sampled, event.noise_multiplier
