"""Every parser and decoder of outside input is total: whatever it is given, it returns a value or raises
MIGlet's own error for it, which its caller handles.

Rules: Hypothesis feeds arbitrary bytes and text, and JSON that is valid but wrong (the wrong shape, the right
shape with wrong types, deep nesting, strings that are not UTF-8, numbers no type can hold); examples are few
enough that the module takes a few seconds. Files are real files in `tmp_path` (FIFOs, directories, devices
included); what the code before these rules would block on or read for ever runs in a subprocess with a hard
timeout and a memory limit. /proc is replaced by patching the module's `open`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import miglet.app
from fake_controller import FakeController, Settings
from miglet import procfs, protocol, timings
from miglet.app import Agent
from miglet.cli import main
from miglet.config import VARIABLES, ConfigError, load_config
from miglet.machine import Phase
from miglet.retry import MAX_RETRY_AFTER, parse_retry_after
from miglet.runner.output import RunnerSignal, clean, interpret
from miglet.statefile import PID_LIMIT, StateFileError, StateFileMissing, read_state_file
from miglet.tokenfile import MAX_TOKEN_FILE_BYTES, TokenFileError, read_token_file
from tests.agents import ConfigFactory

# Enough to meet each kind of wrong input several times; the decoders of controller answers get more.
FEW = settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
MORE = settings(FEW, max_examples=120)

# ---------------------------------------------------------------------------------------------------------------
# JSON that is valid, or nearly, and wrong. A bytes value in a tree is written as it is: a token that no
# encoder would produce.

ODD_TOKENS = [
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"-0",
    b"9" * 5000,
    b"-" + b"9" * 30,
    b"18446744073709551616",
    b"NaN",
    b"Infinity",
    b'"\\udcff"',
    b'"\\u0000"',
    b'"2024-01-15T10:30:00"',  # a time without a zone
    b'"' + b"x" * 5000 + b'"',
]


def to_json(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return b"{" + b",".join(to_json(key) + b":" + to_json(item) for key, item in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(to_json(item) for item in value) + b"]"
    return msgspec.json.encode(value)


odd = st.sampled_from(ODD_TOKENS)
not_utf8 = st.sampled_from([b'"\xff"', b'"ok\xc3"', b'"\xed\xa0\x80"'])  # the last: a surrogate, encoded
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | odd | not_utf8
keys = st.text(max_size=8) | st.just(b'"\xff"')
trees = st.recursive(
    scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3), max_leaves=8
)


def deep(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


deep_values = st.integers(500, 5000).map(lambda depth: deep(depth))


def like(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with some of `fields`, each holding a plausible value or anything at all, and maybe a field
    nobody knows (skipped by a decoder, but still to be read through)."""
    wrong = not_utf8 | trees | deep_values
    optional = {name: value | wrong for name, value in fields.items()} | {"unknown": wrong}
    return st.fixed_dictionaries({}, optional=optional)


times = st.sampled_from(["2024-01-15T10:30:00Z", "2099-01-01T00:00:00+00:00"])
parameters = like(
    {
        "runner_url": st.just("https://github.com/o/r"),
        "registration_token": st.just("AHTXXXXXXXXXXXXXXXXXXXX"),
        "jit_config": st.just("jit-config-value"),
        "labels": st.lists(st.text(max_size=5), max_size=3),
        "runner_group": st.text(max_size=5),
        "expires_at": times,
        "reason": st.text(max_size=5),
        "grace_period_s": st.floats(allow_nan=False) | st.integers(),
        "remove_token": st.just("remove-token-value"),
    }
)
commands = like(
    {
        "id": st.text(max_size=8),
        "type": st.sampled_from(["register_runner", "shutdown", "reboot"]),
        "parameters": parameters,
        "created_at": times,
    }
)
envelopes = like({"commands": st.lists(commands, max_size=4), "vm_id": st.text(max_size=5)})
acknowledgments = like(
    {
        "status": st.sampled_from(["acknowledged", "pending"]),
        "acknowledged": st.booleans(),
        "vm_id": st.text(max_size=5),
        "message": st.text(max_size=5),
    }
)


