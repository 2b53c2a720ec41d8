"""The event outbox: every event the agent owes the controller leaves here, in order.

Tasks put events without waiting; one task delivers them, retrying what the controller could not take. A lifecycle
event (see `protocol.LIFECYCLE_EVENTS`) stays queued until the controller has taken it, whatever it answers in the
meantime (a network failure, 5xx, 401 while a token is rotated...); only an answer that says the event itself is
wrong drops it. A retry carries the same `event_id`, so a controller can drop a duplicate whose first answer was
lost. The queue is bounded for every kind of event: when it is full, heartbeats go first, then internal-error
reports, then `command_failed`, and the other lifecycle events last; what is dropped is counted, and the counts
ride on the next heartbeat.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from typing import Final

import trio
from trio_util import AsyncValue

from miglet import protocol
from miglet.controller import ControllerClient, ControllerRejected, ControllerUnavailable, retry_after_of
from miglet.retry import Backoff, RetryPolicy
from miglet.stamp import Stamper

log = logging.getLogger(__name__)

# While the agent stops, a failed delivery is retried at least this often, to fit the bounded flush.
MAX_RETRY_WHILE_STOPPING: Final = 1.0
# Answers that say the event itself is wrong: sending it again cannot help, so it is dropped. Every other refusal
# of a lifecycle event (401 and 403 above all) is retried.
EVENT_REFUSED: Final = frozenset({400, 404, 409, 410, 413, 415, 422})
# Lifecycle events lost to a full queue, remembered for the report at the end.
LOST_KEPT: Final = 100
# An event whose delivery fails with a bug (not a fault of the controller) this many times running is given up,
# so that it cannot hold up the events behind it for ever.
MAX_BUG_STRIKES: Final = 3


def is_lifecycle(event: protocol.AnyEvent) -> bool:
    return isinstance(event, protocol.LIFECYCLE_EVENTS)


_HEARTBEAT_RANK: Final = 0
# A notice that the VM is going: the controller has the least time to act on it.
_URGENT_RANK: Final = 4


def _rank(event: protocol.AnyEvent) -> int:
    """Which events a full queue gives up first: the lowest rank."""
    if isinstance(event, protocol.Heartbeat):
        return _HEARTBEAT_RANK
    if not is_lifecycle(event):
        return 1
    # A controller can make the agent owe any number of these (a flood of unknown commands): they go before the
    # events that tell a VM's story.
    if isinstance(event, protocol.CommandFailed):
        return 2
    if isinstance(event, protocol.VmPreempted):
        return _URGENT_RANK
    return 3


def describe(event: protocol.AnyEvent) -> str:
    """`type event_id`, for a log line that names events."""
    return f"{type(event).__struct_config__.tag} {event.event_id}"


class Outbox:
    """An ordered, bounded queue of stamped events and the task that delivers them."""

    def __init__(
        self,
        stamper: Stamper,
        capacity: int = 1000,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._stamper = stamper
        self._capacity = capacity
        self._policy = policy or RetryPolicy()
        self._rng = rng
        self._queue: deque[protocol.AnyEvent] = deque()
        self._ranks: Counter[int] = Counter()
        self._length = AsyncValue(0)
        self._hurry = trio.Event()
        # Every event put is, at any time, exactly one of: delivered, dropped, or still queued.
        self.stamped = 0
        self.delivered = 0
        self.dropped = 0
        # Dropped because the queue was full, by event type: reported in heartbeats.
        self.overflow: Counter[str] = Counter()
        # Lifecycle events given up (the queue was full, or delivering them kept failing with a bug): the latest
        # LOST_KEPT of them, and how many.
        self.lost: deque[protocol.AnyEvent] = deque(maxlen=LOST_KEPT)
        self.lost_count = 0
        # The head of the queue and how many times running its delivery has failed with a bug.
        self._strikes: tuple[str, int] = ("", 0)

    def __len__(self) -> int:
        return len(self._queue)

    def queued(self) -> list[protocol.AnyEvent]:
        """The events not yet delivered, oldest first."""
        return list(self._queue)

    def owed(self) -> list[protocol.AnyEvent]:
        """Lifecycle events the controller has not received: given up (the latest LOST_KEPT), then still queued."""
        return [*self.lost, *(event for event in self._queue if is_lifecycle(event))]

    def owed_count(self) -> int:
        """How many lifecycle events the controller has not received, all of them counted."""
        return self.lost_count + sum(1 for event in self._queue if is_lifecycle(event))

    def put(self, event: protocol.AnyEvent, *, first: bool = False) -> protocol.AnyEvent:
        """Queue `event` (stamped here) for delivery, or with `first` ahead of every event not yet in flight;
        never blocks."""
        stamped = self._stamper.stamp(event)
        self.stamped += 1
        if len(self._queue) >= self._capacity and not self._make_room(stamped):
            self._overflowed(stamped)
            return stamped
        if first and self._queue:
            # The head may be in flight: it keeps its place, and so do the urgent ones queued before this one.
            index = 1
            while index < len(self._queue) and _rank(self._queue[index]) == _URGENT_RANK:
                index += 1
            self._queue.insert(index, stamped)
        else:
            self._queue.append(stamped)
        self._ranks[_rank(stamped)] += 1
        self._length.value = len(self._queue)
        return stamped

    def _make_room(self, incoming: protocol.AnyEvent) -> bool:
        """Drop the oldest queued event of the lowest rank to fit `incoming`; False when `incoming` ranks lower."""
        # The head may be in flight, so it is never the one dropped.
        head_rank = _rank(self._queue[0])
        present = [rank for rank, count in self._ranks.items() if count - (rank == head_rank) > 0]
        if not present or min(present) > _rank(incoming):
            return False
        lowest = min(present)
        for index in range(1, len(self._queue)):
            if _rank(self._queue[index]) == lowest:
                victim = self._queue[index]
                del self._queue[index]
                self._ranks[lowest] -= 1
                self._overflowed(victim)
                return True
        raise AssertionError("rank counts out of step with the queue")  # pragma: no cover

    def _overflowed(self, event: protocol.AnyEvent) -> None:
        self.overflow[str(type(event).__struct_config__.tag)] += 1
        if is_lifecycle(event):
            self._lost(event, "Outbox full: dropped an event owed to the controller")
        else:
            self.dropped += 1
            log.warning("Outbox full: dropped an event", extra={"event": describe(event)})

    def _lost(self, event: protocol.AnyEvent, why: str) -> None:
        """`event` is dropped for good; a lifecycle event among them is remembered as owed."""
        self.dropped += 1
        if is_lifecycle(event):
            self.lost.append(event)
            self.lost_count += 1
            log.error(why, extra={"event": describe(event)})
        else:
            log.warning(why, extra={"event": describe(event)})

    def hurry(self) -> None:
        """The agent is stopping: what is owed must go out in the little time left.

        Queued heartbeats are dropped (they say nothing any more), and a retry waiting out a long backoff tries
        again now; further retries wait at most MAX_RETRY_WHILE_STOPPING.
        """
        if self._queue:
            head, *rest = self._queue
            kept = [event for event in rest if not isinstance(event, protocol.Heartbeat)]
            dropped = len(rest) - len(kept)
            if dropped:
                self._queue = deque([head, *kept])
                self._ranks[_HEARTBEAT_RANK] -= dropped
                self.dropped += dropped
                log.info("Stopping: dropped the heartbeats still queued", extra={"dropped": dropped})
        self._length.value = len(self._queue)
        self._hurry.set()

    async def wait_empty(self) -> None:
        await self._length.wait_value(0)

    async def serve(self, client: ControllerClient) -> None:
        """Deliver queued events in order, forever; run it in the nursery that outlives the other tasks.

        An event leaves the queue only once it is delivered or dropped, so restarting this task after a failure
        loses nothing.
        """
        while True:
            await self._length.wait_value(lambda n: n > 0)
            event = self._queue[0]
            try:
                await self._deliver(client, event)
            except Exception:
                if self._strike(event):
                    self._remove_head(event)
                    self._lost(event, "Giving up an event whose delivery keeps failing with an internal error")
                raise
            self._remove_head(event)

    def _remove_head(self, event: protocol.AnyEvent) -> None:
        self._queue.popleft()
        self._ranks[_rank(event)] -= 1
        self._length.value = len(self._queue)

    def _strike(self, event: protocol.AnyEvent) -> bool:
        """Count a bug met delivering `event`; True when it has had MAX_BUG_STRIKES running."""
        event_id, count = self._strikes
        count = count + 1 if event_id == event.event_id else 1
        self._strikes = (event.event_id, count)
        return count >= MAX_BUG_STRIKES

    async def _deliver(self, client: ControllerClient, event: protocol.AnyEvent) -> None:
        kind = type(event).__struct_config__.tag
        backoff = Backoff(self._policy, self._rng)
        while True:
            try:
                await client.post_event(event)
            except (ControllerUnavailable, protocol.ProtocolError) as exc:
                retry_after = retry_after_of(exc)
                error, level = str(exc), logging.WARNING
            except ControllerRejected as exc:
                if exc.status in EVENT_REFUSED or not is_lifecycle(event):
                    log.error(
                        "Controller refused event; dropping it",
                        extra={"event": kind, "event_id": event.event_id, "error": str(exc)},
                    )
                    self.dropped += 1
                    return
                # Credentials (401, 403) or a policy of the controller's: someone has to put it right, and the
                # event is owed until then.
                retry_after = None
                error, level = str(exc), logging.ERROR
            else:
                self.delivered += 1
                log.debug("Event delivered", extra={"event": kind, "event_id": event.event_id})
                return
            delay = backoff.next_delay(retry_after)
            stopping = self._hurry.is_set()
            if stopping:
                delay = min(delay, MAX_RETRY_WHILE_STOPPING)
            log.log(
                level,
                "Event not delivered; will retry",
                extra={"event": kind, "event_id": event.event_id, "error": error, "retry_in_s": round(delay, 3)},
            )
            if stopping:
                await trio.sleep(delay)
            else:
                with trio.move_on_after(delay):
                    await self._hurry.wait()  # a stop cuts a long backoff short
