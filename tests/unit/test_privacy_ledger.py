"""The privacy ledger's file (persistence/ledger.py) and the rules a private run starts by
(federation/privacy.py): epsilon never goes backwards, whatever happens to the checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pyfed.federation.privacy import PrivacyLedger, RoundEvent, epsilon
from pyfed.federation.strategy import FedAvg, FitPlan, FitResult
from pyfed.federation.strategy.dp import DifferentialPrivacy
from pyfed.persistence.ledger import LEDGER_NAME, LedgerError, LedgerFile, Release

pytestmark = pytest.mark.unit

DELTA = 1e-5
RUN, OTHER = "a" * 16, "b" * 16
EVENT = RoundEvent(10, 5, 1.0)


def release(server_round: int, run: str = RUN) -> Release:
    return Release(run, server_round, 10, 5, 1.0, DELTA)


def written(tmp_path, *rounds: int, run: str = RUN, finished: bool = False) -> LedgerFile:
    ledger = LedgerFile(tmp_path / LEDGER_NAME)
    for server_round in rounds:
        ledger.record(release(server_round, run))
    if finished:
        ledger.finish(run)
    return ledger


def opened(tmp_path, *, override=False, checkpoint_rounds=0, **kwargs) -> PrivacyLedger:
    ledger = PrivacyLedger(DELTA, override=override)
    for _ in range(checkpoint_rounds):  # what a resumed checkpoint counted (load_state)
        ledger.rounds[EVENT] += 1
    options = {"run": RUN, "completed_rounds": 0, "resumed": False, **kwargs}
    ledger.open(tmp_path, **options)
    return ledger


def test_releases_are_appended_whole_and_read_back_and_a_finished_run_is_marked(tmp_path):
    written(tmp_path, 1, 2, finished=True)
    ledger = LedgerFile(tmp_path / LEDGER_NAME)
    assert [r.round for r in ledger.of_run(RUN)] == [1, 2] and ledger.finished == {RUN}
    lines = (tmp_path / LEDGER_NAME).read_text().splitlines()
    assert [json.loads(line).get("release") for line in lines] == [1, 2, None]
    assert oct((tmp_path / LEDGER_NAME).stat().st_mode & 0o777) == "0o644"


def test_a_last_line_cut_short_by_a_crash_is_removed_and_any_other_bad_line_makes_the_ledger_unreadable(tmp_path):
    written(tmp_path, 1)
    path = tmp_path / LEDGER_NAME
    with open(path, "ab") as handle:
        handle.write(b'{"release": 2, "run": "aaaa')  # the crash came inside this write
    ledger = LedgerFile(path)
    assert [r.round for r in ledger.releases] == [1] and ledger.cut_off.startswith('{"release": 2')
    assert path.read_bytes().endswith(b"}\n")  # and the file is whole again
    with open(path, "ab") as handle:
        handle.write(b'{"release": 2, "run": "zz"}\n')
    with pytest.raises(LedgerError, match=r"line 2: not a ledger entry \(run 'zz' is not a run id\)"):
        LedgerFile(path)
    path.write_bytes(b"\x00garbage\n")
    with pytest.raises(LedgerError, match="line 1: not a ledger entry"):
        LedgerFile(path)


@pytest.mark.parametrize("entry, message", [
    ({"release": 0}, "release '0' is not a count"),
    ({"sampled": 11}, "sampled 11 is more than the population 10"),
    ({"noise_multiplier": "1"}, "noise_multiplier '1' is not a positive number"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier"),
    ({"delta": 1.5}, r"delta '1.5' is not in"),
    ({"local": ["../x"]}, "local is not a list of client ids"),
])
def test_a_malformed_release_is_named(tmp_path, entry, message):
    good = {"release": 1, "run": RUN, "population": 10, "sampled": 5, "noise_multiplier": 1.0, "delta": DELTA}
    (tmp_path / LEDGER_NAME).write_text(json.dumps({**good, **entry}) + "\n")
    with pytest.raises(LedgerError, match=message):
        LedgerFile(tmp_path / LEDGER_NAME)


def test_a_ledger_that_is_a_symlink_or_a_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / LEDGER_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LedgerError, match="not a regular file"):
        LedgerFile(tmp_path / LEDGER_NAME)
    (tmp_path / LEDGER_NAME).unlink()
    (tmp_path / LEDGER_NAME).mkdir()
    with pytest.raises(LedgerError, match="not a regular file"):
        LedgerFile(tmp_path / LEDGER_NAME)


def test_a_release_that_cannot_be_written_is_not_counted_and_leaves_no_half_line(tmp_path, monkeypatch):
    ledger = opened(tmp_path)
    ledger.record(EVENT, server_round=1)

    def full(descriptor, data):
        os.ftruncate(descriptor, os.fstat(descriptor).st_size + 5)  # a part went out before the disk filled
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LedgerError, match="cannot record a release .*No space left"):
        ledger.record(EVENT, server_round=2)
    monkeypatch.undo()
    assert ledger.rounds[EVENT] == 1
    assert [r.round for r in LedgerFile(tmp_path / LEDGER_NAME).releases] == [1]


def test_a_resumed_run_counts_every_release_the_file_holds_even_past_its_checkpoint(tmp_path):
    """The review's case: 5 rounds released, the newest checkpoint lost to a crash mid-write, so the
    run resumes from round 4: epsilon is that of 5 releases, not 4 (it never goes backwards)."""
    written(tmp_path, 1, 2, 3, 4, 5)
    ledger = opened(tmp_path, resumed=True, completed_rounds=4, checkpoint_rounds=4)
    assert ledger.rounds[EVENT] == 5
    ledger.record(EVENT, server_round=5)  # round 5 runs again: a sixth release
    assert ledger.rounds[EVENT] == 6 and len(LedgerFile(tmp_path / LEDGER_NAME).of_run(RUN)) == 6


def test_resuming_behind_rounds_already_released_is_refused_unless_overridden(tmp_path):
    written(tmp_path, 1, 2, 3, 4, 5)
    with pytest.raises(LedgerError, match=r"round\(s\) 4, 5 of this run, past the checkpoint of round 3.*"
                                          r"--dp-override-ledger"):
        opened(tmp_path, resumed=True, completed_rounds=3, checkpoint_rounds=3)
    with pytest.raises(LedgerError, match=r"the checkpoint\(s\) of round\(s\) 5 could not be loaded"):
        opened(tmp_path, resumed=True, completed_rounds=4, checkpoint_rounds=4, set_aside=[5])
    ledger = opened(tmp_path, resumed=True, completed_rounds=3, checkpoint_rounds=3, override=True)
    assert ledger.rounds[EVENT] == 5  # replayed rounds will be counted again


def test_a_ledger_holding_fewer_releases_than_the_checkpoint_counts_is_refused(tmp_path):
    written(tmp_path, 1, 2)
    with pytest.raises(LedgerError, match=r"holds 2 release\(s\) of this run, its checkpoint counts 4"):
        opened(tmp_path, resumed=True, completed_rounds=4, checkpoint_rounds=4)
    assert opened(tmp_path, resumed=True, completed_rounds=4, checkpoint_rounds=4, override=True).rounds[EVENT] == 4


def test_a_new_run_over_an_unfinished_one_whose_checkpoints_are_all_lost_is_refused_unless_asked(tmp_path):
    """The review's second case: every checkpoint corrupt, and the run silently started afresh
    (21.4 reported, 32.0 true). Now it refuses; --fresh-start begins a new run, and the total over
    both runs is reported beside the new run's own."""
    written(tmp_path, 1, 2, 3, run=OTHER)
    with pytest.raises(LedgerError, match=r"3 release\(s\) of run b+ \(rounds up to 3\), which did not finish.*"
                                          r"--fresh-start"):
        opened(tmp_path, set_aside=[3])
    ledger = opened(tmp_path, fresh_start=True)
    assert ledger.run == RUN and ledger.rounds[EVENT] == 0
    ledger.record(EVENT, server_round=1)
    assert ledger.spent_all_runs() == pytest.approx(epsilon([(EVENT, 4)], DELTA))
    assert ledger.spent_all_runs() > ledger.spent() == pytest.approx(epsilon([(EVENT, 1)], DELTA))


