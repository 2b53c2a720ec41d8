"""Reading a small file that anyone may have replaced with anything: a FIFO, a device, a directory, a huge file.

What MIGlet reads from disk (the controller token, the state file) is a few bytes. Reading it must neither block
on a FIFO with no writer, nor read a device such as /dev/zero for ever, nor take a huge file into memory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsuitableFile(Exception):
    """The path names something other than a small regular file."""


def read_small_file(path: Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The content of the regular file at `path` (a symlink to one is fine, unless `follow_symlinks` is false), at
    most `limit` bytes.

    Raises OSError when it cannot be opened or read, UnsuitableFile when it is no regular file or too large.
    """
    # O_NONBLOCK: opening a FIFO would wait for a writer; reading a regular file is not affected by it.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except ValueError:
        raise UnsuitableFile("has a NUL character in its name") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnsuitableFile("is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsuitableFile(f"is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise UnsuitableFile(f"is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        # One byte more than the limit tells a file that grew since fstat from one that fits.
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UnsuitableFile(f"is larger than {limit} bytes")
    return b"".join(chunks)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "something else"
