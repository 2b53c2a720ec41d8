"""The local state file (SPEC section 5): what `miglet status` and a container health check read.

Written atomically (a temporary file in the same directory, then rename) so a reader never sees half a file,
with owner-only permissions. It never holds a secret: its type has no field that could carry one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from pathlib import Path
from typing import Final

import msgspec

log = logging.getLogger(__name__)


class StateRecord(msgspec.Struct, kw_only=True):
    state: str
    since: str
    updated_at: str
    vm_id: str
    pool_id: str
    runner_name: str
    job: str | None
    pid: int
    version: str
    runner_pid: int | None = None
    stop_reason: str | None = None
    # The agent rewrites the file at least this often; a reader treats an older file as a dead agent's.
    refresh_s: float = 10.0


_encoder: Final = msgspec.json.Encoder()
_sequence = itertools.count()
_decoder: Final = msgspec.json.Decoder(StateRecord)


class StateFileWriter:
    """Writes state records to one path, logging a failure once rather than on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_error: str | None = None

    def write(self, record: StateRecord) -> None:
        try:
            write_atomic(self.path, _encoder.encode(record) + b"\n")
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            if error != self._last_error:
                log.error("Cannot write the state file", extra={"path": str(self.path), "error": error})
            self._last_error = error
        else:
            self._last_error = None


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique to this writer; O_EXCL refuses a file (or a link) someone put in its place.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_sequence)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state_file(path: Path) -> StateRecord:
    """Read and decode a state file; raises OSError or msgspec.DecodeError."""
    return _decoder.decode(path.read_bytes())
