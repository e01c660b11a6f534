"""Flow control of uploads: the server grants upload slots, so the memory its updates take while
they travel does not grow with the number of clients sending at once.

libzmq reads every connection into full-size message buffers as fast as the peers send; with N
clients sending a model-sized update at the same moment the server would hold N updates before it
could fold the first. Instead a client whose update is ready says so (UPLOAD_READY, a few bytes)
and sends it only once granted (UPLOAD_GRANT). At most ``slots`` grants are outstanding; the next
one goes out as soon as an update has arrived (and is folded) or its sender is gone, so transfers
and aggregation overlap. Credit-based flow control in the manner of HTTP/2's WINDOW_UPDATE and
QUIC's MAX_STREAMS, over whole updates.

A grant is a loan with a due time: each upload must arrive within its own allowance, from its size
at a minimum rate plus a grace (:func:`upload_allowance_s`, bounded by the round timeout), counted
from the grant. Nothing the client does extends it: saying UPLOAD_READY again repeats the grant
but keeps its due time, and chunks arriving slowly do not move it. So one client cannot hold a slot
longer than its own upload needs at the slowest rate the server accepts, and a queue of N uploads
drains in at most ``ceil(N / slots)`` allowances.

Pure logic, no I/O: the round engine drives an :class:`UploadWindow` per collection of answers.
"""

from __future__ import annotations

from collections import OrderedDict

#: Uploads in flight at once when nothing else is said: two keep the link busy while one is folded.
DEFAULT_INFLIGHT_UPDATES = 2
#: The slowest upload the server waits for, in megabits per second (``--min-upload-rate``).
DEFAULT_MIN_UPLOAD_MBIT_S = 2.0
#: What every granted upload has on top of its size at the minimum rate (a connection's slow start,
#: a busy client).
UPLOAD_GRACE_S = 15.0


def upload_allowance_s(size_bytes: int, min_upload_mbit_s: float, round_timeout_s: float | None) -> float:
    """How long a granted upload of ``size_bytes`` has to arrive: the grace plus its size at the
    minimum rate, never more than the round timeout (when there is one)."""
    if not min_upload_mbit_s > 0:
        raise ValueError(f"the minimum upload rate must be positive, got {min_upload_mbit_s}")
    allowance = UPLOAD_GRACE_S + size_bytes * 8 / (min_upload_mbit_s * 1e6)
    return min(allowance, round_timeout_s) if round_timeout_s else allowance


class UploadWindow:
    """Who may upload now: at most ``slots`` granted clients at a time, each until its due time; the
    others wait, first come first served."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"an upload window needs at least one slot, got {slots}")
        self.slots = slots
        self._granted: dict[str, float] = {}  # client -> when its upload is due
        self._waiting: OrderedDict[str, float] = OrderedDict()  # client -> its allowance, from its grant

    @property
    def granted(self) -> dict[str, float]:
        """The granted clients and when each upload is due."""
        return dict(self._granted)

    @property
    def waiting(self) -> list[str]:
        return list(self._waiting)

    def holds(self, client_id: str) -> bool:
        """Whether the client has a grant now."""
        return client_id in self._granted

    def knows(self, client_id: str) -> bool:
        """Whether the client said its update is ready (granted or waiting)."""
        return client_id in self._granted or client_id in self._waiting

    def ready(self, client_id: str, now: float, allowance_s: float) -> list[str]:
        """``client_id`` has an update ready that needs ``allowance_s`` once granted: the clients to
        grant now. A client that holds a grant gets it again (its due time unchanged: asking again
        never buys time); one already waiting keeps its place."""
        if client_id in self._granted:
            return [client_id]
        self._waiting.setdefault(client_id, allowance_s)
        return self._grant(now)

    def done(self, client_id: str, now: float) -> list[str]:
        """``client_id``'s upload arrived, or it is gone: its slot (or its place in the queue) is
        freed; the clients to grant now."""
        self._waiting.pop(client_id, None)
        self._granted.pop(client_id, None)
        return self._grant(now)

    def overdue(self, now: float) -> list[str]:
        """Granted clients whose upload is past its due time."""
        return [cid for cid, due in self._granted.items() if now > due]

    def _grant(self, now: float) -> list[str]:
        granted = []
        while self._waiting and len(self._granted) < self.slots:
            client_id, allowance_s = self._waiting.popitem(last=False)
            self._granted[client_id] = now + allowance_s
            granted.append(client_id)
        return granted