def bodies(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, any JSON, the endpoint's shape gone wrong, deep nesting, and all of those cut short."""
    whole = st.one_of(
        st.binary(max_size=64),
        trees.map(to_json),
        shaped.map(to_json),
        st.builds(lambda depth, inner: deep(depth, to_json(inner)), st.integers(1, 3000), shaped),
    )
    return whole | st.builds(lambda body, cut: body[:cut], whole, st.integers(0, 64))


# ---------------------------------------------------------------------------------------------------------------
# Controller answers


@MORE
@given(bodies(acknowledgments))
def test_the_acknowledgment_decoder_is_total(body: bytes) -> None:
    try:
        ack = protocol.decode_acknowledgment(body)
    except protocol.ProtocolError:
        return
    assert isinstance(ack.is_acknowledged, bool)


@MORE
@given(bodies(envelopes))
def test_the_commands_decoder_is_total(body: bytes) -> None:
    try:
        batch = protocol.decode_commands(body)
    except protocol.ProtocolError:
        return
    assert all(isinstance(command, protocol.Command) for command in batch.commands)
    assert all(isinstance(r.id, str | None) and isinstance(r.type, str | None) for r in batch.rejected)


# (where, what) pairs that make a command unusable; where is a path of keys into the command.
BAD_FIELDS = [
    (("id",), b'"\xff"'),
    (("id",), b"1e400"),
    (("type",), b'"\xff"'),
    (("created_at",), b'"\xff"'),
    (("created_at",), b'"2024-01-15T10:30:00"'),
    (("parameters",), b"[]"),
    (("parameters",), deep(40)),
]
BAD_SHUTDOWN_FIELDS = [
    (("parameters", "reason"), b'"\xff"'),
    (("parameters", "grace_period_s"), b"1e400"),
    (("parameters", "grace_period_s"), b"9" * 5000),
    (("parameters", "grace_period_s"), b"-1"),
    (("parameters", "remove_token"), b'"\xff"'),
]
BAD_REGISTRATION_FIELDS = [
    (("parameters", "registration_token"), b'"\xff"'),
    (("parameters", "registration_token"), b'"abc\\u0000def"'),
    (("parameters", "runner_url"), b'"https://github.com/\xff"'),
    (("parameters", "labels"), b'["linux", "\xff"]'),
    (("parameters", "expires_at"), b'"\xed\xa0\x80"'),
]


def good_command(kind: str, index: int) -> dict[str, Any]:
    if kind == "shutdown":
        return {"id": f"good-{index}", "type": "shutdown", "parameters": {"reason": "scale-in", "grace_period_s": 5}}
    return {
        "id": f"good-{index}",
        "type": "register_runner",
        "parameters": {"runner_url": "https://github.com/o/r", "registration_token": "AHTXXXXXXXXXXXXXXXXXXXX"},
        "created_at": "2024-01-15T10:30:00Z",
    }


def spoil(command: dict[str, Any], where: tuple[str, ...], what: bytes) -> dict[str, Any]:
    spoiled: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(command))
    target = spoiled
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = what
    return spoiled


@FEW
@given(
    kinds=st.lists(st.sampled_from(["shutdown", "register_runner"]), max_size=4),
    bad=st.one_of(
        st.tuples(st.sampled_from(["shutdown", "register_runner"]), st.sampled_from(BAD_FIELDS)),
        st.tuples(st.just("shutdown"), st.sampled_from(BAD_SHUTDOWN_FIELDS)),
        st.tuples(st.just("register_runner"), st.sampled_from(BAD_REGISTRATION_FIELDS)),
    ),
    position=st.integers(0, 4),
)
def test_one_bad_command_is_rejected_alone(
    kinds: list[str], bad: tuple[str, tuple[tuple[str, ...], bytes]], position: int
) -> None:
    bad_kind, (where, what) = bad
    good = [good_command(kind, index) for index, kind in enumerate(kinds)]
    items = [*good]
    items.insert(min(position, len(items)), spoil(good_command(bad_kind, 99) | {"id": "bad"}, where, what))
    batch = protocol.decode_commands(to_json({"commands": items, "vm_id": "vm-123"}))
    assert [command.id for command in batch.commands] == [command["id"] for command in good]
    [rejected] = batch.rejected
    # What can be recovered of its name is kept, so that the controller hears which command failed.
    assert rejected.id == (None if where == ("id",) else "bad")
    assert rejected.type == (None if where == ("type",) else bad_kind)
    assert "malformed command" in rejected.error
    assert "AHTX" not in rejected.error


