"""The event outbox: every event the agent owes the controller leaves here, in order.

Tasks put events without waiting; one task delivers them, retrying what the controller could not take. An event
stays queued until the controller has answered 2xx (or refused it outright), so a controller that is down for
minutes loses nothing; a retry carries the same `event_id`, so a controller can drop a duplicate whose first
answer was lost. The queue is bounded by dropping heartbeats first; lifecycle events are never dropped.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Final

import trio
from trio_util import AsyncValue

from miglet import protocol
from miglet.controller import ControllerClient, ControllerRejected, ControllerUnavailable
from miglet.retry import RetryPolicy
from miglet.stamp import Stamper

log = logging.getLogger(__name__)

# While the agent stops, a failed delivery is retried at least this often, to fit the bounded flush.
MAX_RETRY_WHILE_STOPPING: Final = 1.0


class Outbox:
    """An ordered queue of stamped events and the task that delivers them."""

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
        self._length = AsyncValue(0)
        self._hurry = trio.Event()
        # Every event put is, at any time, exactly one of: delivered, dropped, or still queued.
        self.stamped = 0
        self.delivered = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def queued(self) -> list[protocol.AnyEvent]:
        """The events not yet delivered, oldest first."""
        return list(self._queue)

    def put(self, event: protocol.AnyEvent) -> protocol.AnyEvent:
        """Queue `event` (stamped here) for delivery; never blocks."""
        stamped = self._stamper.stamp(event)
        self.stamped += 1
        if len(self._queue) >= self._capacity and not self._make_room(stamped):
            return stamped
        self._queue.append(stamped)
        self._length.value = len(self._queue)
        return stamped

    def _make_room(self, incoming: protocol.AnyEvent) -> bool:
        """Drop the oldest waiting heartbeat to fit `incoming`; False when `incoming` itself is dropped."""
        # The head may be in flight, so it is never the one dropped.
        for index, queued in enumerate(self._queue):
            if index > 0 and isinstance(queued, protocol.Heartbeat):
                del self._queue[index]
                self._note_drop(queued)
                return True
        if isinstance(incoming, protocol.Heartbeat):
            self._note_drop(incoming)
            return False
        # Lifecycle events are never dropped: the bound gives way (they are few by nature).
        return True

    def _note_drop(self, event: protocol.AnyEvent) -> None:
        self.dropped += 1
        log.warning("Outbox full: dropped a heartbeat", extra={"event_id": event.event_id})

    def hurry(self) -> None:
        """The agent is stopping: what is owed must go out in the little time left.

        Queued heartbeats are dropped (they say nothing any more), and a retry waiting out a long backoff tries
        again now; further retries wait at most MAX_RETRY_WHILE_STOPPING.
        """
        for queued in list(self._queue)[1:]:
            if isinstance(queued, protocol.Heartbeat):
                self._queue.remove(queued)
                self.dropped += 1
        self._length.value = len(self._queue)
        self._hurry.set()

    async def wait_empty(self) -> None:
        await self._length.wait_value(0)

    async def serve(self, client: ControllerClient) -> None:
        """Deliver queued events in order, forever; run it in the nursery that outlives the other tasks."""
        while True:
            await self._length.wait_value(lambda n: n > 0)
            event = self._queue[0]
            await self._deliver(client, event)
            self._queue.popleft()
            self._length.value = len(self._queue)

    async def _deliver(self, client: ControllerClient, event: protocol.AnyEvent) -> None:
        kind = type(event).__struct_config__.tag
        attempt = 0
        while True:
            try:
                await client.post_event(event)
            except (ControllerUnavailable, protocol.ProtocolError) as exc:
                retry_after = exc.retry_after if isinstance(exc, ControllerUnavailable) else None
                delay = self._policy.delay(attempt, self._rng, retry_after=retry_after)
                stopping = self._hurry.is_set()
                if stopping:
                    delay = min(delay, MAX_RETRY_WHILE_STOPPING)
                log.warning(
                    "Event not delivered; will retry",
                    extra={"event": kind, "event_id": event.event_id, "error": str(exc), "retry_in_s": round(delay, 3)},
                )
                attempt += 1
                if stopping:
                    await trio.sleep(delay)
                else:
                    with trio.move_on_after(delay):
                        await self._hurry.wait()  # a stop cuts a long backoff short
                continue
            except ControllerRejected as exc:
                log.error(
                    "Controller refused event; dropping it",
                    extra={"event": kind, "event_id": event.event_id, "error": str(exc)},
                )
                self.dropped += 1
                return
            self.delivered += 1
            log.debug("Event delivered", extra={"event": kind, "event_id": event.event_id})
            return
