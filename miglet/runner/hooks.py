"""Which workflow run a job belongs to, told by the runner's own job hooks.

The runner's worker runs the scripts named by ACTIONS_RUNNER_HOOK_JOB_STARTED and ACTIONS_RUNNER_HOOK_JOB_COMPLETED
before a job's first step and after its last, as the runner's user, with the job's `GITHUB_*` environment. MIGlet
points both at scripts of its own (`JobHooks.prepare`, each time it starts the runner). Each is POSIX `sh`: it
writes an allow-list of `GITHUB_*` variables, each cut to 256 bytes, to a spool directory that only the runner's
user may write, and then runs the hook the operator had configured, whose exit status is the hook's (a failing
started hook still fails the job). MIGlet's own part never fails, never waits on MIGlet, and writes about 3 KiB
at most. An operator's hook set in the runner's `.env` would override MIGlet's (the runner loads `.env` over
its environment), so MIGlet points that line at its script too and keeps the operator's value beside it, as
MIGLET_CHAINED_<variable>, to put back when job identity is off.

MIGlet reads the spool (`Spool.take`) without trusting it: a job can write there too. Only files named as the
hooks name them are read, without following links, at most 8 KiB each; only the allow-listed keys are kept; each
value loses its control characters, has secrets masked and is cut to 256 characters. Anything else is logged (a
few times, then no more) and removed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import re
import shlex
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal

import msgspec

from miglet import protocol
from miglet.secret import redact
from miglet.smallfile import UnsuitableFile, read_small_file
from miglet.statefile import write_atomic

log = logging.getLogger(__name__)

Stage = Literal["started", "completed"]
STAGES: Final[tuple[Stage, ...]] = ("started", "completed")
HOOK_VARIABLES: Final[dict[Stage, str]] = {
    "started": "ACTIONS_RUNNER_HOOK_JOB_STARTED",
    "completed": "ACTIONS_RUNNER_HOOK_JOB_COMPLETED",
}
# In the runner's .env, where the operator's own hook is kept while MIGlet's takes its place.
CHAINED_PREFIX: Final = "MIGLET_CHAINED_"
# The job's variables read, and the key each is reported under; nothing else of the job's environment is.
IDENTITY_VARIABLES: Final = {
    "GITHUB_REPOSITORY": "repository",
    "GITHUB_WORKFLOW": "workflow",
    "GITHUB_JOB": "job",
    "GITHUB_RUN_ID": "run_id",
    "GITHUB_RUN_NUMBER": "run_number",
    "GITHUB_RUN_ATTEMPT": "run_attempt",
    "GITHUB_REF": "ref",
    "GITHUB_SHA": "sha",
    "GITHUB_ACTOR": "actor",
    "GITHUB_EVENT_NAME": "event_name",
    "GITHUB_SERVER_URL": "server_url",
}
MAX_VALUE: Final = 256
# What a hook writes: a header, the stage, eleven values of at most MAX_VALUE bytes, an end mark.
MAX_HANDOVER: Final = 8 * 1024
MAGIC: Final = "miglet-job-hook 1"
END: Final = "end"
# Entries looked at in one reading of the spool: a job that fills it with files cannot make one look long.
MAX_ENTRIES_PER_LOOK: Final = 256
# Malformed hand-overs logged in the agent's life; the rest are counted in silence (a job can make any number).
MAX_PROBLEMS_LOGGED: Final = 10
OLD_SPOOL_PREFIX: Final = ".old-spool."
_HANDOVER_NAME: Final = re.compile(r"(started|completed)\.[0-9]{1,10}")
_PART_NAME: Final = re.compile(r"\.(started|completed)\.[0-9]{1,10}")
# A part-written hand-over older than this was abandoned (its hook was killed): it goes.
STALE_PART_S: Final = 60.0
MAX_DOTENV: Final = 256 * 1024
# Beside the state file: MIGlet's job hook scripts, and the spool they hand over through.
JOB_HOOKS_DIR: Final = "job-hooks"


class Handover(msgspec.Struct, frozen=True):
    stage: Stage
    github: protocol.GithubContext


class MalformedHandover(Exception):
    """A spool file that is not what MIGlet's hooks write; the message never quotes it."""