@pytest.mark.parametrize("depth", [1_000, 100_000, 500_000])  # 500,000 levels: a 1 MiB answer
@pytest.mark.parametrize(
    "decode", [protocol.decode_acknowledgment, protocol.decode_commands], ids=["acknowledgment", "commands"]
)
def test_deep_nesting_is_an_unusable_answer(decode: Callable[[bytes], object], depth: int) -> None:
    for body in (deep(depth), b'{"commands":[],"x":' + deep(depth) + b"}", b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(protocol.ProtocolError, match=r"nested too deeply|Expected `object`"):
            decode(body)


@pytest.mark.parametrize(
    ("decode", "body"),
    [
        (protocol.decode_acknowledgment, b'{"status": "acknowledged\xff", "acknowledged": true}'),
        (protocol.decode_acknowledgment, b'{"acknowledged": true, "message": "\xc3"}'),
        (protocol.decode_commands, b'{"commands": [], "vm_id": "vm-\xff"}'),
    ],
)
def test_bad_utf8_in_a_known_field_is_an_unusable_answer(decode: Callable[[bytes], object], body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError, match="not valid UTF-8"):
        decode(body)


# ---------------------------------------------------------------------------------------------------------------
# Retry-After

http_dates = st.builds(
    "{}, {} {} {} {}:{}:{} {}".format,
    st.sampled_from(["Mon", "Fri", "Xyz"]),
    st.integers(-99, 99),
    st.sampled_from(["Jan", "Dec", "Foo"]),
    st.one_of(st.integers(1, 10_000), st.integers(), st.just(99999999999999999999)),
    st.integers(-99, 99),
    st.integers(-99, 99),
    st.integers(-99, 99),
    st.sampled_from(["GMT", "UT", "+0000", "-2359", "+9999", "PST", ""]),
)


@FEW
@given(st.one_of(st.text(), http_dates, st.integers(min_value=0).map(str), st.just("9" * 5000)))
def test_retry_after_is_a_bounded_number_of_seconds_or_none(header: str) -> None:
    seconds = parse_retry_after(header)
    assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None),
        ("Mon, 01 Jan 9999 00:00:00 GMT", MAX_RETRY_AFTER),
        ("9" * 5000, MAX_RETRY_AFTER),
        ("86400", MAX_RETRY_AFTER),
        ("Mon, 01 Jan 1900 00:00:00 GMT", 0.0),
        ("\x00", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits: digits to str.isdigit(), not delta-seconds
    ],
)
def test_absurd_retry_after_values(header: str, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


# ---------------------------------------------------------------------------------------------------------------
# The state file

GOOD_RECORD = {
    "state": "Idle",
    "since": "2024-01-15T10:30:00.000Z",
    "updated_at": "2024-01-15T10:30:00.000Z",
    "vm_id": "vm-123",
    "pool_id": "pool-001",
    "runner_name": "vm-123",
    "job": None,
    "pid": 4242,
    "version": "0.1.0",
    "runner_pid": 4343,
}

# Each writes something unusable at a path. The pids are the ones kill() gives another meaning (0: the
# caller's process group; -1: every process; 1: init) or that no process can have.
CORRUPT_STATE_FILES: dict[str, Callable[[Path], object]] = {
    "not JSON": lambda path: path.write_bytes(b"{not json"),
    "empty": lambda path: path.write_bytes(b""),
    "wrong shape": lambda path: path.write_bytes(b"[1, 2, 3]"),
    "missing fields": lambda path: path.write_bytes(b'{"state": "Idle"}'),
    "wrong types": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"pid": "4242", "job": 7})),
    "not UTF-8": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"state": b'"Idle\xff"'})),
    "deeply nested": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"extra": deep(5000)})),
    "huge number": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"refresh_s": b"1e400"})),
    "pid 0": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"pid": 0})),
    "pid -1": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"pid": -1})),
    "pid beyond the range": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"pid": 2**40})),
    "runner_pid 0": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"runner_pid": 0})),
    "runner_pid 1": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"runner_pid": 1})),
    "runner_pid -1": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"runner_pid": -1})),
    "runner_pid beyond the range": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"runner_pid": PID_LIMIT})),
    "refresh_s 0": lambda path: path.write_bytes(to_json(GOOD_RECORD | {"refresh_s": 0})),
    "huge file": lambda path: path.write_bytes(to_json(GOOD_RECORD) + b" " * (64 * 1024)),
    "directory": lambda path: path.mkdir(),
    "FIFO": lambda path: os.mkfifo(path),
    "device": lambda path: path.symlink_to("/dev/zero"),
}
corrupt_state_files = pytest.mark.parametrize("corrupt", CORRUPT_STATE_FILES.values(), ids=CORRUPT_STATE_FILES.keys())


