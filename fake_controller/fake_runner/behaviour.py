"""The fake runner's behaviour file (`fake-runner.json` in the runner directory) and the job format.

Tests steer the fake with this file instead of a real GitHub: which tokens GitHub rejects, which jobs
arrive, how slow things are, whether the listener crashes or ignores Ctrl-C. It is re-read by every
invocation, so a test may change it between `config.sh` and `run.sh`.

Stdlib only (no msgspec) on purpose: the listener imports this, and it must run under any Python 3.11,
e.g. the system one, when the runner is started as an unprivileged user who cannot read the venv.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BEHAVIOUR_FILE = "fake-runner.json"

RESULTS = ("Succeeded", "SucceededWithIssues", "Failed", "Canceled", "Skipped", "Abandoned")
"""TaskResult names the real listener prints in `Job NAME completed with result: R`."""

COLOUR_MODES = ("auto", "always", "never")

LEAVE_BEHIND_WAYS = ("setsid", "double-fork", "hop")
"""How a process can be left behind to outlive the runner (see `leftovers`)."""


class BehaviourError(ValueError):
    """The behaviour file or a queued job is malformed."""


@dataclass(frozen=True)
class Job:
    """One job GitHub hands the runner: printed as `Running job: NAME`, then after `duration_s` as
    `Job NAME completed with result: RESULT`."""

    name: str
    result: str = "Succeeded"
    duration_s: float = 0.0
    lost: bool = False
    """GitHub took the job back before the runner could renew it: `Running job` is printed, no result line
    (the real JobDispatcher returns early; a run-once runner then leaves as after any job)."""
    leave_behind: tuple[str, ...] = ()
    """A hostile job: as it starts (before `Running job`), it starts a lingering process each of these ways
    (LEAVE_BEHIND_WAYS)."""
    lines: tuple[str, ...] = ()
    """Printed one by one while the job runs, spread over its duration (a worker's progress, say)."""
    github: dict[str, str] = field(default_factory=dict)
    """`GITHUB_*` variables of the job's environment, over the made-up ones (`worker.job_context`)."""

    @classmethod
    def from_obj(cls, obj: Any) -> Job:
        """Validate a decoded JSON object into a Job."""
        fields = _require_object(
            obj, "job", {"name", "result", "duration_s", "lost", "leave_behind", "lines", "github"}
        )
        name = fields.get("name")
        if not isinstance(name, str) or not name:
            raise BehaviourError("job: 'name' must be a non-empty string")
        result = fields.get("result", "Succeeded")
        if result not in RESULTS:
            raise BehaviourError(f"job {name!r}: 'result' must be one of {', '.join(RESULTS)}")
        lost = fields.get("lost", False)
        if not isinstance(lost, bool):
            raise BehaviourError(f"job {name!r}: 'lost' must be true or false")
        return cls(
            name=name,
            result=result,
            duration_s=_seconds(fields, "duration_s", 0.0),
            lost=lost,
            leave_behind=_ways(fields, "leave_behind"),
            lines=_strings(fields, "lines", ()),
            github=_environment(fields, "github"),
        )


@dataclass(frozen=True)
class Behaviour:
    """Everything a test can tune; every field is optional in the JSON file."""

    version: str = "2.336.0"
    connect_delay_s: float = 0.0
    """Pause before `√ Connected to GitHub` (session creation)."""
    listen_delay_s: float = 0.0
    """Pause between `Connected` and `Current runner version` / `Listening for Jobs`."""
    configure_delay_s: float = 0.0
    """Pause inside `configure` before talking to the fake GitHub (to test timeouts)."""
    cancel_delay_s: float = 0.0
    """How long a running job takes to wind down after Ctrl-C before it prints `Canceled`."""
    reject_tokens: tuple[str, ...] = ()
    """Registration/remove tokens the fake GitHub answers with 404 (bad or expired)."""
    reject_jitconfigs: tuple[str, ...] = ()
    """JIT configs whose registration 'was deleted': `run` fails to create a session (exit 1)."""
    existing_runners: tuple[str, ...] = ()
    """Runner names already registered at the fake GitHub (name conflict unless --replace)."""
    runner_groups: tuple[str, ...] = ("Default",)
    jobs: tuple[Job, ...] = ()
    """Jobs handed out, in order, as soon as the runner listens (before the queue directory)."""
    exit_after_listening: int | None = None
    """Crash simulation: the listener exits with this code right after `Listening for Jobs`."""
    ignore_sigint: bool = False
    """Ignore SIGINT and SIGTERM entirely, so only SIGKILL stops the listener."""
    colour: str = "auto"
    """ANSI colours: auto (tty, or DOTNET_SYSTEM_CONSOLE_ALLOW_ANSI_COLOR_REDIRECTION set), always, never."""
    strict_jitconfig: bool = False
    """If false, a JIT config that is not the real base64-JSON format is accepted as an opaque blob."""
    configure_leaves_behind: tuple[str, ...] = ()
    """A sloppy `config.sh`: as configure starts, it starts a lingering process each of these ways."""
    warmup_s: float = 0.0
    """How long `Runner.Listener warmup` keeps one core busy (the real one compiles every method it ships)."""

    @classmethod
    def from_obj(cls, obj: Any) -> Behaviour:
        """Validate a decoded JSON object (unknown keys are an error, to catch typos)."""
        known = {f for f in cls.__dataclass_fields__}
        fields = _require_object(obj, "behaviour", known)
        jobs = fields.get("jobs", [])
        if not isinstance(jobs, list):
            raise BehaviourError("behaviour: 'jobs' must be a list")
        exit_code = fields.get("exit_after_listening")
        if exit_code is not None and (type(exit_code) is not int or not 0 <= exit_code <= 255):
            raise BehaviourError("behaviour: 'exit_after_listening' must be null or an int 0..255")
        colour = fields.get("colour", "auto")
        if colour not in COLOUR_MODES:
            raise BehaviourError(f"behaviour: 'colour' must be one of {', '.join(COLOUR_MODES)}")
        return cls(
            version=_string(fields, "version", cls.version),
            connect_delay_s=_seconds(fields, "connect_delay_s", 0.0),
            listen_delay_s=_seconds(fields, "listen_delay_s", 0.0),
            configure_delay_s=_seconds(fields, "configure_delay_s", 0.0),
            cancel_delay_s=_seconds(fields, "cancel_delay_s", 0.0),
            reject_tokens=_strings(fields, "reject_tokens", ()),
            reject_jitconfigs=_strings(fields, "reject_jitconfigs", ()),
            existing_runners=_strings(fields, "existing_runners", ()),
            runner_groups=_strings(fields, "runner_groups", ("Default",)),
            jobs=tuple(Job.from_obj(j) for j in jobs),
            exit_after_listening=exit_code,
            ignore_sigint=_bool(fields, "ignore_sigint", False),
            colour=colour,
            strict_jitconfig=_bool(fields, "strict_jitconfig", False),
            configure_leaves_behind=_ways(fields, "configure_leaves_behind"),
            warmup_s=_seconds(fields, "warmup_s", 0.0),
        )

    def to_json(self) -> str:
        """Serialise (pretty) for writing `fake-runner.json`."""
        return json.dumps(asdict(self), indent=2) + "\n"


def load_behaviour(runner_dir: Path) -> Behaviour:
    """Read `fake-runner.json` from the runner directory; defaults when it is absent."""
    path = runner_dir / BEHAVIOUR_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Behaviour()
    return parse_behaviour(text, str(path))


def parse_behaviour(text: str, origin: str = BEHAVIOUR_FILE) -> Behaviour:
    """Parse behaviour JSON text, naming `origin` in errors."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BehaviourError(f"{origin}: invalid JSON: {exc}") from exc
    return Behaviour.from_obj(obj)


def _require_object(obj: Any, what: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise BehaviourError(f"{what}: expected a JSON object")
    unknown = sorted(set(obj) - known)
    if unknown:
        raise BehaviourError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return obj


def _seconds(fields: dict[str, Any], key: str, default: float) -> float:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BehaviourError(f"'{key}' must be a number >= 0")
    return float(value)


def _string(fields: dict[str, Any], key: str, default: str) -> str:
    value = fields.get(key, default)
    if not isinstance(value, str) or not value:
        raise BehaviourError(f"'{key}' must be a non-empty string")
    return value


def _strings(fields: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = fields.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BehaviourError(f"'{key}' must be a list of strings")
    return tuple(value)


def _ways(fields: dict[str, Any], key: str) -> tuple[str, ...]:
    ways = _strings(fields, key, ())
    if not set(ways) <= set(LEAVE_BEHIND_WAYS):
        raise BehaviourError(f"'{key}' must list some of {', '.join(LEAVE_BEHIND_WAYS)}")
    return ways


def _environment(fields: dict[str, Any], key: str) -> dict[str, str]:
    value = fields.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BehaviourError(f"'{key}' must be an object of strings")
    if any("\0" in k + v or "=" in k or not k for k, v in value.items()):
        raise BehaviourError(f"'{key}' must hold environment variables (no NUL, names without '=')")
    return dict(value)


def _bool(fields: dict[str, Any], key: str, default: bool) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise BehaviourError(f"'{key}' must be true or false")
    return value
