"""The command-poller task: fetch the controller's commands from Ready on, and route each one.

Polling starts the moment the agent is Ready and then repeats at most every `poll_interval`; with long-poll
(`command_wait` > 0) each request asks the controller to hold it until a command exists, and the next starts
when the previous ends or the interval has passed, whichever is later. A plain controller thus sees the seed's
cadence, and a long-poll controller's command arrives the moment it exists.

The task is restartable: the commands already handled (`SeenCommands`) and the channel to the runner supervisor
belong to the caller, and a command whose handling fails with a bug is reported rather than lost.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal

import trio

from miglet import machine, protocol
from miglet.config import Config
from miglet.controller import ControllerClient, ControllerError, retry_after_of
from miglet.machine import Phase
from miglet.outbox import Outbox
from miglet.retry import Backoff, RetryPolicy
from miglet.state import StateHolder
from miglet.supervision import BugReport, error_text, log_bug

log = logging.getLogger(__name__)

SEEN_COMMANDS_KEPT: Final = 4096
MAX_PENDING_REGISTRATIONS: Final = 16


class SeenCommands:
    """Command ids already handled, so a command repeated by the controller is acted on once."""

    def __init__(self, capacity: int = SEEN_COMMANDS_KEPT) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def first_time(self, command_id: str) -> bool:
        if command_id in self._ids:
            return False
        self._ids[command_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


async def poller_task(
    config: Config,
    client: ControllerClient,
    holder: StateHolder,
    outbox: Outbox,
    registrations: trio.MemorySendChannel[protocol.RegisterRunner],
    request_stop: Callable[[protocol.Shutdown], None],
    policy: RetryPolicy,
    rng: random.Random | None = None,
    *,
    seen: SeenCommands | None = None,
    on_bug: BugReport = log_bug,
) -> None:
    await holder.value.wait_value(lambda state: state.phase not in machine.BEFORE_ACKNOWLEDGMENT)
    pending_send, pending_receive = trio.open_memory_channel[protocol.RegisterRunner](MAX_PENDING_REGISTRATIONS)
    router = _Router(holder, outbox, pending_send, request_stop, seen or SeenCommands(), on_bug)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_dispatch_registrations, holder, outbox, pending_receive, registrations)
        await _poll(config, client, holder, router, policy, rng)
        nursery.cancel_scope.cancel()


async def _poll(
    config: Config,
    client: ControllerClient,
    holder: StateHolder,
    router: _Router,
    policy: RetryPolicy,
    rng: random.Random | None,
) -> None:
    """Poll until the agent stops, handing each answer to the router."""
    announced = False
    backoff = Backoff(policy, rng)
    while holder.phase not in (Phase.STOPPING, Phase.STOPPED):
        if holder.phase is Phase.READY:
            if not announced:
                log.info("MIGlet is ready - polling controller for registration config")
                announced = True
        else:
            announced = False
        started = trio.current_time()
        try:
            batch = await client.get_commands(config.command_wait)
        except (ControllerError, protocol.ProtocolError) as exc:
            delay = max(config.poll_interval, backoff.next_delay(retry_after_of(exc)))
            log.warning(
                "Command poll failed; will retry",
                extra={"error": str(exc), "attempt": backoff.attempts, "retry_in_s": round(delay, 3)},
            )
            await trio.sleep(delay)
            continue
        backoff.reset()
        router.route(batch)
        await trio.sleep_until(started + config.poll_interval)


async def _dispatch_registrations(
    holder: StateHolder,
    outbox: Outbox,
    pending: trio.MemoryReceiveChannel[protocol.RegisterRunner],
    registrations: trio.MemorySendChannel[protocol.RegisterRunner],
) -> None:
    """Hand registrations to the supervisor one at a time, in the order they came.

    One that follows a registration still in progress waits for its outcome: a failed one leaves the agent
    Ready for the next, a successful one means the next is refused. Polling goes on meanwhile, so a
    `shutdown` is never held up behind a slow `config.sh`.
    """
    waiting: protocol.RegisterRunner | None = None
    async with pending:
        try:
            async for command in pending:
                waiting = command
                await holder.value.wait_value(lambda state: state.phase is not Phase.REGISTERING_RUNNER)
                if holder.apply(machine.RegistrationReceived(command.id)):
                    await registrations.send(command)
                elif holder.phase in (Phase.STOPPING, Phase.STOPPED):
                    _refuse(outbox, command.id, "the agent is stopping")
                else:
                    _refuse(outbox, command.id, f"cannot register a runner while {holder.phase.value}")
                waiting = None
        finally:
            # Stopping, or a bug interrupted the hand-over: the controller still hears that these will not be
            # carried out, and a registration accepted but never handed over does not hold the agent in
            # RegisteringRunner.
            why = _interrupted(holder)
            if waiting is not None:
                # Told by the state rather than by how far this code got: the machine may have taken the command
                # even though applying it raised (in an observer, say).
                state = holder.state
                taken = state.phase is Phase.REGISTERING_RUNNER and state.command_id == waiting.id
                if not (taken and holder.apply(machine.RegistrationAborted(waiting.id, "internal_error", why))):
                    _refuse(outbox, waiting.id, why)
            while True:
                try:
                    _refuse(outbox, pending.receive_nowait().id, why)
                except (trio.WouldBlock, trio.EndOfChannel):
                    break


def _interrupted(holder: StateHolder) -> str:
    if holder.phase in (Phase.STOPPING, Phase.STOPPED):
        return "the agent is stopping"
    return "an internal error interrupted it; send it again, with a new id"


def _refuse(outbox: Outbox, command_id: str, error: str) -> None:
    log.warning("Refusing register_runner command", extra={"command_id": command_id, "error": error})
    outbox.put(protocol.CommandFailed(command_id=command_id, command_type="register_runner", error=error))


class _Router:
    def __init__(
        self,
        holder: StateHolder,
        outbox: Outbox,
        registrations: trio.MemorySendChannel[protocol.RegisterRunner],
        request_stop: Callable[[protocol.Shutdown], None],
        seen: SeenCommands,
        on_bug: BugReport,
    ) -> None:
        self._holder = holder
        self._outbox = outbox
        self._registrations = registrations
        self._request_stop = request_stop
        self._seen = seen
        self._on_bug = on_bug

    def route(self, batch: protocol.CommandBatch) -> None:
        for rejected in batch.rejected:
            self._reject(rejected)
        for command in batch.commands:
            if not self._seen.first_time(command.id):
                log.info("Ignoring a command seen before", extra={"command_id": command.id})
                continue
            try:
                self._route_one(command)
            except Exception as exc:
                # A bug: the command is lost to the agent, but the controller hears of it.
                self._on_bug("poller", exc)
                self._outbox.put(
                    protocol.CommandFailed(
                        command_id=command.id,
                        command_type=_type_of(command),
                        error=f"internal error: {type(exc).__name__}: {error_text(exc)}",
                    )
                )

    def _route_one(self, command: protocol.Command) -> None:
        match command:
            case protocol.RegisterRunner():
                log.info("Received register_runner command from controller", extra={"command_id": command.id})
                try:
                    self._registrations.send_nowait(command)
                except trio.WouldBlock:
                    _refuse(self._outbox, command.id, "too many registrations pending")
            case protocol.Shutdown():
                log.info("Received shutdown command from controller", extra={"command_id": command.id})
                self._request_stop(command)

    def _reject(self, rejected: protocol.RejectedCommand) -> None:
        log.warning(
            "Rejected a command from the controller",
            extra={"command_id": rejected.id, "command_type": rejected.type, "error": rejected.error},
        )
        if rejected.id is None or not self._seen.first_time(rejected.id):
            return
        if rejected.type == "register_runner":
            self._outbox.put(
                protocol.RegistrationFailed(command_id=rejected.id, reason="invalid_command", error=rejected.error)
            )
        else:
            self._outbox.put(
                protocol.CommandFailed(command_id=rejected.id, command_type=rejected.type or "", error=rejected.error)
            )


def _type_of(command: protocol.Command) -> Literal["register_runner", "shutdown"]:
    return "register_runner" if isinstance(command, protocol.RegisterRunner) else "shutdown"
