"""What `miglet run` does to its own process, and when it warns that a job could read the controller token.

Rules: pytest's own process is never hardened (a subreaper pytest would adopt every later test's orphans): what
`harden_process` does is checked in a child Python. Token files live in a directory `nobody` can reach, made
per test and removed after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from miglet import hardening
from miglet.config import Config
from miglet.hardening import is_child_subreaper, readable_by, token_exposures
from miglet.secret import Secret

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="files of other users and MIGLET_RUNNER_USER need root")


def test_harden_process_makes_miglet_non_dumpable_and_a_child_subreaper() -> None:
    probe = (
        "from miglet.hardening import harden_process, is_child_subreaper, is_dumpable\n"
        "before = (is_dumpable(), is_child_subreaper())\n"
        "problems = harden_process()\n"
        "print(before, (is_dumpable(), is_child_subreaper()), problems)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "(True, False) (False, True) []"


def test_without_prctl_miglet_says_what_it_could_not_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening, "_prctl", lambda: None)
    problems = hardening.harden_process()
    assert [what.split(":")[0] for what, _ in problems] == [
        "Cannot make MIGlet non-dumpable",
        "Cannot make MIGlet a child subreaper",
    ]
    assert {why for _, why in problems} == {"prctl is not available on this system"}
    assert not hardening.is_child_subreaper()


def test_pytest_itself_is_not_a_subreaper() -> None:
    # Sweeping "every descendant" is scoped to subreapers: in pytest it would be the test run's own processes.
    assert not is_child_subreaper()


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="miglet-token-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


@needs_root
@pytest.mark.parametrize(
    ("mode", "owner", "readable"),
    [(0o644, "root", True), (0o600, "root", False), (0o400, "nobody", True), (0o640, "root", False)],
)
def test_readable_by_follows_the_permission_bits(reachable: Path, mode: int, owner: str, *, readable: bool) -> None:
    token = reachable / "token"
    token.write_text("secret-token-value")
    token.chmod(mode)
    shutil.chown(token, owner)
    assert readable_by(token, NOBODY, [NOBODY]) is readable


@needs_root
def test_a_directory_on_the_way_can_keep_a_file_unreadable(reachable: Path) -> None:
    private = reachable / "private"
    private.mkdir(mode=0o700)
    token = private / "token"
    token.write_text("secret-token-value")
    token.chmod(0o644)
    assert not readable_by(token, NOBODY, [NOBODY])
    assert not readable_by(reachable / "missing", NOBODY, [NOBODY])


def config(tmp_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "vm_id": "vm-1",
        "pool_id": "pool-1",
        "controller_endpoint": "http://127.0.0.1:9",
        "controller_token": Secret("controller-token-0123456789"),
        "runner_dir": tmp_path,
    }
    values.update(overrides)
    return Config(**values)


def test_no_token_no_warning(tmp_path: Path) -> None:
    assert token_exposures(config(tmp_path, controller_token=None), None) == []


def test_a_runner_sharing_miglets_user_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1001)
    [exposure] = token_exposures(config(tmp_path), None)
    assert exposure.message.startswith("The runner runs as MIGlet's own user")
    assert exposure.fields == {"uid": 1001}


@needs_root
def test_a_runner_running_as_root_is_a_warning(tmp_path: Path) -> None:
    [exposure] = token_exposures(config(tmp_path), None)
    assert exposure.message.startswith("The runner runs as root")


@needs_root
def test_a_token_file_the_runner_user_can_read_is_a_warning(tmp_path: Path, reachable: Path) -> None:
    token = reachable / "token"
    token.write_text("controller-token-0123456789")
    token.chmod(0o644)
    [exposure] = token_exposures(config(tmp_path, runner_user="nobody"), str(token))
    assert exposure.fields == {"path": str(token), "runner_user": "nobody"}
    token.chmod(0o400)
    assert token_exposures(config(tmp_path, runner_user="nobody"), str(token)) == []