def parse_handover(data: bytes) -> Handover:
    """A spool file's identity, cleaned; raises MalformedHandover."""
    if not data.endswith(b"\0"):
        raise MalformedHandover("unfinished (no end mark)")
    records = data[:-1].split(b"\0")
    if len(records) < 3 or records[0] != MAGIC.encode() or records[-1] != END.encode():
        raise MalformedHandover("not written by MIGlet's job hook")
    stage_record = records[1].decode("ascii", "replace")
    stage = stage_record.removeprefix("stage=")
    if stage_record == stage or stage not in STAGES:
        raise MalformedHandover("no known stage")
    values: dict[str, str] = {}
    for record in records[2:-1]:
        name, sep, raw = record.partition(b"=")
        key = IDENTITY_VARIABLES.get(name.decode("ascii", "replace"))
        if not sep or key is None or key in values:
            continue  # only the allow-list is read, each key once
        if value := clean_value(raw.decode("utf-8", "replace")):
            values[key] = value
    if not values:
        raise MalformedHandover("no identity in it")
    return Handover(stage, protocol.GithubContext(**values))


def clean_value(text: str) -> str:
    """A value from a job: control and format characters removed, secrets masked, at most MAX_VALUE characters."""
    return redact(protocol.printable(text).strip())[:MAX_VALUE]


