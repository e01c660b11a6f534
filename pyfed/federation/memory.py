"""The server's memory: what a run needs at its peak, said at start-up and held to a limit.

Above what the process holds once the model is loaded (the runtime, the Keras model and the global
weights), a round adds: the running sum of the updates (float64, two model copies), the new global
model (one copy), the model sent out again (one copy while the next round's broadcast is encoded, or
the checkpoint and model files are written: learning/export.py streams them, one array at a time)
and the updates travelling at once (``max_inflight_updates``, each at most
one encoded update; federation/uploads.py). A strategy that holds every update of a round
(median, trimmed mean, Krum) needs one dense copy per client of the round on top.

The limit is ``--memory-limit`` when given, else the container's (cgroup v2 ``memory.max``, or v1
``memory.limit_in_bytes``), else none. Pure logic here; reading /proc and /sys is the caller's,
through :func:`process_rss_bytes`, :func:`container_limit_bytes` and :func:`available_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Model copies a round adds above the loaded model: the float64 sum (2), the new model (1), the
#: model sent out again or checkpointed (1).
ROUND_COPIES = 4
#: The most uploads ``auto`` lets travel at once, and the fewest.
MAX_AUTO_INFLIGHT = 4
MIN_INFLIGHT = 1
#: Room left for what is not counted (Python objects, TensorFlow's arenas, the evaluation's batches).
HEADROOM = 0.10
CGROUP_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


class MemoryRefused(ValueError):
    """The run cannot fit its memory limit; the message says what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    """What the server expects to need at its peak, and the limit it was checked against."""

    runtime_bytes: int  # the process once the model is loaded
    model_bytes: int  # one dense copy of the global model
    update_bytes: int  # one update as it travels (encoded)
    max_inflight_updates: int
    limit_bytes: int | None
    limit_source: str | None  # "--memory-limit / MEMORY_LIMIT", "the container's memory limit" or None
    holds_updates: bool = False  # the strategy holds one dense update per client of a round
    max_clients_per_round: int | None = None  # for such a strategy under a limit: what fits

    @property
    def expected_peak_bytes(self) -> int:
        """The peak for a FedAvg-family strategy; with held updates, for ``max_clients_per_round`` of them."""
        held = (self.max_clients_per_round or 0) if self.holds_updates else 0
        return (self.runtime_bytes + (ROUND_COPIES + held) * self.model_bytes
                + self.max_inflight_updates * self.update_bytes)

    def describe(self) -> str:
        held = ""
        if self.holds_updates:
            held = (f" + {self.max_clients_per_round} held updates (the most clients a round may take)"
                    if self.max_clients_per_round is not None else
                    f" + {_mb(self.model_bytes)} for each client of a round (the strategy holds every update)")
        limit = (f"; limit {_mb(self.limit_bytes)} ({self.limit_source})" if self.limit_bytes is not None
                 else "; no memory limit")
        unbounded = self.holds_updates and self.max_clients_per_round is None
        return (f"expected peak memory {_mb(self.expected_peak_bytes)}{' and more' if unbounded else ''}: runtime "
                f"with the model loaded {_mb(self.runtime_bytes)} + {ROUND_COPIES} model copies of {_mb(self.model_bytes)} (the running sum, the new model, the model sent out) + "
                f"{self.max_inflight_updates} upload(s) of {_mb(self.update_bytes)} at once{held}{limit}")


def _mb(size: int | None) -> str:
    """Megabytes to a precision that says something: "0.07 MB" for a small model, not "0 MB"."""
    if size is None:
        return "none"
    return f"{size / 1e6:,.0f} MB" if size >= 10e6 else f"{size / 1e6:.2g} MB"


def plan_memory(*, runtime_bytes: int, model_bytes: int, update_bytes: int, requested_inflight: int | str,
                limit_bytes: int | None, limit_source: str | None, available_bytes: int | None,
                holds_updates: bool = False, min_fit_clients: int = 1) -> MemoryPlan:
    """The memory plan for a run, or :class:`MemoryRefused` naming what does not fit.

    ``requested_inflight`` is a number or "auto": then as many uploads as fit (1 to
    :data:`MAX_AUTO_INFLIGHT`) in the limit, or in the memory available when there is no limit. A
    strategy that ``holds_updates`` gets, under a limit, the most clients a round may take
    (refused when fewer than ``min_fit_clients`` fit).
    """
    fixed = runtime_bytes + ROUND_COPIES * model_bytes
    room = limit_bytes if limit_bytes is not None else (
        available_bytes + runtime_bytes if available_bytes is not None else None)
    if requested_inflight == "auto":
        reserve = min_fit_clients * model_bytes if holds_updates else 0  # the fewest updates it will hold
        spare = int(room * (1 - HEADROOM)) - fixed - reserve if room is not None else None
        inflight = (MAX_AUTO_INFLIGHT if spare is None
                    else max(MIN_INFLIGHT, min(MAX_AUTO_INFLIGHT, spare // max(update_bytes, 1))))
    else:
        inflight = int(requested_inflight)
    max_clients = None
    if holds_updates and limit_bytes is not None:
        max_clients = max(0, (limit_bytes - fixed - inflight * update_bytes) // model_bytes)
        if max_clients < min_fit_clients:
            raise MemoryRefused(
                f"the strategy holds every update of a round ({_mb(model_bytes)} each) and only {max_clients} fit "
                f"in the {_mb(limit_bytes)} of {limit_source} beside the runtime ({_mb(runtime_bytes)}), "
                f"{ROUND_COPIES} model copies and {inflight} upload(s) in flight; a round needs at least "
                f"{min_fit_clients} (--min-fit-clients): raise the limit, lower --min-fit-clients, or use a "
                f"FedAvg-family strategy, which holds none")
    plan = MemoryPlan(runtime_bytes, model_bytes, update_bytes, inflight, limit_bytes, limit_source, holds_updates,
                      max_clients)
    if limit_bytes is not None and plan.expected_peak_bytes > limit_bytes:
        hint = ("lower --max-inflight-updates / MAX_INFLIGHT_UPDATES or raise the limit"
                if requested_inflight != "auto" and inflight > MIN_INFLIGHT else
                "raise the limit, or use a smaller model or a compressed update encoding")
        raise MemoryRefused(f"the server would need {_mb(plan.expected_peak_bytes)} at its peak, more than the "
                            f"{_mb(limit_bytes)} of {limit_source}: {hint} ({plan.describe()})")
    return plan


# --- what the machine says (adapters) ------------------------------------------------------------


def process_rss_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's resident memory, or None where /proc does not say."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def container_limit_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``),
    or None when there is none."""
    for candidate in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= CGROUP_UNLIMITED else value
    return None


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The memory the kernel says is available for new work (MemAvailable), or None."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