@corrupt_state_files
def test_a_corrupt_state_file_raises_a_state_file_error(tmp_path: Path, corrupt: Callable[[Path], object]) -> None:
    path = tmp_path / "state.json"
    corrupt(path)
    with pytest.raises(StateFileError) as caught:
        read_state_file(path)
    assert not isinstance(caught.value, StateFileMissing)


def test_a_missing_state_file_is_told_apart(tmp_path: Path) -> None:
    with pytest.raises(StateFileMissing):
        read_state_file(tmp_path / "absent.json")


@FEW
@given(
    st.one_of(st.binary(max_size=256), like({name: st.just(value) for name, value in GOOD_RECORD.items()}).map(to_json))
)
def test_reading_a_state_file_is_total(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    try:
        record = read_state_file(path)
    except StateFileError:
        return
    assert 1 <= record.pid < PID_LIMIT
    assert record.runner_pid is None or 2 <= record.runner_pid < PID_LIMIT


@corrupt_state_files
def test_miglet_status_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], corrupt: Callable[[Path], object]
) -> None:
    path = tmp_path / "state.json"
    corrupt(path)
    assert main(["status", "--state-file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"miglet: cannot read state file {path}: ")


def test_miglet_status_takes_pid_1_for_alive_without_signalling_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In a container without --init, the agent is pid 1, which lives as long as the container.
    signalled: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: signalled.append(pid))
    path = tmp_path / "state.json"
    now = datetime.now(UTC).isoformat()
    path.write_bytes(to_json(GOOD_RECORD | {"pid": 1, "updated_at": now}))
    assert main(["status", "--state-file", str(path)]) == 0
    assert signalled == []


# What made start-up fail (exit 1, or hang) or reach kill(): the rest are ignored the same way.
AT_START_UP = ["not JSON", "not UTF-8", "deeply nested", "huge file", "FIFO", "device", "directory", "pid 0"]
AT_START_UP += [name for name in CORRUPT_STATE_FILES if name.startswith("runner_pid")]


@pytest.mark.parametrize("corrupt", [CORRUPT_STATE_FILES[name] for name in AT_START_UP], ids=AT_START_UP)
async def test_start_up_ignores_a_corrupt_state_file_with_one_warning(
    make_config: ConfigFactory,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    corrupt: Callable[[Path], object],
) -> None:
    caplog.set_level(logging.WARNING, logger="miglet")
    config = make_config()
    corrupt(config.state_file)
    kills: list[int] = []
    monkeypatch.setattr(miglet.app, "kill_leftover_runner", lambda pid, runner_dir: kills.append(pid))
    # No backend given: the agent makes its own, which starts nothing before a registration, and reads the file.
    controller = FakeController(Settings(send_registration=False))
    agent = Agent(config, transport=httpx.ASGITransport(app=controller), handle_signals=False)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.driver.wait_for(lambda state: state.phase is Phase.READY)
            agent.request_stop("test over")
    assert agent.exit_code == 0
    assert kills == []
    warnings = [record for record in caplog.records if record.getMessage() == "Ignoring an unusable state file"]
    assert len(warnings) == 1


# ---------------------------------------------------------------------------------------------------------------
# /proc


class FakeProc:
    """Stands in for the module's `open`, answering every /proc path with the given bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def __call__(self, path: str, mode: str = "r") -> io.BytesIO:
        return io.BytesIO(self.files.get(Path(path).name, b""))


stat_fields = st.lists(
    st.one_of(st.integers(min_value=0).map(str), st.text(max_size=6), st.just("9" * 400), st.just("-5")).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    ),
    min_size=15,
    max_size=25,
)


def stat_line(start_ticks: bytes) -> bytes:
    """A stat line as the kernel writes it, but for the process's start time."""
    return b"42 (mig) let) S " + b" ".join([b"1"] * 18 + [start_ticks, b"0"])


stat_lines = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda name, fields: b"42 (" + name + b") " + b" ".join(fields), st.binary(max_size=20), stat_fields),
    st.one_of(st.integers(min_value=0).map(str), st.just("9" * 400), st.just("-5")).map(str.encode).map(stat_line),
)
uptimes = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"inf 1.0", b"-inf 1.0", b"nan 1.0", b"1e400 1.0", b"1_0 1.0"]),
    st.floats().map(lambda seconds: f"{seconds} 1.0".encode()),
)


