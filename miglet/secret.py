"""Secrets that cannot leak by accident.

A `Secret` never shows its value through `str`, `repr`, f-strings or msgspec encoding; `reveal()` is the one
door, used only where the value is handed to its consumer (an HTTP header, a runner's environment). Every secret
made is also remembered so that `redact()` can mask it in text that came from elsewhere: a runner's output line,
an exception message, a log record. A secret that has been handed over is remembered for good; of those never
handed over (the tokens of commands that were refused, say), only the latest are, so that a controller sending
floods of commands cannot make masking ever slower, nor the process ever larger.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any, Final, NamedTuple

MASK: Final = "***"
# Shorter values would mask ordinary words; nothing we treat as a secret is this short.
_MIN_REDACTED_LENGTH: Final = 6
# Secrets never handed over that are still masked: the latest this many forms (a secret has one or two).
RECENT_KEPT: Final = 512


class Secret:
    """A string value that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        _registry.add(value)

    def reveal(self) -> str:
        _registry.pin(self._value)
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


class _Compiled(NamedTuple):
    """One generation of secrets, compiled into one pattern."""

    pattern: re.Pattern[str]
    values: frozenset[str]
    longest: int


def _compile(values: frozenset[str]) -> _Compiled:
    # Longest first, so that at each position the longest secret starting there is the one found; a lookahead,
    # so that a match is found at every position, overlapping ones included.
    ordered = sorted(values, key=len, reverse=True)
    pattern = re.compile("(?=(" + "|".join(map(re.escape, ordered)) + "))")
    return _Compiled(pattern, values, len(ordered[0]))


class _Registry:
    """The secret values seen by this process, compiled into patterns for fast masking.

    Compiling a pattern costs time in proportion to the secrets in it, so secrets are compiled in generations,
    as a binary counter adds: a new secret makes a small generation, and two of about the same size merge. A
    process that learns many secrets one by one (many agents in one process) compiles each only a few times,
    and masking runs one pattern per generation, a few at most.
    """

    def __init__(self) -> None:
        # Handed over to a consumer: masked for as long as the process lives.
        self._pinned: set[str] = set()
        # Never handed over: the latest RECENT_KEPT, oldest first.
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._generations: tuple[_Compiled, ...] = ()
        # Secrets not compiled yet, and how many compiled ones have been forgotten since (a full rebuild drops
        # them once they are as many as those kept).
        self._pending: set[str] = set()
        self._forgotten = 0
        self._lock = threading.Lock()

    @staticmethod
    def _forms(value: str) -> tuple[str, ...]:
        # A value arrives as it was sent, but may be printed trimmed (config.sh prints what it read, and a
        # controller may add a newline): both forms are masked. A value that is mostly white space is neither,
        # as it would mask ordinary text.
        stripped = value.strip()
        if len(stripped) < _MIN_REDACTED_LENGTH:
            return ()
        return (value,) if stripped == value else (value, stripped)

    def add(self, value: str) -> None:
        forms = [form for form in self._forms(value) if form not in self._pinned]
        if not forms:
            return
        with self._lock:
            for form in forms:
                if form in self._recent:
                    self._recent.move_to_end(form)
                    continue
                self._recent[form] = None
                self._pending.add(form)
            while len(self._recent) > RECENT_KEPT:
                forgotten, _ = self._recent.popitem(last=False)
                if forgotten in self._pending:
                    self._pending.discard(forgotten)
                else:
                    self._forgotten += 1

    def pin(self, value: str) -> None:
        forms = self._forms(value)
        if all(form in self._pinned for form in forms):
            return
        with self._lock:
            for form in forms:
                if form not in self._pinned and form not in self._recent:
                    self._pending.add(form)
                self._pinned.add(form)
                self._recent.pop(form, None)

    def _current(self) -> tuple[_Compiled, ...]:
        if not self._pending and self._forgotten <= len(self._pinned) + len(self._recent):
            return self._generations
        with self._lock:
            kept = frozenset({*self._pinned, *self._recent})
            if self._forgotten > len(kept):
                # Mostly forgotten secrets: start again from those kept.
                generations = [_compile(kept)] if kept else []
                self._forgotten = 0
            else:
                generations = list(self._generations)
                pending = frozenset(self._pending & kept)
                if pending:
                    generations.append(_compile(pending))
                while len(generations) > 1 and len(generations[-1].values) * 2 > len(generations[-2].values):
                    newer, older = generations.pop(), generations.pop()
                    generations.append(_compile(older.values | newer.values))
            self._pending.clear()
            self._generations = tuple(generations)
        return self._generations

    @staticmethod
    def _spans(generations: tuple[_Compiled, ...], text: str) -> list[tuple[int, int]]:
        """Where `text` holds secrets: the union of every match, so that two secrets sharing characters (one
        ending where the other begins) are masked whole, not the first and what is left of the second."""
        found = [match.span(1) for compiled in generations for match in compiled.pattern.finditer(text)]
        if len(generations) > 1:
            found.sort()
        spans: list[tuple[int, int]] = []
        for start, end in found:
            if spans and start < spans[-1][1]:
                if end > spans[-1][1]:
                    spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        return spans

    @staticmethod
    def _masked(text: str, spans: list[tuple[int, int]], end: int) -> str:
        parts: list[str] = []
        position = 0
        for start, stop in spans:
            parts += (text[position:start], MASK)
            position = stop
        parts.append(text[position:end])
        return "".join(parts)

    def redact(self, text: str) -> str:
        generations = self._current()
        if not generations:
            return text
        spans = self._spans(generations, text)
        return self._masked(text, spans, len(text)) if spans else text

    def redact_partial(self, text: str) -> tuple[str, str]:
        generations = self._current()
        if not generations:
            return text, ""
        # A secret starting before `safe` ends within `text`; one starting later may go on past its end. The text
        # is split there, or, when a masked stretch reaches that far, where the stretch begins: a secret starting
        # later may overlap it, and must be masked together with it.
        safe = len(text) - max(compiled.longest for compiled in generations) + 1
        if safe <= 0:
            return "", text
        spans = self._spans(generations, text)
        split = safe
        complete = []
        for start, stop in spans:
            if stop <= safe:
                complete.append((start, stop))
            else:
                split = min(split, start)
                break
        return self._masked(text, complete, split), text[split:]


_registry = _Registry()


def redact(text: str) -> str:
    """Replace every known secret value in `text` with a mask."""
    return _registry.redact(text)


def redact_partial(text: str) -> tuple[str, str]:
    """Mask the start of a text that goes on (a line still being read), without ever holding the whole of it.

    Returns the masked part that nothing following can change, and the rest of `text` (shorter than the longest
    secret, so bounded) to be masked with what follows: `done + redact(rest + more) == redact(text + more)`.
    """
    return _registry.redact_partial(text)


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
