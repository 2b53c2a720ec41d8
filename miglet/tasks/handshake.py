"""The controller-handshake task: announce the VM with `vm_started` until the controller acknowledges it.

The VM is useless until acknowledged, so every failure (network, 5xx, a refusal, an answer that does not
acknowledge) is logged and tried again with backoff. The event is stamped by the caller, so that every try, also
after a restart of this task, carries the same `event_id`.
"""

from __future__ import annotations

import logging
import random

import trio

from miglet import machine, protocol
from miglet.controller import ControllerClient, ControllerError, ControllerRejected, retry_after_of
from miglet.driver import Driver
from miglet.machine import Phase
from miglet.retry import Backoff, RetryPolicy
from miglet.secret import redact

log = logging.getLogger(__name__)


async def handshake_task(
    client: ControllerClient,
    driver: Driver,
    event: protocol.VmStarted,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> None:
    """Return once the controller has acknowledged `vm_started` (at once when it already has)."""
    if driver.phase is not Phase.WAITING_FOR_CONTROLLER:
        return
    backoff = Backoff(policy, rng)
    while True:
        retry_after: float | None = None
        refused = False
        try:
            body = await client.post_event(event, read_answer=True)
            ack = protocol.decode_acknowledgment(body)
        except (ControllerError, protocol.ProtocolError) as exc:
            retry_after = retry_after_of(exc)
            refused = isinstance(exc, ControllerRejected)
            problem = str(exc)
        else:
            if ack.is_acknowledged:
                break
            # Masked before repr(), whose escaping could hide a secret from the mask.
            status, message = (None if text is None else redact(text) for text in (ack.status, ack.message))
            problem = f"controller did not acknowledge vm_started (status={status!r}, message={message!r})"
        delay = backoff.next_delay(retry_after)
        # A refusal (401, 403, 404...) will not go away by itself: someone has to fix the token or the controller.
        level = logging.ERROR if refused else logging.WARNING
        log.log(
            level,
            "vm_started not acknowledged; will retry",
            extra={
                "event_id": event.event_id,
                "error": problem,
                "attempt": backoff.attempts,
                "retry_in_s": round(delay, 3),
            },
        )
        await trio.sleep(delay)
    driver.apply(machine.Acknowledged())
