"""The upload window (federation/uploads.py): who may send its update now."""

from __future__ import annotations

import pytest

from pyfed.federation.uploads import UploadWindow

pytestmark = pytest.mark.unit


def test_grants_go_first_come_first_served_up_to_the_slots():
    window = UploadWindow(2)
    assert window.ready("a", 0) == ["a"]
    assert window.ready("b", 1) == ["b"]
    assert window.ready("c", 2) == [] and window.ready("d", 3) == []
    assert window.waiting == ["c", "d"] and set(window.granted) == {"a", "b"}
    assert window.done("b", 4) == ["c"]
    assert window.done("a", 5) == ["d"]
    assert window.done("c", 6) == [] and window.done("d", 7) == []
    assert window.granted == {} and window.waiting == []


def test_a_waiting_client_that_leaves_gives_up_its_place():
    window = UploadWindow(1)
    window.ready("a", 0)
    window.ready("b", 0)
    window.ready("c", 0)
    assert window.done("b", 1) == []  # it was only waiting
    assert window.done("a", 2) == ["c"]


def test_asking_again_repeats_a_grant_and_keeps_a_place_in_line():
    window = UploadWindow(1)
    assert window.ready("a", 0) == ["a"]
    assert window.ready("b", 0) == []
    assert window.ready("a", 5) == ["a"]  # back after losing its connection: granted again, timed anew
    assert window.ready("b", 6) == []     # still waiting, still second
    assert window.waiting == ["b"] and window.overdue(10, 6) == []
    assert window.overdue(12, 6) == ["a"]


def test_done_for_a_client_it_does_not_know_changes_nothing():
    window = UploadWindow(1)
    window.ready("a", 0)
    assert window.done("stranger", 1) == []
    assert window.holds("a") and window.knows("a") and not window.knows("stranger")


def test_a_window_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        UploadWindow(0)