@FEW
@given(stat_lines)
def test_reading_a_stat_line_is_total(monkeypatch: pytest.MonkeyPatch, line: bytes) -> None:
    fake = FakeProc()
    fake.files["stat"] = line
    monkeypatch.setattr(procfs, "open", fake, raising=False)
    try:
        entry = procfs.read_entry(42)
    except ValueError:
        entry = None
    if entry is not None:
        assert all(0 <= number < 2**64 for number in (entry.ppid, entry.group, entry.session, entry.start_ticks))
    try:
        stat = procfs.read_stat(42)
    except ValueError:
        return
    assert all(0 <= number < 2**64 for number in (stat.session, stat.start_ticks))
    assert 0 <= stat.cpu_ticks < 2**65


@FEW
@given(stat=stat_lines, uptime=uptimes)
def test_the_process_start_time_is_a_finite_time_at_most_now(
    monkeypatch: pytest.MonkeyPatch, stat: bytes, uptime: bytes
) -> None:
    fake = FakeProc()
    fake.files.update(stat=stat, uptime=uptime)
    monkeypatch.setattr(procfs, "open", fake, raising=False)
    monkeypatch.setattr(timings, "open", fake, raising=False)
    started = timings.process_start()
    assert math.isfinite(started)
    assert started <= time.monotonic()


def test_a_stat_line_with_an_absurd_number_is_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeProc()
    fake.files["stat"] = stat_line(b"9" * 400)
    monkeypatch.setattr(procfs, "open", fake, raising=False)
    with pytest.raises(ValueError, match="unreadable"):
        procfs.read_stat(42)


# ---------------------------------------------------------------------------------------------------------------
# The controller token file


def test_a_token_file_may_be_a_symlink_to_a_regular_file(tmp_path: Path) -> None:
    # Kubernetes mounts a secret as a symlink into a hidden, atomically replaced directory.
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "token").write_text("ctl-token-value-123\n")
    (tmp_path / "token").symlink_to(tmp_path / "..data" / "token")
    assert read_token_file(tmp_path / "token").reveal() == "ctl-token-value-123"


def test_a_token_file_of_at_most_64_kib(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("a" * (MAX_TOKEN_FILE_BYTES - 1) + "\n")
    assert len(read_token_file(path).reveal()) == MAX_TOKEN_FILE_BYTES - 1
    path.write_text("a" * MAX_TOKEN_FILE_BYTES + "\n")
    with pytest.raises(TokenFileError, match="larger than 65536 bytes"):
        read_token_file(path)
    os.truncate(path, 1 << 40)  # sparse: a terabyte that costs nothing unless read
    with pytest.raises(TokenFileError, match="larger than 65536 bytes"):
        read_token_file(path)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda path: os.mkfifo(path), "is a FIFO, not a regular file"),
        (lambda path: path.mkdir(), "is a directory, not a regular file"),
        (lambda path: path.symlink_to("/dev/null"), "is a device, not a regular file"),
        (lambda path: None, "cannot read"),
        (lambda path: path.write_bytes(b" \n\t "), "is empty"),
        (lambda path: path.write_bytes(b"token-\xff-value"), "is not UTF-8 text"),
        (lambda path: path.write_bytes(b"token value with spaces"), "must hold at least 8 characters"),
    ],
)
def test_an_unusable_token_file_is_named_with_its_problem(
    tmp_path: Path, make: Callable[[Path], object], problem: str
) -> None:
    path = tmp_path / "token"
    make(path)
    with pytest.raises(TokenFileError) as caught:
        read_token_file(path)
    assert f"'{path}'" in str(caught.value)
    assert problem in str(caught.value)


MARK = "Zq9-"  # no message says this: where a token starts with it, the message must not show it