def test_a_run_that_crashed_in_its_first_round_is_continued_and_a_finished_one_starts_a_new_run(tmp_path):
    written(tmp_path, 1, run=OTHER)
    assert opened(tmp_path).run == OTHER  # round 1's release stays this run's
    written(tmp_path, run=OTHER, finished=True)
    assert opened(tmp_path).run == RUN


def test_an_unreadable_ledger_stops_the_start_and_is_set_aside_only_when_told(tmp_path):
    (tmp_path / LEDGER_NAME).write_text("not json\n")
    with pytest.raises(LedgerError, match="line 1.*cannot be known.*--dp-override-ledger"):
        opened(tmp_path)
    ledger = opened(tmp_path, override=True)
    assert ledger.rounds[EVENT] == 0 and [p.name for p in tmp_path.glob(f"{LEDGER_NAME}.unreadable-*")]


def test_a_private_round_is_in_the_file_before_its_model_exists(tmp_path):
    """The release is appended, fsynced, as the aggregate is computed: a crash after it cannot lose it,
    and a write that fails raises (the engine then refuses the round's model: nothing is released)."""
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, fraction=1.0,
                             ledger=PrivacyLedger(DELTA), rng=np.random.default_rng(0))
    assert dp.open_privacy(tmp_path, run=RUN, completed_rounds=0, resumed=False) == RUN
    chosen = [cid for cid, _ in dp.configure_fit(1, ["c1", "c2"], FitPlan(epochs=1))]
    aggregator = dp.aggregator(1, [np.zeros(3, np.float32)])
    for cid in chosen:
        aggregator.add(FitResult(cid, [np.ones(3, np.float32)], 10))
    aggregator.result()
    (entry,) = LedgerFile(tmp_path / LEDGER_NAME).of_run(RUN)
    assert (entry.round, entry.population, entry.sampled, entry.noise_multiplier) == (1, 2, 2, 1.0)
    dp.close_privacy()
    assert LedgerFile(tmp_path / LEDGER_NAME).finished == {RUN}
