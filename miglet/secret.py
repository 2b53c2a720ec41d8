"""Secrets that cannot leak by accident.

A `Secret` never shows its value through `str`, `repr`, f-strings or msgspec encoding; `reveal()` is the one
door, used only where the value is handed to its consumer (an HTTP header, a runner's environment). Every secret
made is also remembered so that `redact()` can mask it in text that came from elsewhere: a runner's output line,
an exception message, a log record.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Final

MASK: Final = "***"
# Shorter values would mask ordinary words; nothing we treat as a secret is this short.
_MIN_REDACTED_LENGTH: Final = 6


class Secret:
    """A string value that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        _registry.add(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        import hmac  # rarely needed: not worth its import at start-up

        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class _Registry:
    """Every secret value seen by this process, compiled into one pattern for fast masking."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) < _MIN_REDACTED_LENGTH or value in self._values:
            return
        with self._lock:
            self._values.add(value)
            self._pattern = None

    def redact(self, text: str) -> str:
        if not self._values:
            return text
        pattern = self._pattern
        if pattern is None:
            with self._lock:
                # Longest first, so a secret containing another is masked whole.
                ordered = sorted(self._values, key=len, reverse=True)
                pattern = self._pattern = re.compile("|".join(map(re.escape, ordered)))
        return pattern.sub(MASK, text)


_registry = _Registry()


def redact(text: str) -> str:
    """Replace every known secret value in `text` with a mask."""
    return _registry.redact(text)


def dec_hook(type_: type, obj: Any) -> Any:
    """msgspec decoding hook: a JSON string becomes a `Secret` where a wire type asks for one."""
    if type_ is Secret:
        if not isinstance(obj, str):
            raise TypeError(f"expected a string, got {type(obj).__name__}")
        if "\x00" in obj:
            # It could not be passed to a process's environment anyway.
            raise ValueError("contains a NUL character")
        return Secret(obj)
    raise NotImplementedError(f"cannot decode {type_!r}")
