"""The message pacer between the IB actor and the socket: at most N messages in any sliding window.

IB allows 50 messages a second from a client and answers error 100 (older
setups drop the connection) past it. The pacer sits at the wire, in place of
ib_insync's ``Client.sendMsg``, so it counts *every* framed message: our
requests and cancels, and the ones ib_insync sends on its own (startApi,
reqPositions and the other synchronisation requests of connectAsync,
reqContractDetails, cancelMktData). A burst is queued in order, never dropped;
a message still queued can be withdrawn (a snapshot that timed out before its
request left), and everything queued is discarded when the socket goes down,
because it belongs to a session IB no longer knows.

The window is a sliding log of send times, the same algorithm as ib_insync's
own throttle (45 per 1 s), which this replaces rather than stacks on: two
queues in series would hide the queue depth and add nothing. The window is
``1 s + guard`` so that delivery jitter cannot bunch more than ``rate``
messages into one 1 s window at IB's end.

If IB answers 100 all the same (a gateway that counts its window
differently, other traffic on the account), its window is full by its own
count: :meth:`Pacer.hold` sends nothing more for one window, so what the
IB actor sends again is not refused in turn (IB drops a client that keeps
exceeding).

Runs only in the IB actor's asyncio loop thread; not thread-safe by design.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["PacedMessage", "Pacer"]


class PacedMessage:
    """One message waiting for (or past) the pacer; ``cancel()`` withdraws it while queued."""

    __slots__ = ("cancelled", "on_sent", "payload", "sent_at")

    def __init__(self, payload: bytes, on_sent: Callable[[float], None] | None) -> None:
        self.payload = payload
        self.on_sent = on_sent
        self.sent_at: float | None = None
        self.cancelled = False

    def cancel(self) -> bool:
        """Withdraw the message; True if it had not been sent yet."""
        if self.sent_at is not None:
            return False
        self.cancelled = True
        return True


class Pacer:
    """Sliding-window limiter with an in-order queue."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        write: Callable[[bytes], None],
        rate: float,
        window_s: float = 1.0,
    ) -> None:
        self._loop = loop
        self._write = write
        self.limit = max(1, int(rate))
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._queue: deque[PacedMessage] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._held_until = 0.0
        self.sent = 0
        self.max_in_window = 0

    @property
    def queued(self) -> int:
        return sum(1 for m in self._queue if not m.cancelled)

    def submit(self, payload: bytes, on_sent: Callable[[float], None] | None = None) -> PacedMessage:
        """Queue one framed message; it leaves as soon as the window allows, in submission order."""
        message = PacedMessage(payload, on_sent)
        self._queue.append(message)
        self.drain()
        return message

    def hold(self) -> None:
        """IB refused a message past its rate (100): send nothing for one window from now; the queue waits."""
        until = self._loop.time() + self.window_s
        if until <= self._held_until:
            return
        self._held_until = until
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue:
            self._timer = self._loop.call_at(until, self.drain)

    def clear(self) -> None:
        """Forget everything queued (the socket it was meant for is gone), and any hold with it."""
        for message in self._queue:
            message.cancelled = True
        self._queue.clear()
        self._held_until = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def drain(self) -> None:
        """Send what the window allows now; schedule the rest for when the oldest send leaves the window."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        now = self._loop.time()
        if now < self._held_until:
            if self._queue:
                self._timer = self._loop.call_at(self._held_until, self.drain)
            return
        times = self._times
        while times and now - times[0] >= self.window_s:
            times.popleft()
        queue = self._queue
        while queue and len(times) < self.limit:
            message = queue.popleft()
            if message.cancelled:
                continue
            self._write(message.payload)
            message.sent_at = now
            times.append(now)
            self.sent += 1
            if message.on_sent is not None:
                message.on_sent(now)
        self.max_in_window = max(self.max_in_window, len(times))
        while queue and queue[0].cancelled:
            queue.popleft()
        if queue and self._timer is None:
            self._timer = self._loop.call_at(times[0] + self.window_s, self.drain)
