"""The upload window (federation/uploads.py): who may send its update now."""

from __future__ import annotations

import pytest

from pyfed.federation.uploads import UPLOAD_GRACE_S, UploadWindow, upload_allowance_s

pytestmark = pytest.mark.unit


def test_grants_go_first_come_first_served_up_to_the_slots():
    window = UploadWindow(2)
    assert window.ready("a", 0, 10) == ["a"]
    assert window.ready("b", 1, 10) == ["b"]
    assert window.ready("c", 2, 10) == [] and window.ready("d", 3, 10) == []
    assert window.waiting == ["c", "d"] and set(window.granted) == {"a", "b"}
    assert window.done("b", 4) == ["c"]
    assert window.done("a", 5) == ["d"]
    assert window.done("c", 6) == [] and window.done("d", 7) == []
    assert window.granted == {} and window.waiting == []


def test_a_waiting_client_that_leaves_gives_up_its_place():
    window = UploadWindow(1)
    window.ready("a", 0, 10)
    window.ready("b", 0, 10)
    window.ready("c", 0, 10)
    assert window.done("b", 1) == []  # it was only waiting
    assert window.done("a", 2) == ["c"]


def test_asking_again_repeats_a_grant_but_never_its_due_time_and_keeps_a_place_in_line():
    """A client that says UPLOAD_READY again while granted (after losing its connection, or to hold
    the slot) is granted again, due when it first was: asking again never buys time."""
    window = UploadWindow(1)
    assert window.ready("a", 0, 6) == ["a"]
    assert window.ready("b", 0, 6) == []
    for now in range(1, 7):
        assert window.ready("a", now, 6) == ["a"]  # granted again, every second, still due at 6
    assert window.ready("b", 6, 6) == []     # still waiting, still second
    assert window.waiting == ["b"] and window.granted == {"a": 6} and window.overdue(6) == []
    assert window.overdue(6.5) == ["a"]
    assert window.done("a", 6.5) == ["b"] and window.granted == {"b": 12.5}  # its allowance runs from its grant


def test_an_upload_has_the_grace_plus_its_size_at_the_minimum_rate_bounded_by_the_round_timeout():
    assert upload_allowance_s(0, 2.0, None) == UPLOAD_GRACE_S
    assert upload_allowance_s(25_000_000, 2.0, None) == pytest.approx(UPLOAD_GRACE_S + 100)  # 200 Mbit at 2 Mbit/s
    assert upload_allowance_s(25_000_000, 2.0, 60.0) == 60.0
    assert upload_allowance_s(1000, 8.0, 600.0) == pytest.approx(UPLOAD_GRACE_S + 0.001)
    with pytest.raises(ValueError, match="minimum upload rate must be positive"):
        upload_allowance_s(1000, 0.0, None)


def test_done_for_a_client_it_does_not_know_changes_nothing():
    window = UploadWindow(1)
    window.ready("a", 0, 10)
    assert window.done("stranger", 1) == []
    assert window.holds("a") and window.knows("a") and not window.knows("stranger")


def test_a_window_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        UploadWindow(0)
