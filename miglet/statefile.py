"""The local state file: what `miglet status` and a container health check read.

Written atomically (a temporary file in the same directory, then rename) so a reader never sees half a file,
with owner-only permissions. It never holds a secret: its type has no field that could carry one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from pathlib import Path
from typing import Annotated, Final

import msgspec

from miglet.smallfile import UnsuitableFile, read_small_file

log = logging.getLogger(__name__)

# A record is a few hundred bytes; anything much larger is not one.
MAX_STATE_FILE_BYTES: Final = 64 * 1024
# Linux never gives a process id this high (PID_MAX_LIMIT): a larger one in the file is corruption.
PID_LIMIT: Final = 1 << 22


class StateRecord(msgspec.Struct, kw_only=True):
    state: str
    since: str
    updated_at: str
    vm_id: str
    pool_id: str
    runner_name: str
    job: str | None
    # Checked on reading, because they are acted on: kill(0) and kill(-1) signal whole groups of processes, and
    # the runner, the agent's child, is never pid 1 (init), though the agent may be (in a container).
    pid: Annotated[int, msgspec.Meta(ge=1, lt=PID_LIMIT)]
    version: str
    runner_pid: Annotated[int, msgspec.Meta(ge=2, lt=PID_LIMIT)] | None = None
    stop_reason: str | None = None
    # The agent rewrites the file at least this often; a reader treats an older file as a dead agent's.
    refresh_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class StateFileError(Exception):
    """The state file cannot be read, or does not hold a state record."""


class StateFileMissing(StateFileError):
    """There is no state file: no agent has written one."""


_encoder: Final = msgspec.json.Encoder()
_sequence = itertools.count()
_decoder: Final = msgspec.json.Decoder(StateRecord)


class StateFileWriter:
    """Writes state records to one path, logging a failure once rather than on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_error: str | None = None
        self._state: str | None = None
        self._since = ""

    def write(self, record: StateRecord) -> None:
        """Write `record`, its `since` being when the file first said its state (at this stretch)."""
        if record.state != self._state:
            self._state, self._since = record.state, record.updated_at
        record = msgspec.structs.replace(record, since=self._since)
        try:
            write_atomic(self.path, _encoder.encode(record) + b"\n")
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            if error != self._last_error:
                log.error("Cannot write the state file", extra={"path": str(self.path), "error": error})
            self._last_error = error
        else:
            self._last_error = None


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` at once with `data`, with `mode` (and `owner`: uid and gid); readers see the old file or the
    new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique to this writer; O_EXCL refuses a file (or a link) someone put in its place.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_sequence)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state_file(path: Path) -> StateRecord:
    """Read and decode a state file; raises StateFileMissing or StateFileError, whatever is at `path`."""
    try:
        data = read_small_file(path, MAX_STATE_FILE_BYTES)
    except FileNotFoundError:
        raise StateFileMissing(f"no state file at {path}") from None
    except OSError as exc:
        raise StateFileError(exc.strerror or type(exc).__name__) from None
    except UnsuitableFile as exc:
        raise StateFileError(str(exc)) from None
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise StateFileError(f"not a state record: {exc}") from None
    except UnicodeDecodeError:
        raise StateFileError("not a state record: a string is not valid UTF-8") from None
    except RecursionError:
        raise StateFileError("not a state record: nested too deeply") from None
