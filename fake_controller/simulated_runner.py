"""An in-process runner with the real one's behaviour, for tests and for simulating many agents in one process.

It implements MIGlet's `RunnerBackend` without subprocesses: configuring records the call and checks the token
like GitHub would, running prints the real runner's lines and runs the jobs it is given (the fake runner's own
`Job`: a job it leaves behind processes for is a matter for the real-process tests). Being plain trio, it runs
on a test's fake clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
import trio

from fake_controller.fake_runner.behaviour import Job
from miglet.runner.backend import ConfigureFailed, Exited, Line, LineSink, Registration, RunEvent, Started
from miglet.secret import Secret


class Crash(msgspec.Struct, frozen=True):
    exit_code: int


class ConfigureCall(msgspec.Struct, frozen=True):
    registration: Registration
    token: str | None


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class SimulatedRunner:
    """A runner backend whose jobs come from `submit_job` and whose failures are chosen by the test."""

    def __init__(
        self,
        *,
        version: str = "2.336.0",
        connect_delay_s: float = 0.0,
        configure_delay_s: float = 0.0,
        reject_tokens: frozenset[str] = frozenset(),
        exit_after_listening: int | None = None,
        warmup_s: float | None = None,
    ) -> None:
        self.version = version
        self.connect_delay_s = connect_delay_s
        self.configure_delay_s = configure_delay_s
        self.reject_tokens = reject_tokens
        self.exit_after_listening = exit_after_listening
        # How long a warmup takes; None: there is nothing to warm up.
        self.warmup_s = warmup_s
        self.warmups: list[str] = []  # how each warmup ended: "done" or "stopped"
        self.configure_calls: list[ConfigureCall] = []
        self.remove_calls: list[str] = []
        self.runs = 0
        self.running = False
        self.configured = False
        self.interrupted = False
        self._jobs_send, self._jobs_receive = trio.open_memory_channel[Job | Crash](100)

    def submit_job(self, job: Job) -> None:
        """Offer a job to the runner (as GitHub would); it runs once the runner is listening."""
        self._jobs_send.send_nowait(job)

    def crash(self, exit_code: int = 1) -> None:
        """Make the listening runner exit with `exit_code`, as a crash would."""
        self._jobs_send.send_nowait(Crash(exit_code))

    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        token = registration.token.reveal() if registration.token is not None else None
        self.configure_calls.append(ConfigureCall(registration, token))
        await trio.sleep(self.configure_delay_s)
        if token is None or token in self.reject_tokens:
            on_line(
                "stderr", "Http response code: NotFound from 'POST https://api.github.com/actions/runner-registration'"
            )
            raise ConfigureFailed(
                "Http response code: NotFound from 'POST https://api.github.com/actions/runner-registration'"
            )
        on_line("stdout", "√ Runner successfully added")
        on_line("stdout", "√ Settings Saved.")
        self.configured = True

    async def run(self, registration: Registration, events: trio.MemorySendChannel[RunEvent]) -> None:
        self.runs += 1
        self.running = True

        async def say(line: str) -> None:
            await events.send(Line("stdout", line))

        code = 0
        try:
            await events.send(Started(None))
            await trio.sleep(self.connect_delay_s)
            await say("\x1b[32m√ Connected to GitHub\x1b[0m")
            await say("")
            await say(f"Current runner version: '{self.version}'")
            await say(f"{_stamp()}: Listening for Jobs")
            if self.exit_after_listening is not None:
                code = self.exit_after_listening
                return
            while True:
                job = await self._jobs_receive.receive()
                if isinstance(job, Crash):
                    code = job.exit_code
                    return
                await self._run_job(job, say)
                if registration.ephemeral:
                    self.configured = False
                    return
        finally:
            # Stopped (cancelled) or not, the runner is gone now.
            self.running = False
            with trio.CancelScope(shield=True):
                await events.send(Exited(code))

    async def _run_job(self, job: Job, say: Callable[[str], Awaitable[None]]) -> None:
        await say(f"{_stamp()}: Running job: {job.name}")
        try:
            pause = job.duration_s / (len(job.lines) + 1)
            for line in job.lines:
                await trio.sleep(pause)
                await say(line)
            await trio.sleep(pause)
        except trio.Cancelled:
            # A graceful stop cancels the running job, as SIGINT does to the real runner.
            self.interrupted = True
            with trio.CancelScope(shield=True):
                await say(f"{_stamp()}: Job {job.name} completed with result: Canceled")
            raise
        if not job.lost:  # taken back by GitHub before the runner could renew it: no result line
            await say(f"{_stamp()}: Job {job.name} completed with result: {job.result}")

    async def warmup(self) -> bool:
        if self.warmup_s is None:
            return False
        self.warmups.append("stopped")
        await trio.sleep(self.warmup_s)
        self.warmups[-1] = "done"
        return True

    async def remove(self, token: Secret, on_line: LineSink) -> None:
        self.remove_calls.append(token.reveal())
        self.configured = False
        on_line("stdout", "√ Runner removed")

    async def clean(self) -> None:
        self.configured = False
