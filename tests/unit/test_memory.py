"""The server's memory plan (federation/memory.py): what it expects, how auto picks the uploads in
flight, and what it refuses."""

from __future__ import annotations

import pytest

from pyfed.federation.memory import (MAX_AUTO_INFLIGHT, ROUND_COPIES, MemoryRefused, available_bytes,
                                     container_limit_bytes, plan_memory, process_rss_bytes)

pytestmark = pytest.mark.unit

MB = 1_000_000
BASE = dict(runtime_bytes=500 * MB, model_bytes=200 * MB, update_bytes=200 * MB, limit_source="--memory-limit",
            available_bytes=None)


def test_the_expected_peak_is_the_runtime_the_round_copies_and_the_uploads_in_flight():
    plan = plan_memory(**BASE, requested_inflight=3, limit_bytes=None)
    assert plan.max_inflight_updates == 3
    assert plan.expected_peak_bytes == 500 * MB + ROUND_COPIES * 200 * MB + 3 * 200 * MB
    assert "expected peak memory 1,900 MB" in plan.describe() and "no memory limit" in plan.describe()


@pytest.mark.parametrize("limit_mb, inflight", [(1500, 1), (1700, 1), (1900, 2), (2200, 3), (10_000, MAX_AUTO_INFLIGHT)])
def test_auto_takes_as_many_uploads_as_fit_in_the_limit_with_headroom(limit_mb, inflight):
    plan = plan_memory(**BASE, requested_inflight="auto", limit_bytes=limit_mb * MB)
    assert plan.max_inflight_updates == inflight


def test_auto_without_a_limit_uses_what_is_available_and_compressed_updates_fit_more():
    tight = plan_memory(**{**BASE, "available_bytes": 1200 * MB}, requested_inflight="auto", limit_bytes=None)
    assert tight.max_inflight_updates == 1
    int8 = plan_memory(**{**BASE, "available_bytes": 1200 * MB, "update_bytes": 50 * MB}, requested_inflight="auto",
                       limit_bytes=None)
    assert int8.max_inflight_updates == MAX_AUTO_INFLIGHT


def test_a_run_beyond_its_limit_is_refused_saying_what_to_change():
    with pytest.raises(MemoryRefused, match=r"1,900 MB at its peak, more than the 1,500 MB of --memory-limit: lower "
                                            r"--max-inflight-updates"):
        plan_memory(**BASE, requested_inflight=3, limit_bytes=1500 * MB)
    with pytest.raises(MemoryRefused, match="raise the limit, or use a smaller model or a compressed update"):
        plan_memory(**BASE, requested_inflight="auto", limit_bytes=1000 * MB)


def test_a_strategy_that_holds_every_update_gets_the_clients_that_fit_or_is_refused():
    plan = plan_memory(**BASE, requested_inflight=1, limit_bytes=3000 * MB, holds_updates=True, min_fit_clients=2)
    assert plan.max_clients_per_round == (3000 - 500 - ROUND_COPIES * 200 - 200) // 200 == 7
    assert plan.expected_peak_bytes <= 3000 * MB and "7 held updates" in plan.describe()
    with pytest.raises(MemoryRefused, match="only 2 fit .* a round needs at least 5 \\(--min-fit-clients\\)"):
        plan_memory(**BASE, requested_inflight=1, limit_bytes=2000 * MB, holds_updates=True, min_fit_clients=5)
    unbounded = plan_memory(**BASE, requested_inflight=1, limit_bytes=None, holds_updates=True)
    assert unbounded.max_clients_per_round is None and "for each client of a round" in unbounded.describe()


def test_what_the_machine_says_is_read_from_proc_and_the_cgroup(tmp_path):
    assert process_rss_bytes() > 10 * MB and available_bytes() > 0
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  2048 kB\n")
    assert process_rss_bytes(status) == 2048 * 1024
    assert process_rss_bytes(tmp_path / "missing") is None
    (tmp_path / "memory.max").write_text("max\n")
    assert container_limit_bytes(tmp_path) is None
    (tmp_path / "memory.max").write_text("4294967296\n")
    assert container_limit_bytes(tmp_path) == 4 * 1024**3
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    assert container_limit_bytes(v1) is None
    assert container_limit_bytes(tmp_path / "none") is None


def test_a_small_models_copies_are_said_in_a_precision_that_shows_them():
    """The digits MLP's 69 kB copies were logged as "4 model copies of 0 MB"."""
    plan = plan_memory(runtime_bytes=400_000_000, model_bytes=68_904, update_bytes=68_904, requested_inflight="auto",
                       limit_bytes=None, limit_source=None, available_bytes=8_000_000_000)
    assert f"{ROUND_COPIES} model copies of 0.069 MB" in plan.describe()
    big = plan_memory(runtime_bytes=400_000_000, model_bytes=22_000_000, update_bytes=22_000_000,
                      requested_inflight="auto", limit_bytes=None, limit_source=None, available_bytes=8_000_000_000)
    assert f"{ROUND_COPIES} model copies of 22 MB" in big.describe()
