"""Install a fake runner directory, and the helpers tests use to drive it.

`install(DIR)` lays out what MIGlet expects in MIGLET_RUNNER_DIR: `config.sh`, `run.sh`,
`run-helper.sh.template`, `env.sh`, `safe_sleep.sh`, `bin/Runner.Listener` (the shim, with the Python
interpreter baked in), `bin/fake_runner` (a copy of this package), `fake-runner.json` (behaviour) and
`_fake_github/` (calls log, job queue, registered runners, processes left behind). `enqueue_job`,
`read_calls` and `read_left_behind` are the test side of the fake GitHub.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .behaviour import BEHAVIOUR_FILE, RESULTS, Behaviour, Job
from .scripts import SCRIPTS, listener_shim
from .store import CALLS_FILE, JOBS_DIR, LEFT_BEHIND_FILE, github_dir

PACKAGE_DIR = Path(__file__).resolve().parent
"""This package; copied to `DIR/bin/fake_runner` so the shim can import it on its own, whoever runs it."""

_sequence = itertools.count()


def install(
    target: Path,
    behaviour: Behaviour | None = None,
    python: str | None = None,
    owner: str | None = None,
) -> Path:
    """Create (or refresh) a fake runner in `target`; returns its absolute path.

    `python` defaults to the interpreter running this; pass e.g. /usr/bin/python3 when the runner will
    run as a user who cannot read the venv (the listener needs only the stdlib). `owner` chowns the
    whole tree to that user, as a real runner directory belongs to the runner user.
    """
    root = target.resolve()
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for name, text in SCRIPTS.items():
        _write_executable(root / name, text)
    _write_executable(root / "bin" / "Runner.Listener", listener_shim(python or sys.executable))
    # A copy, not a link: the runner user must be able to read it even when the repository is private to root.
    copy = root / "bin" / "fake_runner"
    if copy.is_symlink() or copy.is_file():
        copy.unlink()
    elif copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (root / BEHAVIOUR_FILE).write_text((behaviour or Behaviour()).to_json(), encoding="utf-8")
    jobs = github_dir(root) / JOBS_DIR
    jobs.mkdir(parents=True, exist_ok=True)
    for shared in (github_dir(root), jobs):
        shared.chmod(0o777)  # runner user and test process both write here
    if owner is not None:
        _chown_tree(root, owner)
    return root


def write_behaviour(runner_dir: Path, behaviour: Behaviour) -> None:
    """Replace the behaviour of an installed fake runner (read by every later invocation)."""
    (runner_dir / BEHAVIOUR_FILE).write_text(behaviour.to_json(), encoding="utf-8")


def enqueue_job(
    runner_dir: Path,
    name: str,
    result: str = "Succeeded",
    duration_s: float = 0.0,
    *,
    lost: bool = False,
    leave_behind: tuple[str, ...] = (),
) -> Path:
    """Queue one job for a listening runner; written atomically (dot-file, then rename)."""
    job = Job.from_obj(
        {"name": name, "result": result, "duration_s": duration_s, "lost": lost, "leave_behind": list(leave_behind)}
    )
    if job.result not in RESULTS:  # pragma: no cover - from_obj already checks
        raise ValueError(result)
    queue = github_dir(runner_dir) / JOBS_DIR
    queue.mkdir(parents=True, exist_ok=True)
    stem = f"{time.time_ns():020d}-{os.getpid()}-{next(_sequence):06d}"
    tmp = queue / f".{stem}.tmp"
    tmp.write_text(json.dumps(asdict(job)))
    tmp.chmod(0o666)
    final = queue / f"{stem}.json"
    tmp.replace(final)
    return final


def read_calls(runner_dir: Path) -> list[dict[str, Any]]:
    """Every listener invocation recorded so far, oldest first."""
    return _read_records(runner_dir, CALLS_FILE)


def read_left_behind(runner_dir: Path) -> list[dict[str, Any]]:
    """Every process the fake left behind on purpose (pid, start_ticks, how, by), oldest first."""
    return _read_records(runner_dir, LEFT_BEHIND_FILE)


def _read_records(runner_dir: Path, name: str) -> list[dict[str, Any]]:
    try:
        text = (github_dir(runner_dir) / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def _chown_tree(root: Path, owner: str) -> None:
    """chown the whole tree, without following any symlink out of it."""
    entry = pwd.getpwnam(owner)
    os.lchown(root, entry.pw_uid, entry.pw_gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(Path(dirpath) / name, entry.pw_uid, entry.pw_gid)