@FEW
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(str.encode) | st.text().map(lambda t: MARK + t))
def test_reading_a_token_file_is_total_and_never_quotes_it(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        token = read_token_file(path)
    except TokenFileError as exc:
        assert MARK not in str(exc)
        return
    assert isinstance(content, str) or token.reveal() == content.decode().strip()


def limited_memory() -> None:
    # Reading /dev/zero to its end would otherwise take the machine's memory before the timeout.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize(
    ("variable", "make", "problem"),
    [
        ("MIGLET_CONTROLLER_TOKEN_FILE", lambda path: os.mkfifo(path), "is a FIFO, not a regular file"),
        ("MIGLET_CONTROLLER_TOKEN_FILE", lambda path: path.symlink_to("/dev/zero"), "is a device"),
        ("MIGLET_CONTROLLER_TOKEN_FILE", lambda path: path.mkdir(), "is a directory"),
        ("MIGLET_CA_BUNDLE", lambda path: os.mkfifo(path), "is not a regular file"),
        ("MIGLET_CA_BUNDLE", lambda path: path.symlink_to("/dev/zero"), "is not a regular file"),
    ],
)
def test_a_file_setting_that_is_no_regular_file_is_a_configuration_error(
    tmp_path: Path, variable: str, make: Callable[[Path], object], problem: str
) -> None:
    path = tmp_path / "file"
    make(path)
    env = {
        "PATH": "/usr/bin:/bin",
        "MIGLET_VM_ID": "vm-123",
        "MIGLET_POOL_ID": "pool-001",
        "MIGLET_CONTROLLER_ENDPOINT": "http://127.0.0.1:9",
        variable: str(path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "miglet", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=limited_memory,
    )
    assert result.returncode == 2
    # One line for it (and others for what else check-config finds wrong, such as the runner directory).
    lines = result.stderr.splitlines()
    assert all(line.startswith("miglet: configuration error: ") for line in lines)
    [line] = [line for line in lines if line.startswith(f"miglet: configuration error: {variable}: ")]
    assert line.startswith(f"miglet: configuration error: {variable}: '{path}' ")
    assert problem in line


# ---------------------------------------------------------------------------------------------------------------
# Configuration values and runner output

# These three touch the file system or the user database: they get values that are harmless there.
FILE_SETTINGS = {
    "MIGLET_RUNNER_USER": st.sampled_from(["nobody", "root", "no-such-user", "no\x00body"]),
    "MIGLET_CA_BUNDLE": st.sampled_from(["/nonexistent/ca.pem", "/", "ca\x00.pem"]),
    "MIGLET_CONTROLLER_TOKEN_FILE": st.sampled_from(["/nonexistent/token", "/", "tok\x00en"]),
}
values = st.one_of(
    st.text(),
    st.from_regex(r"\s*[-+]?[0-9_.eE]*(inf|nan)?\s*", fullmatch=True),
    st.just("9" * 5000),
    st.sampled_from(["1e400", "-0", "0x10", "\u0661", "nan", "-inf", "http://[::1", "http://h:99999999999999999999"]),
)


@FEW
@given(
    st.dictionaries(
        st.sampled_from([variable.name for variable in VARIABLES if variable.name not in FILE_SETTINGS]),
        values,
        max_size=8,
    ),
    st.fixed_dictionaries({}, optional=FILE_SETTINGS),
)
def test_load_config_returns_a_config_or_raises_config_error(text: dict[str, str], files: dict[str, str]) -> None:
    env = {
        "MIGLET_VM_ID": "vm-123",
        "MIGLET_POOL_ID": "pool-001",
        "MIGLET_CONTROLLER_ENDPOINT": "http://localhost",
        **text,
        **files,
    }
    try:
        load_config(env)
    except ConfigError as exc:
        assert "\n" not in str(exc)  # the command line prints it as one line


@FEW
@given(st.text() | st.sampled_from(["\x1b[" * 1000, "Job " + "a completed with result: " * 500, "Running job: \n"]))
def test_runner_output_is_read_whatever_the_runner_prints(line: str) -> None:
    cleaned = clean(line)
    assert not any(character in cleaned for character in "\x00\x1b\r\x7f")
    for text in (line, cleaned):
        assert interpret(text) is None or isinstance(interpret(text), RunnerSignal.__args__)
