"""The controller token file: one bearer token in a small regular file (a Kubernetes secret mount, say).

Reading it is cheap (one open, one read of at most 64 KiB), so that it can be read again whenever the token may
have been rotated, and it fails only with `TokenFileError`, whose message names the path and the problem, never
the content.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from miglet.secret import Secret
from miglet.smallfile import UnsuitableFile, read_small_file

MAX_TOKEN_FILE_BYTES: Final = 64 * 1024
MIN_TOKEN_LENGTH: Final = 8
BEARER_TOKEN: Final = re.compile(rf"[A-Za-z0-9\-._~+/]{{{MIN_TOKEN_LENGTH},}}=*")
BEARER_TOKEN_RULE: Final = (
    f"at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / (then = padding) (RFC 6750 bearer token)"
)


class TokenFileError(Exception):
    """The token file cannot be used."""


def read_token_file(path: Path) -> Secret:
    """The bearer token in `path`: UTF-8, surrounding white space stripped, not empty, RFC 6750 characters."""
    try:
        data = read_small_file(path, MAX_TOKEN_FILE_BYTES)
    except OSError as exc:
        raise TokenFileError(f"cannot read {str(path)!r}: {exc.strerror or type(exc).__name__}") from None
    except UnsuitableFile as exc:
        raise TokenFileError(f"{str(path)!r} {exc}") from None
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"{str(path)!r} is not UTF-8 text") from None
    if not token:
        raise TokenFileError(f"{str(path)!r} is empty")
    if not BEARER_TOKEN.fullmatch(token):
        raise TokenFileError(f"{str(path)!r} must hold {BEARER_TOKEN_RULE}")
    return Secret(token)
