"""The agent: one root nursery supervising the handshake, the poller, the runner supervisor and the outbox.

Start-up is ordered by the machine: the handshake moves the agent to Ready, which the poller waits for, and the
poller hands accepted registrations to the supervisor through a channel. Stopping is one path whatever asks for
it (a signal, a `shutdown` command, an ephemeral runner's end): the machine enters Stopping, the work nursery is
cancelled (which stops the runner gracefully), the runner is deregistered if asked, the outbox gets a bounded
time to flush, and the machine ends in Stopped. A second signal cuts every wait in that path short. A task that
fails with an unexpected error stops the agent the same way (exit code 1), so the runner is still stopped and
the events owed are still delivered.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import httpx
import msgspec
import trio

from miglet import machine, protocol
from miglet.config import Config
from miglet.controller import ControllerClient, open_controller_client
from miglet.logs import AgentContext, agent_context
from miglet.machine import Phase
from miglet.outbox import Outbox
from miglet.retry import RetryPolicy
from miglet.runner.backend import ConfigureFailed, Grace, RunnerBackend
from miglet.runner.output import relay_line
from miglet.runner.process import ProcessRunner, kill_leftover_runner
from miglet.secret import Secret
from miglet.stamp import Stamper
from miglet.state import StateHolder
from miglet.statefile import StateFileWriter, read_state_file
from miglet.tasks.deadlines import phase_deadline_task
from miglet.tasks.handshake import handshake_task
from miglet.tasks.heartbeat import heartbeat_task, state_refresh_task
from miglet.tasks.poller import poller_task
from miglet.tasks.supervisor import supervisor_task
from miglet.timings import PhaseTimings

log = logging.getLogger(__name__)

# After a second signal, the events owed still get this long (against a healthy controller, milliseconds are enough).
CUT_SHORT_FLUSH_S: Final = 3.0
STATE_REFRESH_S: Final = 10.0
REMOVE_TIMEOUT: Final = 60.0


class StopPlan:
    """How to stop, as decided by whoever asked first: the grace period, a removal token, the exit code."""

    def __init__(self, grace: float, flush_timeout: float) -> None:
        self.grace = Grace(grace)
        self.remove_token: Secret | None = None
        self.exit_code = 0
        self.flush_timeout = flush_timeout
        # Around the runner's removal, the one slow step of a stop that a second signal skips.
        self.removing = trio.CancelScope()
        # Around the final delivery of what is owed, once it has begun.
        self.flushing: trio.CancelScope | None = None

    def cut_short(self) -> None:
        """Stop now: kill the runner without waiting out its grace, skip its removal, flush only briefly."""
        self.grace.cut_short()
        self.removing.cancel()
        self.flush_timeout = min(self.flush_timeout, CUT_SHORT_FLUSH_S)
        if self.flushing is not None:
            self.flushing.deadline = min(self.flushing.deadline, trio.current_time() + CUT_SHORT_FLUSH_S)

    async def flush(self, outbox: Outbox) -> None:
        """Wait until `outbox` has delivered everything, for at most the flush timeout."""
        with trio.move_on_after(self.flush_timeout) as self.flushing:
            await outbox.wait_empty()


class Agent:
    """One MIGlet agent; `run` is its whole life."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backend: RunnerBackend | None = None,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        write_state_file: bool = True,
        handle_signals: bool = True,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        self.stop_plan = StopPlan(config.shutdown_grace, config.flush_timeout)
        self.stamper = Stamper(config.vm_id, config.pool_id, config.org_id)
        self.policy = retry_policy or RetryPolicy(base=config.retry_base, cap=config.retry_cap)
        self.outbox = Outbox(self.stamper, capacity=config.outbox_capacity, policy=self.policy, rng=rng)
        self.holder = StateHolder(
            vm_id=config.vm_id,
            pool_id=config.pool_id,
            emit=self.outbox.put,
            state_file=StateFileWriter(config.state_file) if write_state_file else None,
            refresh_s=STATE_REFRESH_S,
        )
        self._transport = transport
        self._backend = backend
        self._rng = rng
        self._handle_signals = handle_signals
        self._started_at = 0.0
        self.timings = PhaseTimings(time.monotonic() if started_at is None else started_at)
        self.holder.observers.append(self.timings.observe)

    @property
    def phase(self) -> Phase:
        return self.holder.phase

    def request_stop(
        self,
        reason: str,
        *,
        grace: float | None = None,
        remove_token: Secret | None = None,
        exit_code: int = 0,
    ) -> None:
        """Begin stopping (idempotent: the first request decides)."""
        if self.holder.phase in (Phase.STOPPING, Phase.STOPPED):
            log.info("Already stopping", extra={"reason": reason})
            return
        if grace is not None:
            self.stop_plan.grace.seconds = grace
        self.stop_plan.remove_token = remove_token
        self.stop_plan.exit_code = exit_code
        log.info("Stopping", extra={"reason": reason, "grace_s": self.stop_plan.grace.seconds})
        self.holder.apply(machine.StopRequested(reason))

    def _on_shutdown_command(self, command: protocol.Shutdown) -> None:
        params = command.parameters
        remove_token = params.remove_token
        if remove_token is not None and (problem := protocol.token_problem(remove_token)) is not None:
            # Whoever asks for a stop expects the VM to stop: only the removal is given up, and the controller
            # hears why.
            error = f"remove_token {problem}; the runner is not removed"
            log.error("Unusable shutdown command parameter", extra={"command_id": command.id, "error": error})
            self.outbox.put(protocol.CommandFailed(command_id=command.id, command_type="shutdown", error=error))
            remove_token = None
        self.request_stop(params.reason, grace=params.grace_period_s, remove_token=remove_token)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until stopped; returns the process exit code."""
        config = self.config
        self._started_at = trio.current_time()
        token = agent_context.set(AgentContext(config.vm_id, config.pool_id, lambda: self.holder.phase.value))
        try:
            if self._backend is None:
                self._clear_leftovers()
            backend = self._backend or ProcessRunner(
                config.runner_dir, grace=lambda: self.stop_plan.grace, user=config.runner_user
            )
            async with open_controller_client(config, self._transport) as client, trio.open_nursery() as root:
                if self._handle_signals:
                    root.start_soon(self._watch_signals)
                root.start_soon(self.outbox.serve, client)
                root.start_soon(state_refresh_task, self.holder, STATE_REFRESH_S)
                self.holder.apply(machine.Start(runner_name=config.effective_runner_name, ephemeral=config.ephemeral))
                task_status.started()
                try:
                    await self._work(config, client, backend)
                except Exception:
                    # Raised while the tasks were being torn down: the runner has been stopped with them.
                    self._failed()
                    self.outbox.hurry()
                await self._finish(backend)
                root.cancel_scope.cancel()
        finally:
            agent_context.reset(token)
        return self.stop_plan.exit_code

    async def _work(self, config: Config, client: ControllerClient, backend: RunnerBackend) -> None:
        """The handshake, the poller, the supervisor, heartbeats and deadlines, until the agent is stopping."""
        async with trio.open_nursery() as work:
            send, receive = trio.open_memory_channel[protocol.RegisterRunner](0)
            work.start_soon(self._guarded, handshake_task, client, self.holder, self.stamper, self.policy, self._rng)
            work.start_soon(
                self._guarded,
                poller_task,
                config,
                client,
                self.holder,
                self.outbox,
                send,
                self._on_shutdown_command,
                self.policy,
                self._rng,
            )
            work.start_soon(self._guarded, supervisor_task, config, self.holder, backend, receive, self.timings)
            work.start_soon(
                self._guarded, heartbeat_task, self.holder, self.outbox, config.heartbeat_interval, self._started_at
            )
            self._start_deadlines(work)
            await self.holder.value.wait_value(lambda state: state.phase is Phase.STOPPING)
            self.outbox.hurry()
            work.cancel_scope.cancel()

    async def _guarded(self, task: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run one of the agent's tasks; if it fails, stop the agent the ordinary way.

        A failure here is a bug, not a fault of the controller or the runner (those are handled where they
        occur). The other tasks go on until the stop cancels them, so the runner is stopped while the machine
        is Stopping, and the events owed are delivered as on any stop.
        """
        try:
            await task(*args)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        log.critical("A task of the agent failed; stopping", exc_info=True)
        self.request_stop("internal_error")
        self.stop_plan.exit_code = 1

    def _clear_leftovers(self) -> None:
        """A runner still running from an earlier MIGlet (its state file says which) would hold the runner
        directory and take jobs nobody reports: stop it before starting afresh."""
        try:
            previous = read_state_file(self.config.state_file)
        except (OSError, msgspec.DecodeError):
            return
        pid = previous.runner_pid
        if pid is not None and previous.pid != os.getpid() and kill_leftover_runner(pid, self.config.runner_dir):
            log.warning("Killed a runner left running by an earlier MIGlet", extra={"pid": pid})

    def _start_deadlines(self, nursery: trio.Nursery) -> None:
        config = self.config
        deadlines = [
            (Phase.WAITING_FOR_CONTROLLER, config.ack_timeout, "ack_timeout", 1),
            (Phase.READY, config.registration_timeout, "registration_timeout", 1),
            (Phase.IDLE, config.idle_timeout, "idle_timeout", 0),
        ]
        for phase, seconds, reason, exit_code in deadlines:
            nursery.start_soon(
                self._guarded,
                phase_deadline_task,
                self.holder,
                phase,
                seconds,
                partial(self.request_stop, reason, exit_code=exit_code),
            )

    async def _finish(self, backend: RunnerBackend) -> None:
        """After the runner has stopped: deregister if asked, flush owed events, and record Stopped."""
        plan = self.stop_plan
        with plan.removing:
            if plan.remove_token is not None:
                with trio.move_on_after(REMOVE_TIMEOUT) as scope:
                    try:
                        await backend.remove(plan.remove_token, relay_line)
                        log.info("Runner removed")
                    except ConfigureFailed as exc:
                        log.error("Runner removal failed", extra={"error": str(exc)})
                if scope.cancelled_caught:
                    log.error("Runner removal timed out", extra={"timeout_s": REMOVE_TIMEOUT})
        if plan.removing.cancelled_caught:
            log.warning("Second signal: the runner is not removed")
        await plan.flush(self.outbox)
        if len(self.outbox):
            log.error("Stopping with undelivered events", extra={"undelivered": len(self.outbox)})
        self.holder.apply(machine.Finished())
        log.info("MIGlet stopped", extra={"exit_code": self.stop_plan.exit_code})

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            received = 0
            async for signum in signals:
                name = signal.Signals(signum).name
                received += 1
                if received > 1:
                    # Asked again: the operator is not prepared to wait any longer.
                    log.warning("Second signal: killing the runner now", extra={"signal": name})
                    self.stop_plan.cut_short()
                elif self.holder.phase in (Phase.STOPPING, Phase.STOPPED):
                    # Already stopping for another reason (a shutdown command, the end of an ephemeral runner):
                    # whoever sends the signal is not prepared to wait out the runner's grace period either.
                    log.warning("Signal while stopping: killing the runner now", extra={"signal": name})
                    self.stop_plan.grace.cut_short()
                else:
                    log.info("Received signal", extra={"signal": name})
                    self.request_stop("signal")
