"""The sweep of what a runner process leaves behind, and the reaping of adopted orphans, with real processes.

Rules: pytest is not a subreaper, and must not become one; what a subreaper does is run in a child Python that
makes itself one and prints what it found (JSON). Waits are on pipes and pidfds under a hard `trio.fail_after`,
never on sleeps. Every process a test starts is gone when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from miglet.procfs import ProcEntry, read_stat
from miglet.runner.process import _session_members
from miglet.runner.reaper import descendants, kill_leftovers

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20


def entry(ppid: int) -> ProcEntry:
    return ProcEntry("sleep", b"S", ppid, 1, 1, 0)


def test_descendants_follow_the_parents_down_the_tree() -> None:
    table = {10: entry(1), 11: entry(10), 12: entry(11), 13: entry(10), 20: entry(1), 21: entry(20)}
    assert descendants(10, table) == {11, 12, 13}
    assert descendants(12, table) == set()


# A session leader that leaves a process that left the session (`setsid`) and one that did not. Each says who
# it is once settled; the pipe ends when both have and the leader has exited.
LEADER = """
setsid sh -c 'echo escaped $$; exec sleep 600 >/dev/null' </dev/null 2>/dev/null &
sh -c 'echo member $$; exec sleep 600 >/dev/null' </dev/null 2>/dev/null &
"""


async def test_outside_a_subreaper_only_the_session_is_swept() -> None:
    process = await trio.lowlevel.open_process(["bash", "-c", LEADER], start_new_session=True, stdout=subprocess.PIPE)
    escaped = member = 0
    try:
        with trio.fail_after(TIMEOUT):
            assert process.stdout is not None
            output = b""
            while chunk := await process.stdout.receive_some():
                output += chunk
            said = dict(line.split() for line in output.decode().splitlines())
            escaped, member = int(said["escaped"]), int(said["member"])
            await process.wait()
            leftovers = await kill_leftovers(process.pid)
        assert [leftover.pid for leftover in leftovers] == [member]
        assert _session_members(process.pid) == []
        assert read_stat(escaped).alive  # not in the session, and this is no subreaper: not ours to kill
    finally:
        for pid in (escaped, member):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


async def run_as_subreaper(script: str) -> dict[str, Any]:
    """Run `script` (Python, with `report(**values)` to print its findings) in a child Python that is a child
    subreaper, and return what it reported."""
    prelude = (
        "import json, os, sys, trio\n"
        "from miglet.hardening import become_child_subreaper\n"
        "become_child_subreaper()\n"
        "def report(**values): print(json.dumps(values))\n"
    )
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-c", prelude + script], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    found: dict[str, Any] = json.loads(result.stdout)
    return found


# In a subreaper: a runner process that leaves a `setsid` process, a double-forked one and a member of its
# session, then exits; the sweep must kill all three and leave no zombie behind.
SWEEP = '''
from miglet.procfs import process_table
from miglet.runner.reaper import kill_leftovers, trio_children

SCRIPT = """
setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!
( setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! )
sleep 600 </dev/null >/dev/null 2>&1 & echo $!
exit 0
"""

async def main():
    with trio_children.track() as adopt:
        process = await trio.lowlevel.open_process(["bash", "-c", SCRIPT], start_new_session=True, stdout=-1)
        adopt(process.pid)
        output = b""
        while chunk := await process.stdout.receive_some():
            output += chunk
        code = await process.wait()
    started = sorted(map(int, output.split()))
    leftovers = await kill_leftovers(process.pid)
    children = [pid for pid, entry in process_table().items() if entry.ppid == os.getpid()]
    alive = [pid for pid in started if pid in process_table() and process_table()[pid].alive]
    report(code=code, started=started, killed=sorted(l.pid for l in leftovers), children=children, alive=alive)

trio.run(main)
'''


async def test_a_subreaper_kills_every_descendant_and_reaps_it() -> None:
    found = await run_as_subreaper(SWEEP)
    assert found["code"] == 0
    assert len(found["started"]) == 3
    assert found["killed"] == found["started"]
    assert found["alive"] == []
    assert found["children"] == []  # no zombie left


# In a subreaper reaping on SIGCHLD: an orphan adopted alive (it waits for a pipe to close) is reaped as soon as
# it dies; meanwhile trio's own children, which exit at once, keep their exit codes (never reaped from under trio).
ORPHAN = """
from miglet.procfs import process_table
from miglet.runner import reaper

async def main():
    reaped = trio.Event()
    reap = reaper.reap_orphans

    def reap_and_tell():
        count = reap()
        if count:
            reaped.set()
        return count

    reaper.reap_orphans = reap_and_tell
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.reap_orphans_task)
        read_end, write_end = os.pipe()
        codes = []
        for command in [f"cat <&{read_end} >/dev/null & exit 0"] + ["exit 3"] * 30:
            with reaper.trio_children.track() as adopt:
                process = await trio.lowlevel.open_process(["bash", "-c", command], pass_fds=(read_end,))
                adopt(process.pid)
                codes.append(await process.wait())
        os.close(read_end)
        os.close(write_end)  # the orphan (cat) reads to the end and exits
        await reaped.wait()
        nursery.cancel_scope.cancel()
    zombies = [pid for pid, entry in process_table().items() if entry.ppid == os.getpid()]
    report(codes=codes, zombies=zombies)

trio.run(main)
"""


async def test_a_subreaper_reaps_an_adopted_orphan_when_it_dies_and_leaves_trio_its_own() -> None:
    found = await run_as_subreaper(ORPHAN)
    assert found["codes"] == [0] + [3] * 30
    assert found["zombies"] == []
