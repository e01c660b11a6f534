"""Flow control of uploads: the server grants upload slots, so the memory its updates take while
they travel does not grow with the number of clients sending at once.

libzmq reads every connection into full-size message buffers as fast as the peers send; with N
clients sending a model-sized update at the same moment the server would hold N updates before it
could fold the first. Instead a client whose update is ready says so (UPLOAD_READY, a few bytes)
and sends it only once granted (UPLOAD_GRANT). At most ``slots`` grants are outstanding; the next
one goes out as soon as an update has arrived (and is folded) or its sender is gone, so transfers
and aggregation overlap. Credit-based flow control in the manner of HTTP/2's WINDOW_UPDATE and
QUIC's MAX_STREAMS, over whole updates.

Pure logic, no I/O: the round engine drives an :class:`UploadWindow` per collection of answers.
"""

from __future__ import annotations

from collections import OrderedDict

#: Uploads in flight at once when nothing else is said: two keep the link busy while one is folded.
DEFAULT_INFLIGHT_UPDATES = 2


class UploadWindow:
    """Who may upload now: at most ``slots`` granted clients at a time; the others wait, first come
    first served."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"an upload window needs at least one slot, got {slots}")
        self.slots = slots
        self._granted: dict[str, float] = {}  # client -> when it was granted
        self._waiting: OrderedDict[str, None] = OrderedDict()

    @property
    def granted(self) -> dict[str, float]:
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

    def ready(self, client_id: str, now: float) -> list[str]:
        """``client_id`` has an update ready: the clients to grant now (it again, if it held a grant:
        it asks again after losing its connection, and the grant is repeated)."""
        if client_id in self._granted:
            self._granted[client_id] = now
            return [client_id]
        self._waiting.setdefault(client_id)
        return self._grant(now)

    def done(self, client_id: str, now: float) -> list[str]:
        """``client_id``'s upload arrived, or it is gone: its slot (or its place in the queue) is
        freed; the clients to grant now."""
        self._waiting.pop(client_id, None)
        self._granted.pop(client_id, None)
        return self._grant(now)

    def overdue(self, now: float, timeout_s: float) -> list[str]:
        """Granted clients whose upload has not arrived within ``timeout_s`` of their grant."""
        return [cid for cid, since in self._granted.items() if now - since > timeout_s]

    def _grant(self, now: float) -> list[str]:
        granted = []
        while self._waiting and len(self._granted) < self.slots:
            client_id, _ = self._waiting.popitem(last=False)
            self._granted[client_id] = now
            granted.append(client_id)
        return granted
