"""The runner's output relay: every line masked before it is cut, decoded whole, and bounded in memory.

Rules: `_relay_lines` reads a fake receive stream that hands over the chunks a test chooses (Hypothesis chooses
where the reads split the output), with no clock; one test runs a real `config.sh` instead, on the real clock
under a hard timeout. The secrets are made once, for the whole module: one
the size of a registration token, one the size of a JIT config (longer than any fixed overlap would be).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tracemalloc
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from miglet.runner.backend import ConfigureFailed, Grace, Registration
from miglet.runner.output import clean, interpret
from miglet.runner.process import CUT_MARK, MAX_LINE, ProcessRunner, _relay_lines
from miglet.secret import MASK, Secret, redact

TOKEN = Secret("AHTRELAYTOKEN0000000000000001")
JIT_CONFIG = Secret("".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(80)))  # 5,120 characters
SECRETS = (TOKEN.reveal(), JIT_CONFIG.reveal())


class Chunks(trio.abc.ReceiveStream):
    """A receive stream that hands over the given chunks, one per read, then its end."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = deque(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if max_bytes is not None and len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def aclose(self) -> None:
        pass


async def relay(chunks: Iterable[bytes]) -> list[str]:
    lines: list[tuple[str, str]] = []

    async def sink(stream: str, line: str) -> None:
        lines.append((stream, line))

    await _relay_lines(Chunks(chunks), "stdout", sink)
    assert {stream for stream, _ in lines} <= {"stdout"}
    return [line for _, line in lines]


def split(data: bytes, points: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(set(points)), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges) if end > start]


def expected(data: bytes) -> list[str]:
    """What the relay passes on: each line of the whole output, masked, then cut."""
    lines = data.decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    masked = [redact(line).rstrip("\r") for line in lines]
    return [line if len(line) <= MAX_LINE else line[:MAX_LINE] + CUT_MARK for line in masked]


# Any run of 11 characters or more of a secret holds one of these 8-character pieces, taken every 4 characters.
_PIECES = re.compile("|".join(re.escape(secret[i : i + 8]) for secret in SECRETS for i in range(0, len(secret) - 7, 4)))


def leaks(line: str) -> bool:
    """Whether `line` shows 11 characters or more of a secret."""
    return _PIECES.search(line) is not None


@given(secret=st.sampled_from(SECRETS), data=st.data())
async def test_a_secret_across_the_cut_is_masked_wherever_it_is_split(secret: str, data: st.DataObject) -> None:
    before_cut = data.draw(st.integers(0, len(secret)), label="characters of the secret before the cut")
    line = ("x" * (MAX_LINE - before_cut) + secret + "y" * 100 + "\n").encode()
    reads = data.draw(st.lists(st.integers(0, len(line)), max_size=4), label="read boundaries")
    [relayed] = await relay(split(line, reads))
    masked = "x" * (MAX_LINE - before_cut) + MASK + "y" * 100
    assert relayed == (masked if len(masked) <= MAX_LINE else masked[:MAX_LINE] + CUT_MARK)
    assert not leaks(relayed)


async def test_the_rest_of_an_overlong_line_is_dropped_not_read_as_lines_of_its_own() -> None:
    # The second read starts with what looks like a line of the runner's: it is the middle of a job's name.
    head = b"2024-01-15 10:30:00Z: Running job: "
    first = head + b"x" * (65536 - len(head))
    second = b"Job evil completed with result: Succeeded\n2024-01-15 10:30:05Z: Listening for Jobs\n"
    lines = await relay([first, second])
    assert lines == [first.decode()[:MAX_LINE] + CUT_MARK, "2024-01-15 10:30:05Z: Listening for Jobs"]
    signals = [type(interpret(clean(line))).__name__ for line in lines]
    assert signals == ["JobRunning", "RunnerListening"]


async def test_lines_are_cut_at_characters_never_inside_one() -> None:
    chunks = split(("√" * 6000 + "\n" + "€" * (MAX_LINE + 10) + "\n").encode(), range(1, 100_000, 4099))
    lines = await relay(chunks)
    assert lines == ["√" * 6000, "€" * MAX_LINE + CUT_MARK]


async def test_endless_output_without_a_newline_is_relayed_in_bounded_memory() -> None:
    chunk = b"x" * 65536

    def output() -> Iterable[bytes]:
        yield b"before\n"
        for _ in range(128):  # 8 MiB in one line
            yield chunk
        yield TOKEN.reveal().encode() + b"\nafter\n"

    tracemalloc.start()
    try:
        lines = await relay(output())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == ["before", "x" * MAX_LINE + CUT_MARK, "after"]
    assert peak < 1024 * 1024


# Output as a runner might print it: secrets (whole, or with white space around them), long runs that make
# lines overlong, multi-byte characters, bytes that are not UTF-8, and line ends.
pieces = st.one_of(
    st.sampled_from(SECRETS),
    st.sampled_from(SECRETS).map(lambda secret: f" {secret}\r"),
    st.integers(0, MAX_LINE + 64).map(lambda n: "x" * n),
    st.text(alphabet="ab \r\n√é𝄞", max_size=12),
    st.sampled_from(["\n", "\r\n"]),
)


@given(
    parts=st.lists(pieces.map(str.encode) | st.binary(max_size=3), max_size=12),
    data=st.data(),
)
async def test_relayed_lines_are_the_output_masked_then_cut_however_it_is_read(
    parts: list[bytes], data: st.DataObject
) -> None:
    output = b"".join(parts)
    reads = data.draw(st.lists(st.integers(0, len(output)), max_size=8), label="read boundaries")
    lines = await relay(split(output, reads))
    assert lines == expected(output)
    assert not any(map(leaks, lines))


async def test_a_token_config_sh_prints_across_the_cut_is_masked(tmp_path: Path) -> None:
    # A real config.sh that prints its token (from its environment) where the line is cut, then fails.
    runner_dir = tmp_path / "runner"
    runner_dir.mkdir()
    script = runner_dir / "config.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"head -c {MAX_LINE - 14} /dev/zero | tr '\\0' x >&2\n"
        f'echo "$ACTIONS_RUNNER_INPUT_TOKEN and {"z" * 50}" >&2\n'
        "exit 1\n"
    )
    script.chmod(0o755)
    registration = Registration(
        command_id="c1",
        url="https://github.com/o/r",
        name="vm",
        labels=("x",),
        group="default",
        ephemeral=True,
        token=TOKEN,
    )
    grace = Grace(5)
    lines: list[str] = []
    with trio.fail_after(20), pytest.raises(ConfigureFailed):
        await ProcessRunner(runner_dir, grace=lambda: grace).configure(registration, lambda _, line: lines.append(line))
    masked = "x" * (MAX_LINE - 14) + MASK + " and " + "z" * 50
    assert lines == [masked[:MAX_LINE] + CUT_MARK]