class Spool:
    """The directory the hooks hand over to; only MIGlet reads it."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, *, quiet: bool = False) -> None:
        self.path = path
        self._problems = MAX_PROBLEMS_LOGGED if quiet else 0
        self._clock = clock  # wall-clock time, as files' modification times are

    def take(self, since: float | None = None) -> list[Handover]:
        """What the hooks have handed over since the last look (started ones first), each removed once read;
        with `since`, only what was written from then on and not later than now (wall-clock time)."""
        try:
            with os.scandir(self.path) as entries:
                names = [entry.name for _, entry in zip(range(MAX_ENTRIES_PER_LOOK), entries, strict=False)]
        except OSError:
            return []  # not made (job identity is off here), or gone: a hook's writes fail silently
        found: list[Handover] = []
        for name in names:
            if _PART_NAME.fullmatch(name):
                if self._stale(name):
                    self._problem("a hand-over its hook never finished", name)
                continue  # else a hook is writing it
            if not _HANDOVER_NAME.fullmatch(name):
                self._problem("a file no hook writes", name)
                continue
            try:
                if since is not None and not since <= os.lstat(self.path / name).st_mtime <= self._clock() + 1:
                    continue  # not what it is looked at for (a job can date its files as it likes)
                found.append(parse_handover(read_small_file(self.path / name, MAX_HANDOVER, follow_symlinks=False)))
            except (OSError, UnsuitableFile, MalformedHandover) as exc:
                self._problem(f"a malformed hand-over: {exc}", name)
            else:
                _remove(self.path / name)
        found.sort(key=lambda handover: STAGES.index(handover.stage))
        return found

    def _stale(self, name: str) -> bool:
        try:
            modified = os.lstat(self.path / name).st_mtime
        except OSError:
            return False
        # A time in the future is no hook's either (a job can set any time on its files).
        return abs(self._clock() - modified) > STALE_PART_S

    def _problem(self, what: str, name: str) -> None:
        _remove(self.path / name)
        self._problems += 1
        if self._problems <= MAX_PROBLEMS_LOGGED:
            # The name is logged only when it is one the hooks use: any other is the job's choice of text.
            shown = name if _HANDOVER_NAME.fullmatch(name) or _PART_NAME.fullmatch(name) else None
            log.warning("Ignoring %s", what, extra={"path": str(self.path), "file": shown})
            if self._problems == MAX_PROBLEMS_LOGGED:
                log.warning("Further problems with job hook hand-overs are not logged", extra={"path": str(self.path)})


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # an empty one; a job's tree of files is left to the VM's end
    except OSError:
        pass


# --- The hook scripts ------------------------------------------------------------------------------------------


def hook_script(
    stage: Stage, spool: Path, chained: str | None, runner_dir: Path, forced_node: str | None = None
) -> str:
    """MIGlet's hook for `stage`: hand the job's identity over, then run `chained` (the operator's hook) as the
    runner would have run it."""
    part, done = f'".{stage}.$$"', f'"{stage}.$$"'
    values = "\n".join(f"        printf '{name}=%.{MAX_VALUE}s\\000' \"${{{name}-}}\"" for name in IDENTITY_VARIABLES)
    return f"""#!/bin/sh
# MIGlet's job-{stage} hook, written by MIGlet each time it starts the runner (changes here are lost).
# It hands the job's GITHUB_* identity to MIGlet through a spool directory, never failing and never waiting,
# then runs the hook configured before MIGlet's, if there was one, as the runner would: its exit status is
# this hook's.
(
    cd {shlex.quote(str(spool))} &&
    umask 077 &&
    rm -f {part} &&
    {{
        printf '{MAGIC}\\000stage={stage}\\000'
{values}
        printf '{END}\\000'
    }} >{part} &&
    mv -f {part} {done}
) </dev/null >/dev/null 2>&1 || :
{_chain(chained, runner_dir, forced_node)}"""


def _chain(hook: str | None, runner_dir: Path, forced_node: str | None) -> str:
    """Run the operator's hook the way the runner's worker would (JobHookProvider: by its extension)."""
    if not hook:
        return "exit 0\n"
    quoted = shlex.quote(hook)
    lines = [
        f"hook={quoted}",
        'if [ ! -f "$hook" ]; then',
        '    echo "File doesn\'t exist: $hook" >&2',
        "    exit 1",
        "fi",
    ]
    extension = Path(hook).suffix  # as the runner compares it: `.SH` is no shell script
    if extension == ".sh":
        lines += [
            "if command -v bash >/dev/null 2>&1; then",
            '    exec bash --noprofile --norc -e -o pipefail "$hook"',
            "fi",
            'exec sh -e "$hook"',
        ]
    elif extension == ".ps1":
        command = shlex.quote(". '" + hook.replace("'", "''") + "'")
        lines += [
            "if command -v pwsh >/dev/null 2>&1; then",
            f"    exec pwsh -command {command}",
            "fi",
            f"exec powershell -command {command}",
        ]
    elif extension == ".js":
        node = _runner_node(runner_dir, forced_node)
        lines += [f'exec {shlex.quote(node) if node else "node"} "$hook"']
    else:
        lines += [
            "echo \"$hook is not a valid path to a script. Make sure it ends in '.sh', '.ps1' or '.js'.\" >&2",
            "exit 1",
        ]
    return "\n".join(lines) + "\n"


# The Node.js the runner runs `.js` hooks with (NodeUtil.GetInternalNodeVersion), unless this variable names another.
RUNNER_NODE: Final = "node20"
FORCED_NODE_VARIABLE: Final = "ACTIONS_RUNNER_FORCED_INTERNAL_NODE_VERSION"


def _runner_node(runner_dir: Path, forced: str | None) -> str | None:
    """The runner's own Node.js (`externals/<version>/bin/node`): the one it runs `.js` hooks with, else the newest
    it ships."""
    wanted = runner_dir / "externals" / (forced or RUNNER_NODE) / "bin" / "node"
    if "/" not in (forced or "") and wanted.is_file():
        return str(wanted)
    found: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for entry in (runner_dir / "externals").iterdir():
            version = entry.name.removeprefix("node")
            if version.isdigit() and (entry / "bin" / "node").is_file():
                found.append((int(version), entry / "bin" / "node"))
    return str(max(found)[1]) if found else None


# --- The runner's .env -----------------------------------------------------------------------------------------


class DotEnv:
    """The runner's `.env` as lines, read and written without disturbing the lines MIGlet does not own."""

    def __init__(self, path: Path, lines: list[str] | None) -> None:
        self.path = path
        self.lines = lines  # None: there is no .env
        self.changed = False

    @classmethod
    def read(cls, path: Path) -> DotEnv:
        try:
            data = read_small_file(path, MAX_DOTENV, follow_symlinks=False)
        except FileNotFoundError:
            return cls(path, None)
        return cls(path, data.decode("utf-8", "surrogateescape").split("\n"))

    def get(self, key: str) -> str | None:
        """The value the runner would take (the last line setting `key`)."""
        value = None
        for line in self.lines or ():
            name, sep, rest = line.rstrip("\r").partition("=")
            if sep and name == key:
                value = rest
        return value

    def set(self, key: str, value: str | None) -> None:
        """Make `key` say `value` (None: remove it)."""
        assert self.lines is not None
        kept = [line for line in self.lines if line.rstrip("\r").partition("=")[0] != key]
        if value is not None:
            at = len(kept) - 1 if kept and kept[-1] == "" else len(kept)  # before the final newline
            kept.insert(at, f"{key}={value}")
        if kept != self.lines:
            self.lines = kept
            self.changed = True

    def write(self) -> None:
        """Replace the file at once, with its owner and mode kept."""
        assert self.lines is not None
        info = os.lstat(self.path)
        owner = (info.st_uid, info.st_gid) if os.geteuid() == 0 else None
        data = "\n".join(self.lines).encode("utf-8", "surrogateescape")
        write_atomic(self.path, data, mode=stat.S_IMODE(info.st_mode), owner=owner)
        self.changed = False


# --- Installing them -------------------------------------------------------------------------------------------


class HooksUnavailable(Exception):
    """MIGlet's hooks cannot work here; the message says why and what to change."""


class JobHooks:
    """MIGlet's job hooks for the runner in `runner_dir`, kept in `directory` (beside the state file)."""

    def __init__(self, directory: Path, runner_dir: Path, runner_user: str | None) -> None:
        self.directory = directory
        self.runner_dir = runner_dir
        self.spool = Spool(directory / "spool")
        # Spools set aside (each in a holder directory), and when: read for a few seconds more, then deleted.
        self._old: list[tuple[Path, float]] = []
        self._monotonic = time.monotonic
        self.installed = False  # the runner was pointed at MIGlet's hooks
        self._user = runner_user if os.geteuid() == 0 else None

    def script(self, stage: Stage) -> Path:
        return self.directory / f"job-{stage}.sh"

    def prepare(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Write the hook scripts and the spool, and chain the operator's hooks to them; returns the variables that
        point the runner at MIGlet's hooks. When they cannot work here, says why, puts the operator's hooks back
        in `.env` if MIGlet's had replaced them, and returns none: the runner runs without MIGlet's hooks."""
        try:
            dotenv = DotEnv.read(self.runner_dir / ".env")
            chained = {stage: self._operator_hook(stage, dotenv, environ) for stage in STAGES}
            self._make_directories()
            forced_node = dotenv.get(FORCED_NODE_VARIABLE) or environ.get(FORCED_NODE_VARIABLE)
            for stage in STAGES:
                script = hook_script(stage, self.spool.path, chained[stage], self.runner_dir, forced_node)
                # Readable and runnable by all: the runner's user runs it. A path from .env that is not UTF-8 is
                # kept as the bytes it was.
                write_atomic(self.script(stage), script.encode("utf-8", "surrogateescape"), mode=0o755)
            if dotenv.lines is not None:
                for stage in STAGES:
                    variable = HOOK_VARIABLES[stage]
                    if dotenv.get(variable) is not None and dotenv.get(variable) != str(self.script(stage)):
                        # The runner would take the .env's hook over MIGlet's: MIGlet's takes its place there.
                        dotenv.set(CHAINED_PREFIX + variable, chained[stage] or "")
                        dotenv.set(variable, str(self.script(stage)))
                if dotenv.changed:
                    dotenv.write()
        except Exception as exc:
            self.installed = False
            # Whatever went wrong (a bug included), the runner must start: without MIGlet's hooks, and with the
            # operator's where they were.
            log.warning(
                "Job identity is off for this runner: its job hooks cannot be installed",
                extra={"directory": str(self.directory), "error": _reason(exc)},
            )
            self.restore()
            return {}
        self.installed = True
        return {HOOK_VARIABLES[stage]: str(self.script(stage)) for stage in STAGES}

    def restore(self) -> None:
        """Put the operator's hooks back in `.env` where MIGlet's replaced them (job identity is off)."""
        self.installed = False
        try:
            dotenv = DotEnv.read(self.runner_dir / ".env")
            if dotenv.lines is None:
                return
            for stage in STAGES:
                variable = HOOK_VARIABLES[stage]
                if self._is_miglets(stage, dotenv):
                    # As the operator had it: unset, or set (to nothing, which turns off one set elsewhere).
                    dotenv.set(variable, dotenv.get(CHAINED_PREFIX + variable))
                    dotenv.set(CHAINED_PREFIX + variable, None)
            if dotenv.changed:
                dotenv.write()
                log.info("Put the operator's job hooks back in the runner's .env", extra={"path": str(dotenv.path)})
        except Exception as exc:
            log.error(
                "Cannot put the operator's job hooks back in the runner's .env",
                extra={"path": str(self.runner_dir / ".env"), "error": _reason(exc)},
            )

    def _operator_hook(self, stage: Stage, dotenv: DotEnv, environ: Mapping[str, str]) -> str | None:
        """The hook the runner would have run without MIGlet's: its .env's over its environment's."""
        variable = HOOK_VARIABLES[stage]
        if self._is_miglets(stage, dotenv):
            configured = dotenv.get(CHAINED_PREFIX + variable)
        else:
            configured = dotenv.get(variable)
            if configured is None:
                configured = environ.get(variable)
        if configured == str(self.script(stage)):
            return None  # never itself
        return configured or None

    def _is_miglets(self, stage: Stage, dotenv: DotEnv) -> bool:
        """Whether `.env`'s hook for `stage` is a MIGlet's: this one's, or one that kept the operator's beside it
        (from a MIGlet whose state file was elsewhere)."""
        variable = HOOK_VARIABLES[stage]
        value = dotenv.get(variable)
        if value == str(self.script(stage)):
            return True
        theirs = f"/{self.directory.name}/{self.script(stage).name}"
        return value is not None and value.endswith(theirs) and dotenv.get(CHAINED_PREFIX + variable) is not None

    def _make_directories(self) -> None:
        """The scripts' directory (MIGlet's, readable by all) and an empty spool in it (the runner user's alone)."""
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise HooksUnavailable(f"{self.directory} is not a directory of MIGlet's own")
        if (problem := _placement_problem(self.directory, self._owner())) is not None:
            raise HooksUnavailable(problem)
        os.chmod(self.directory, 0o755)  # noqa: S103 - the runner's user runs the scripts in it
        # Spools an earlier MIGlet set aside and did not get to delete go with this one's.
        known = {holder for holder, _ in self._old}
        left = [path for path in self.directory.glob(OLD_SPOOL_PREFIX + "*") if path not in known]
        self._old += [(path, -math.inf) for path in left]
        self.fresh_spool()

    def fresh_spool(self) -> None:
        """An empty spool for what comes next (a runner, or a job): nothing written before is read as its.

        The old one is moved aside (into a holder directory of a name no one used), where it is read a few seconds
        more for what the job starting may be writing already (`recent`; the hooks work inside the spool, so a
        hand-over begun there is finished there), then deleted in a thread (`discard`): a job may have filled it
        with millions of files. The spool's parent is MIGlet's, so no one else can swap a name in it for a link.
        """
        spool = self.spool.path
        if os.path.lexists(spool):  # only MIGlet changes names in its directory
            holder = Path(tempfile.mkdtemp(prefix=OLD_SPOOL_PREFIX, dir=self.directory))
            self._old.append((holder, self._monotonic()))
            os.rename(spool, holder / "spool")  # a directory or not, whatever is at the name goes
        os.mkdir(spool, 0o700)
        fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)  # before it is the runner user's: changing its mode then would take CAP_FOWNER
            if (owner := self._owner()) is not None:
                os.fchown(fd, owner.pw_uid, owner.pw_gid)
        finally:
            os.close(fd)

    def recent(self, since: float) -> list[Handover]:
        """What the spools set aside hold that was written at `since` or later (the job starting now may have
        run its hook before MIGlet saw it start, or be running it)."""
        found: list[Handover] = []
        for holder, _ in self._old:
            found += Spool(holder / "spool", quiet=True).take(since=since)
        return found

    def set_aside(self, older_than: float = 0.0) -> list[Path]:
        """The spools set aside at least `older_than` seconds ago, which nothing reads any more: the caller deletes
        them (`discard`)."""
        limit = self._monotonic() - older_than
        due = [holder for holder, when in self._old if when <= limit]
        self._old = [(holder, when) for holder, when in self._old if when > limit]
        return due

    @staticmethod
    def discard(holders: list[Path]) -> None:
        """Delete spools set aside: slow when a job filled one with files, so it is run in a thread."""
        for holder in holders:
            shutil.rmtree(holder, ignore_errors=True)

    def _owner(self) -> pwd.struct_passwd | None:
        return pwd.getpwnam(self._user) if self._user is not None else None


def install_problem(directory: Path, runner_user: str | None) -> str | None:
    """Why MIGlet's hooks could not be installed in `directory` for `runner_user`, as far as can be told before
    it exists (for `check-config`); None when nothing stands in the way."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        owner = pwd.getpwnam(runner_user) if runner_user is not None and os.geteuid() == 0 else None
        return _placement_problem(existing, owner)
    except KeyError:
        return f"no user {runner_user!r}"
    except OSError as exc:
        return _reason(exc)


def _placement_problem(directory: Path, owner: pwd.struct_passwd | None) -> str | None:
    """Why MIGlet's hooks must not be in `directory`: others could swap it for a link, or the runner's user (`owner`,
    when it is another user) could not reach them."""
    if (unsafe := _writable_by_others(directory)) is not None:
        return (
            f"{unsafe} may be changed by users other than MIGlet's: keep MIGLET_STATE_FILE in a directory only root "
            "can write (such as /run/miglet)"
        )
    if owner is not None and (blocked := _unreachable(directory, owner)) is not None:
        return (
            f"the runner's user {owner.pw_name!r} cannot reach {blocked}: let others search it (chmod o+x; for the "
            "systemd unit, RuntimeDirectoryMode=0711)"
        )
    return None


def _writable_by_others(directory: Path) -> Path | None:
    """The first directory from `/` to `directory` (as named, and as its links resolve) in which someone besides
    root could rename things: a way to swap MIGlet's directory for a link while root works in it. A sticky
    directory, such as /tmp, protects what others do not own. Only root has anything to fear: a MIGlet that is not
    root runs the runner, and so its jobs, as its own user."""
    if os.geteuid() != 0:
        return None
    for chain in (directory, directory.resolve()):
        parts = [*reversed(chain.parents), chain]
        for index, path in enumerate(parts):
            info = os.lstat(path)
            if info.st_uid != 0:
                return path
            if stat.S_ISLNK(info.st_mode):
                continue  # a link's own mode means nothing; what it points at is checked as resolved
            shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            # In a sticky directory, others may rename only what they own: what comes next must be root's.
            if shared and not (info.st_mode & stat.S_ISVTX and index + 1 < len(parts)):
                return path
    return None


def _unreachable(directory: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to `directory` (itself included) that `user` may not search."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for path in (*reversed(directory.resolve().parents), directory.resolve()):
        info = os.stat(path)
        if info.st_uid == user.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return path
    return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)
