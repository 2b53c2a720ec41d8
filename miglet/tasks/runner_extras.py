"""Two helpers of the runner supervisor: the warmup while the agent waits in Ready, and the job hooks' spool.

The warmup (`./bin/Runner.Listener warmup`) loads and compiles the runner's code before a registration comes, so
that config.sh and run.sh start from a warm page cache. It runs once, in the first Ready, at the lowest CPU
priority, a second after the agent became Ready (a registration that comes sooner finds nothing to stop), and is
stopped the moment the agent leaves Ready: a registration never waits for it
(docs/benchmarks.md measures stopping it against letting it finish). How long it ran is reported among the
phase timings as `warmup_s`.

The spool watcher reads what the runner's job hooks hand over (`miglet.runner.hooks`) while a job runs, and
feeds it to the machine, which sends `job_identified`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import trio

from miglet import machine
from miglet.driver import Driver
from miglet.machine import BEFORE_ACKNOWLEDGMENT, Phase
from miglet.runner.backend import ConfigureFailed, RunnerBackend
from miglet.runner.hooks import Handover, JobHooks
from miglet.timings import PhaseTimings

log = logging.getLogger(__name__)

# The warmup starts once the agent has waited this long in Ready, so that it never competes with a registration
# that was waiting for the VM.
WARMUP_AFTER_S: Final = 1.0
# A hand-over written this long before MIGlet saw its job start is still taken as the job's: the runner may run
# the started hook before MIGlet has read its `Running job` line (the real one takes a second or more to).
JOB_START_SLACK_S: Final = 2.0
# How long a spool set aside as a job starts is still read (a started hook may be writing in it), before it goes.
OLD_SPOOL_KEPT_S: Final = 5.0
# How often the spool is looked at while a job runs: a hand-over reaches the controller this soon.
SPOOL_LOOK_S: Final = 0.25


class Warmup:
    """The runner's warmup, tried once in the agent's life (a restart of the task does not try again)."""

    def __init__(self, backend: RunnerBackend, timings: PhaseTimings) -> None:
        self._backend = backend
        self._timings = timings
        self.tried = False
        self.outcome: str | None = None  # done, stopped, failed or absent, once it is over

    async def run(self, driver: Driver) -> None:
        state = await driver.wait_for(lambda state: state.phase not in BEFORE_ACKNOWLEDGMENT)
        if self.tried or state.phase is not Phase.READY:
            return
        self.tried = True
        with trio.move_on_after(WARMUP_AFTER_S):
            await driver.wait_for(lambda state: state.phase is not Phase.READY)
            return  # the registration came at once: nothing to warm up for, and nothing to compete with it
        began = trio.current_time()
        self.outcome = "stopped"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_not_ready, driver, nursery.cancel_scope)
                try:
                    self.outcome = "done" if await self._backend.warmup() else "absent"
                except ConfigureFailed as exc:
                    self.outcome = "failed"
                    log.warning("The runner's warmup failed", extra={"error": str(exc)})
                nursery.cancel_scope.cancel()
        finally:
            if self.outcome != "absent":
                seconds = round(trio.current_time() - began, 4)
                self._timings.record("warmup_s", seconds)
                log.info("Runner warmup over", extra={"outcome": self.outcome, "warmup_s": seconds})

    @staticmethod
    async def _stop_when_not_ready(driver: Driver, scope: trio.CancelScope) -> None:
        await driver.wait_for(lambda state: state.phase is not Phase.READY)
        scope.cancel()


class Identities:
    """What the runner's job hooks tell (`miglet.runner.hooks`), handed to the machine when it belongs to a job.

    The runner supervisor calls `job_starting` and `job_started` around a job's `Running job` line, and
    `collect` before its end; `watch` collects while the job runs, and deletes the spools set aside.
    """

    def __init__(self, hooks: JobHooks, driver: Driver, clock: Callable[[], float] = time.time) -> None:
        self._hooks = hooks
        self._driver = driver
        self._clock = clock
        self._since = 0.0
        self._early: list[Handover] = []

    def job_starting(self) -> None:
        """A job starts: an empty spool for it, so that nothing written before (a process an earlier job left
        running, a hook a killed worker left behind) is taken for its. What the job ending wrote as its completed
        hook ran is that job's, and goes to the machine now, before the new one starts."""
        self._since = self._clock() - JOB_START_SLACK_S
        if not self._hooks.installed:
            return
        try:
            self._hooks.fresh_spool()
        except OSError as exc:
            # The job goes on; its hooks' hand-over fails silently, and it is reported without its identity.
            log.warning("Cannot make the job hooks' spool afresh", extra={"error": str(exc)})
        for handover in self._hooks.recent(self._since):
            if handover.stage == "completed":
                self._apply(handover)
            else:
                self._early.append(handover)

    def job_started(self) -> None:
        """What the job's started hook wrote before MIGlet saw the job start, if it was that quick."""
        early, self._early = self._early, []
        for handover in early:
            self._apply(handover)

    def collect(self) -> None:
        """What the hooks handed over since the last look: in the spool, and, from a started hook that was
        writing as its job began, in the spools set aside."""
        for handover in self._hooks.spool.take():
            self._apply(handover)
        for handover in self._hooks.recent(self._since):
            if handover.stage == "started":  # a completed one there is an earlier job's
                self._apply(handover)

    async def watch(self, interval: float = SPOOL_LOOK_S) -> None:
        """While a job runs, collect every `interval` seconds; meanwhile delete the spools set aside."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._discard_old)
            while True:
                await self._driver.wait_for(lambda state: state.job is not None)
                self.collect()
                await trio.sleep(interval)

    async def _discard_old(self) -> None:
        while True:
            await trio.sleep(OLD_SPOOL_KEPT_S)
            if due := self._hooks.set_aside(older_than=OLD_SPOOL_KEPT_S):
                await trio.to_thread.run_sync(JobHooks.discard, due, abandon_on_cancel=True)

    def _apply(self, handover: Handover) -> None:
        self._driver.apply(machine.JobIdentified(handover.stage, handover.github))
