"""The agent: one root nursery supervising the handshake, the poller, the runner supervisor and the outbox.

Start-up is ordered by the machine: the handshake moves the agent to Ready, which the poller waits for, and the
poller hands accepted registrations to the supervisor through a channel. Every task runs under supervision
(`miglet.supervision`): one that fails with a bug is reported as `internal_error` and restarted, and a job in
progress is left alone. Stopping is one path whatever asks for it (a signal, a `shutdown` command, an ephemeral
runner's end, internal errors that keep recurring): the machine enters Stopping, the work nursery is cancelled
(which stops the runner gracefully), the runner is deregistered if asked, the outbox gets up to
MIGLET_FLUSH_TIMEOUT to deliver what is owed, and the machine ends in Stopped. A second signal cuts the runner's
grace and its removal short, and the flush to a few seconds. A stop that could not deliver every lifecycle event
ends with exit code 3 (`miglet.exitcodes`). docs/design.md draws the whole.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Final

import httpx
import trio
from trio_util import AsyncValue

from miglet import exitcodes, machine, preemption, protocol
from miglet.config import Config
from miglet.controller import ControllerClient, open_controller_client
from miglet.driver import Driver
from miglet.hardening import is_child_subreaper
from miglet.hostinfo import agent_info, host_info
from miglet.logs import AgentContext, agent_context
from miglet.machine import Phase
from miglet.outbox import Outbox, describe
from miglet.preemption import MetadataClient, open_metadata_client
from miglet.retry import RetryPolicy
from miglet.runner.backend import ConfigureFailed, Grace, RunnerBackend
from miglet.runner.hooks import JOB_HOOKS_DIR, JobHooks
from miglet.runner.output import relay_line
from miglet.runner.process import ProcessRunner, kill_leftover_runner
from miglet.runner.reaper import reap_orphans_task, sweep_descendants
from miglet.sdnotify import Notifier
from miglet.secret import Secret
from miglet.stamp import Stamper
from miglet.statefile import StateFileError, StateFileMissing, StateFileWriter, read_state_file
from miglet.status import health
from miglet.stop_signals import STOP_SIGNALS, HeldSignals
from miglet.supervision import TaskSupervisor
from miglet.tasks.handshake import handshake_task
from miglet.tasks.heartbeat import heartbeat_task, state_refresh_task
from miglet.tasks.poller import poller_task
from miglet.tasks.runner_extras import Identities, Warmup
from miglet.tasks.supervisor import supervisor_task
from miglet.timings import PhaseTimings
from miglet.tokenfile import TokenFileError, read_token_file

log = logging.getLogger(__name__)

# After a second signal, the events owed still get this long (against a healthy controller, milliseconds are enough).
CUT_SHORT_FLUSH_S: Final = 3.0
STATE_REFRESH_S: Final = 10.0
REMOVE_TIMEOUT: Final = 60.0
# How many of the events a stop could not deliver are named in its last error line.
MISSING_LISTED: Final = 20
# The phases in which a runner may be running.
RUNNER_PHASES: Final = frozenset({Phase.REGISTERING_RUNNER, Phase.IDLE, Phase.BUSY})
# Before telling the cloud it may take the VM, the events owed (`vm_preempted` first) get this long to go out.
APPROVAL_FLUSH_S: Final = 10.0
# Approvals owed to the cloud get this long to be given once the agent is otherwise done.
APPROVAL_WAIT_S: Final = 5.0


class StopControls:
    """What carries out a stop the machine has decided on: the runner's grace, its removal, the last delivery.

    The decisions (how long a grace, whether to remove, whether to cut it all short) are the machine's
    (`AgentState.stop`); these are only the timers and scopes that act on them.
    """

    def __init__(self, grace: float, flush_timeout: float) -> None:
        self.grace = Grace(grace)
        self.flush_timeout = flush_timeout
        # Around the runner's removal, the one slow step of a stop that a second signal skips.
        self.removing = trio.CancelScope()
        # When the final delivery of what is owed gives up: fixed when it begins, moved closer by a second signal.
        self._flush_deadline: float | None = None
        self._flushing: trio.CancelScope | None = None

    def cut_short(self) -> None:
        """Stop now: kill the runner without waiting out its grace, skip its removal, flush only briefly."""
        self.grace.cut_short()
        self.removing.cancel()
        self.flush_timeout = min(self.flush_timeout, CUT_SHORT_FLUSH_S)
        if self._flush_deadline is not None:
            self._flush_deadline = min(self._flush_deadline, trio.current_time() + CUT_SHORT_FLUSH_S)
            if self._flushing is not None:
                self._flushing.deadline = self._flush_deadline

    async def flush(self, outbox: Outbox) -> None:
        """Wait until `outbox` has delivered everything, until the flush timeout (counted from the first call)."""
        if self._flush_deadline is None:
            self._flush_deadline = trio.current_time() + self.flush_timeout
        self._flushing = trio.move_on_at(self._flush_deadline)
        with self._flushing:
            await outbox.wait_empty()
        self._flushing = None


class Agent:
    """One MIGlet agent; `run` is its whole life."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metadata_transport: httpx.AsyncBaseTransport | None = None,
        backend: RunnerBackend | None = None,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        write_state_file: bool = True,
        handle_signals: bool = True,
        held_signals: HeldSignals | None = None,
        started_at: float | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.stop_controls = StopControls(config.shutdown_grace, config.flush_timeout)
        self.stamper = Stamper(config.vm_id, config.pool_id, config.org_id)
        self.policy = retry_policy or RetryPolicy(base=config.retry_base, cap=config.retry_cap)
        self.outbox = Outbox(self.stamper, capacity=config.outbox_capacity, policy=self.policy, rng=rng)
        self.supervision = TaskSupervisor(report=self.outbox.put, give_up=self._give_up, rng=rng)
        self.driver = Driver(
            vm_id=config.vm_id,
            pool_id=config.pool_id,
            send=self.outbox.put,
            send_first=partial(self.outbox.put, first=True),
            state_file=StateFileWriter(config.state_file) if write_state_file else None,
            refresh_s=STATE_REFRESH_S,
            on_bug=self.supervision.bug,
        )
        self.driver.carry_out = self._carry_out
        # The registrations the machine hands to the runner supervisor; here, so that it outlives a restart of it.
        # The machine hands over one at a time (the next only once the last has an outcome).
        self._registrations, self._registrations_out = trio.open_memory_channel[machine.Register](math.inf)
        self._transport = transport
        self._metadata_transport = metadata_transport
        self._backend = backend
        self._rng = rng
        self._write_state_file = write_state_file
        self._handle_signals = handle_signals
        # Stop signals that came before the agent listened for them (recorded from the start of `miglet run`).
        self._held_signals = held_signals or HeldSignals()
        self._started_at = 0.0
        self._root: trio.Nursery | None = None
        # Approvals of scheduled events owed to the cloud (Azure), which the end of a stop waits for a moment.
        self._approving: AsyncValue[int] = AsyncValue(0)
        self.timings = PhaseTimings(time.monotonic() if started_at is None else started_at)
        # MIGlet's job hooks and their spool, beside the state file (`miglet.runner.hooks`).
        self.job_hooks = JobHooks(config.state_file.parent / JOB_HOOKS_DIR, config.runner_dir, config.runner_user)
        self._warmup: Warmup | None = None
        self.driver.observe(self.timings.observe)
        self._notifier = notifier
        if notifier is not None:
            self.driver.observe(notifier.observe)

    @property
    def phase(self) -> Phase:
        return self.driver.phase

    @property
    def exit_code(self) -> int:
        return self.driver.state.exit_code

    def request_stop(
        self,
        reason: str,
        *,
        grace: float | None = None,
        remove_token: Secret | None = None,
        exit_code: int = exitcodes.OK,
    ) -> None:
        """Begin stopping (idempotent: the first request decides)."""
        self.driver.apply(
            machine.StopRequested(reason=reason, grace_s=grace, remove_token=remove_token, exit_code=exit_code)
        )

    def _carry_out(self, effect: machine.Effect) -> None:
        """The effects of the machine's decisions on the runner and the stop."""
        controls = self.stop_controls
        match effect:
            case machine.Register():
                self._registrations.send_nowait(effect)
            case machine.StopRunner(grace_s=grace):
                # The runner is stopped as the work nursery is cancelled (`_work`), within this grace.
                controls.grace.seconds = grace
            case machine.CutGrace():
                controls.grace.cut_short()
            case machine.CutShort():
                controls.cut_short()
            case machine.ShortenGrace(seconds=seconds):
                controls.grace.shorten(seconds)
            case machine.StopJobIn(seconds=seconds, grace_s=grace):
                if self._root is not None:
                    self._root.start_soon(self._preemption_due, seconds, grace)

    async def _watch_preemption(self, provider: protocol.Provider) -> None:
        endpoint = self.config.effective_metadata_endpoint
        assert endpoint is not None
        async with open_metadata_client(endpoint, self._metadata_transport) as http:
            await preemption.watch(
                provider, MetadataClient(http), self._on_notice, self._runner_stopped, self._approving
            )

    def _on_notice(self, notice: preemption.Notice) -> None:
        deadline = notice.deadline
        left = None if deadline is None or notice.as_stop else (deadline - datetime.now(UTC)).total_seconds()
        self.driver.apply(
            machine.PreemptionNoticed(
                provider=notice.provider,
                action=notice.action,
                deadline=None if deadline is None else deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
                seconds_left=left,
            )
        )

    async def _runner_stopped(self) -> None:
        """Return once no runner runs (and cannot start), and the controller has had a chance to hear why."""
        await self.driver.wait_for(
            lambda state: state.phase not in RUNNER_PHASES and not state.listening and state.runner_pid is None
        )
        with trio.move_on_after(APPROVAL_FLUSH_S):
            await self.outbox.wait_empty()

    async def _preemption_due(self, seconds: float, grace: float) -> None:
        await trio.sleep(seconds)
        self.driver.apply(machine.PreemptionDue(grace))

    def _give_up(self) -> None:
        """Tasks keep failing: stop the ordinary way (the runner is stopped, events delivered), with exit code 1.

        A stop already under way for another reason goes on as it is, with its own exit code.
        """
        self.request_stop("internal_error", exit_code=exitcodes.FAILURE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until stopped; returns the process exit code."""
        config = self.config
        self._started_at = trio.current_time()
        token = agent_context.set(AgentContext(config.vm_id, config.pool_id, lambda: self.driver.phase.value))
        try:
            if self._write_state_file:
                self._clear_leftovers()
            backend = self._backend or ProcessRunner(
                config.runner_dir,
                grace=lambda: self.stop_controls.grace,
                user=config.runner_user,
                on_pid=lambda pid: self.driver.apply(machine.RunnerProcess(pid)),
                prepare_run=self._prepare_run,
            )
            if config.runner_warmup == "auto":
                self._warmup = Warmup(backend, self.timings)
            token_source = None if config.controller_token_file is None else self._reread_token
            async with (
                open_controller_client(config, self._transport, token_source) as client,
                trio.open_nursery() as root,
            ):
                self._root = root
                supervise = self.supervision.run
                if self._handle_signals:
                    root.start_soon(supervise, "signals", self._watch_signals)
                if self._notifier is not None and self._notifier.watchdog_s is not None:
                    root.start_soon(supervise, "watchdog", self._notifier.watchdog)
                if is_child_subreaper():  # `miglet run`: orphans of the runner come to this process
                    root.start_soon(supervise, "reaper", reap_orphans_task)
                root.start_soon(supervise, "outbox", partial(self._serve_outbox, client))
                root.start_soon(supervise, "state_refresh", partial(state_refresh_task, self.driver, STATE_REFRESH_S))
                if config.preemption != "off":
                    # In the root nursery: an approval owed to the cloud is still given while the agent stops.
                    root.start_soon(supervise, "preemption", partial(self._watch_preemption, config.preemption))
                self.driver.apply(
                    machine.Start(
                        runner_name=config.effective_runner_name,
                        ephemeral=config.ephemeral,
                        grace_s=config.shutdown_grace,
                        margin_s=config.preemption_margin,
                    )
                )
                task_status.started()
                try:
                    await self._work(config, client, backend)
                except Exception as exc:
                    # Supervision keeps bugs inside the tasks; should one get out all the same, the tasks (and the
                    # runner with them) are gone, and what is left is to finish the stop as any stop is finished.
                    self.supervision.bug("agent", exc)
                    self._give_up()
                await self._finish(backend)
                with trio.move_on_after(APPROVAL_WAIT_S):
                    await self._approving.wait_value(0)
                root.cancel_scope.cancel()
        finally:
            agent_context.reset(token)
        return self.exit_code

    async def _work(self, config: Config, client: ControllerClient, backend: RunnerBackend) -> None:
        """The handshake, the poller, the runner supervisor, heartbeats and deadlines, until the agent is stopping.

        Each task runs under supervision: one that fails with a bug is reported and restarted, and the others
        (with the runner and its job) go on.
        """
        supervise = self.supervision.run
        on_bug = self.supervision.bug
        driver = self.driver
        # What the agent and its VM are; a fact that cannot be read is left out, and never fails the handshake.
        agent = agent_info(preemption=config.preemption != "off", job_identity=config.job_identity)
        announced = protocol.VmStarted(agent=agent, host=host_info())
        vm_started = self.stamper.stamp(announced)
        async with trio.open_nursery() as work:
            work.start_soon(
                supervise, "handshake", partial(handshake_task, client, driver, vm_started, self.policy, self._rng)
            )
            work.start_soon(supervise, "poller", partial(poller_task, config, client, driver, self.policy, self._rng))
            identities = Identities(self.job_hooks, driver) if config.job_identity else None
            run_runner = partial(
                supervisor_task,
                config,
                driver,
                backend,
                self._registrations_out,
                self.timings,
                on_bug=on_bug,
                identities=identities,
            )
            work.start_soon(supervise, "runner_supervisor", run_runner)
            if identities is not None:
                work.start_soon(supervise, "job_identity", identities.watch)
            if self._warmup is not None:
                work.start_soon(supervise, "warmup", partial(self._warmup.run, driver))
            heartbeats = partial(heartbeat_task, driver, self.outbox, config.heartbeat_interval, self._started_at)
            work.start_soon(supervise, "heartbeat", heartbeats)
            self._start_deadlines(work)
            await driver.wait_for(lambda state: state.phase is Phase.STOPPING)
            self.outbox.hurry()
            self.supervision.hurry()
            work.cancel_scope.cancel()

    def _prepare_run(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Just before run.sh starts: MIGlet's job hooks, or the operator's put back when job identity is off."""
        if self.config.job_identity:
            return self.job_hooks.prepare(environ)
        self.job_hooks.restore()
        return {}

    async def _serve_outbox(self, client: ControllerClient) -> None:
        """Deliver events once `vm_started` has been acknowledged (or the agent stops without it): nothing goes
        to the controller before the VM has introduced itself."""
        await self.driver.wait_for(lambda state: state.phase not in machine.BEFORE_ACKNOWLEDGMENT)
        await self.outbox.serve(client)

    def _reread_token(self) -> Secret | None:
        """The controller token as MIGLET_CONTROLLER_TOKEN_FILE holds it now (None, logged, when unusable)."""
        path = self.config.controller_token_file
        assert path is not None
        try:
            return read_token_file(path)
        except TokenFileError as exc:
            log.error(
                "Cannot read MIGLET_CONTROLLER_TOKEN_FILE again; keeping the token in use", extra={"error": str(exc)}
            )
            return None

    def _clear_leftovers(self) -> None:
        """A runner still running from an earlier MIGlet (its state file says which) would hold the runner
        directory and take jobs nobody reports: stop it before starting afresh."""
        try:
            previous = read_state_file(self.config.state_file)
        except StateFileMissing:
            return
        except StateFileError as exc:
            # It will be overwritten; all it could have told is whether a runner was left running.
            log.warning(
                "Ignoring an unusable state file", extra={"path": str(self.config.state_file), "error": str(exc)}
            )
            return
        pid = previous.runner_pid
        if pid is None or previous.pid == os.getpid():
            return
        if health(previous) is None:
            # Its agent still runs and keeps the file fresh: two agents on one state file is a mistake of
            # configuration, and killing the other's runner would cost its job.
            log.error(
                "Another MIGlet is running with this state file; leaving its runner alone",
                extra={"path": str(self.config.state_file), "pid": previous.pid},
            )
            return
        if kill_leftover_runner(pid, self.config.runner_dir):
            log.warning("Killed a runner left running by an earlier MIGlet", extra={"pid": pid})

    def _start_deadlines(self, nursery: trio.Nursery) -> None:
        """Limits on how long the agent may stay in a phase at a stretch (0: none); what passing one means is the
        machine's to decide (`machine.DEADLINES`)."""
        config = self.config
        limits = {
            Phase.WAITING_FOR_CONTROLLER: config.ack_timeout,
            Phase.READY: config.registration_timeout,
            Phase.IDLE: config.idle_timeout,
        }
        for phase, seconds in limits.items():
            if seconds > 0:
                name, _ = machine.DEADLINES[phase]
                nursery.start_soon(self.supervision.run, name, partial(self._deadline, phase, seconds))

    async def _deadline(self, phase: Phase, seconds: float) -> None:
        """Tell the machine once the agent has stayed in `phase` for `seconds` at a stretch (again, should the
        phase have changed in the same moment)."""
        while True:
            await self.driver.wait_for(lambda state: state.phase is phase, held_for=seconds)
            if self.driver.apply(machine.DeadlinePassed(phase, seconds)).accepted:
                return
            await trio.lowlevel.checkpoint()

    async def _finish(self, backend: RunnerBackend) -> None:
        """After the runner has stopped: deregister if asked, flush owed events, and record Stopped."""
        controls = self.stop_controls
        plan = self.driver.state.stop
        if self._backend is None:
            # The runner's .env as the operator left it, should the runner be started without MIGlet after this:
            # first, before anything slow (a removal, the last delivery) that the end of a stop could cut short.
            self.job_hooks.restore()
        with controls.removing:
            if plan is not None and plan.remove_token is not None and not plan.cut_short:
                with trio.move_on_after(REMOVE_TIMEOUT) as scope:
                    try:
                        await backend.remove(plan.remove_token, relay_line)
                        log.info("Runner removed")
                    except ConfigureFailed as exc:
                        log.error("Runner removal failed", extra={"error": str(exc)})
                if scope.cancelled_caught:
                    log.error("Runner removal timed out", extra={"timeout_s": REMOVE_TIMEOUT})
        if controls.removing.cancelled_caught or (plan is not None and plan.remove_token and plan.cut_short):
            log.warning("Second signal: the runner is not removed")
        await controls.flush(self.outbox)
        # Whatever escaped the sweeps after each runner process (it started while the runner was being removed,
        # say) goes now: nothing the runner started outlives MIGlet.
        await sweep_descendants()
        self.driver.apply(machine.Finished())
        if len(self.outbox):
            # Stopped can still owe something (a job the runner never finished): it gets what is left of the time.
            await controls.flush(self.outbox)
        owed = self.outbox.owed()
        if owed:
            log.error(
                "Stopping without delivering every event owed to the controller",
                extra={
                    "missing": [describe(event) for event in owed[:MISSING_LISTED]],
                    "missing_count": self.outbox.owed_count(),
                    "flush_timeout_s": self.config.flush_timeout,
                },
            )
            self.driver.apply(machine.Undelivered())
        elif len(self.outbox):
            log.warning("Stopping with undelivered heartbeats or reports", extra={"undelivered": len(self.outbox)})
        log.info("MIGlet stopped", extra={"exit_code": self.exit_code})

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for signum in self._held_signals.take():
                self.driver.apply(machine.SignalReceived(signal.Signals(signum).name))
            async for signum in signals:
                self.driver.apply(machine.SignalReceived(signal.Signals(signum).name))
