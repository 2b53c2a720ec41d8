"""Configuration from the environment (docs/operations.md lists every setting).

Each setting is described once, by the `Setting` that annotates its field of `Config`: its variable, its
meaning and how it is read; the field holds its default. `load_config`, `--help` (through `VARIABLES`) and the
checks of the docs and the packaging all come from there. Every value is checked before MIGlet touches the
network: a bad one raises `ConfigError`, which names the variable and the problem in one line, and the command
line turns it into exit code 2.
"""

from __future__ import annotations

import os
import pwd
import re
import ssl
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_type_hints
from urllib.parse import SplitResult, urlsplit

import msgspec

from miglet.secret import Secret
from miglet.tokenfile import BEARER_TOKEN, BEARER_TOKEN_RULE, TokenFileError, read_token_file

LogFormat = Literal["auto", "json", "text"]
LogLevel = Literal["debug", "info", "warning", "error"]
Preemption = Literal["off", "aws", "gcp", "azure"]
Warmup = Literal["auto", "off"]
# The longest a long poll may ask the controller to hold a request (MIGLET_COMMAND_WAIT), in seconds.
MAX_COMMAND_WAIT: Final = 600
# Each cloud's metadata service, where MIGLET_METADATA_ENDPOINT does not say otherwise.
METADATA_ENDPOINTS: Final = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}

# Ids end up in URL paths and runner names: keep them to characters that need no quoting anywhere.
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# Polling, heartbeats and retries faster than this would be request storms, not a configuration.
MIN_INTERVAL: Final = 0.1
MIN_RETRY_BASE: Final = 0.01


class Variable(msgspec.Struct, frozen=True):
    """A setting as an operator sees it: its variable, its default as shown, what it means."""

    name: str
    default: str
    meaning: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.removeprefix("MIGLET_").lower().replace("_", "-")


# Reads one setting: (the reader, the variable's name, the field's default) -> the value.
ReadSetting = Callable[["_Reader", str, Any], Any]


class Setting(msgspec.Struct, frozen=True):
    """What a field of `Config` is to the operator: a `Config` field's annotation, the one place it is described.

    `shown` is the default as the help and the docs show it, where the field's own default does not say it.
    """

    variable: str
    meaning: str
    read: ReadSetting
    shown: str | None = None
    secret: bool = False


class ConfigError(Exception):
    """A configuration value is missing or invalid."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's effective configuration; each field's `Setting` says which variable sets it and how."""

    vm_id: Annotated[str, Setting("MIGLET_VM_ID", "this VM's id, used in every URL and event", _identifier())]
    pool_id: Annotated[str, Setting("MIGLET_POOL_ID", "pool id, sent in events", _identifier())]
    controller_endpoint: Annotated[
        str, Setting("MIGLET_CONTROLLER_ENDPOINT", "controller base URL, e.g. https://controller:8080", _endpoint)
    ]
    org_id: Annotated[str | None, Setting("MIGLET_ORG_ID", "org id, sent in events when set", _optional_id())] = None
    controller_token: Annotated[
        Secret | None,
        Setting("MIGLET_CONTROLLER_TOKEN", "bearer token for every controller request", _controller_token, secret=True),
    ] = None
    # Where the token came from, read again when the controller refuses it (a rotated token).
    controller_token_file: Annotated[
        Path | None,
        Setting(
            "MIGLET_CONTROLLER_TOKEN_FILE",
            "file holding the bearer token (read again when the controller refuses it)",
            _path,
        ),
    ] = None
    ca_bundle: Annotated[
        Path | None,
        Setting(
            "MIGLET_CA_BUNDLE", "CA file for TLS to the controller (default: the OS trust store)", _ca_bundle, "system"
        ),
    ] = None
    allow_insecure: Annotated[
        bool, Setting("MIGLET_ALLOW_INSECURE", "allow plain http:// to a non-loopback controller", _boolean)
    ] = False
    poll_interval: Annotated[
        float, Setting("MIGLET_POLL_INTERVAL", "seconds between command polls", _number(minimum=MIN_INTERVAL))
    ] = 5.0
    command_wait: Annotated[
        int,
        Setting(
            "MIGLET_COMMAND_WAIT",
            "long-poll: ask the controller to hold a poll up to N s (0: off)",
            _integer(minimum=0, maximum=MAX_COMMAND_WAIT),
        ),
    ] = 20
    heartbeat_interval: Annotated[
        float,
        Setting(
            "MIGLET_HEARTBEAT_INTERVAL",
            "seconds between heartbeat events once acknowledged (0: off)",
            _number(minimum=MIN_INTERVAL, zero_is_off=True),
        ),
    ] = 30.0
    runner_dir: Annotated[
        Path, Setting("MIGLET_RUNNER_DIR", "directory holding the runner's config.sh and run.sh", _path)
    ] = Path("/opt/actions-runner")
    runner_name: Annotated[str, Setting("MIGLET_RUNNER_NAME", "runner name at GitHub", _optional_id(), "the VM id")] = (
        ""
    )
    runner_user: Annotated[
        str | None, Setting("MIGLET_RUNNER_USER", "when MIGlet runs as root, run the runner as this user", _runner_user)
    ] = None
    runner_disable_update: Annotated[
        bool, Setting("MIGLET_RUNNER_DISABLE_UPDATE", "register with --disableupdate", _boolean)
    ] = False
    runner_warmup: Annotated[
        Warmup,
        Setting(
            "MIGLET_RUNNER_WARMUP",
            "auto: warm the runner up (Runner.Listener warmup) while waiting for a registration; off",
            _choice("auto", "off"),
        ),
    ] = "auto"
    job_identity: Annotated[
        bool,
        Setting(
            "MIGLET_JOB_IDENTITY",
            "install job hooks that tell the controller which workflow run each job belongs to",
            _boolean,
        ),
    ] = True
    allow_http_runner_url: Annotated[
        bool,
        Setting("MIGLET_ALLOW_HTTP_RUNNER_URL", "accept an http:// runner_url (a GitHub Enterprise Server)", _boolean),
    ] = False
    ephemeral: Annotated[
        bool, Setting("MIGLET_EPHEMERAL", "register with --ephemeral: one job, then the VM is done", _boolean)
    ] = True
    shutdown_grace: Annotated[
        float,
        Setting("MIGLET_SHUTDOWN_GRACE", "seconds a stopping runner gets before it is killed", _number(minimum=0)),
    ] = 30.0
    flush_timeout: Annotated[
        float,
        Setting(
            "MIGLET_FLUSH_TIMEOUT",
            "seconds a stop waits to deliver the events still owed to the controller",
            _number(minimum=0, maximum=3600),
        ),
    ] = 60.0
    state_file: Annotated[Path, Setting("MIGLET_STATE_FILE", "where the current state is written", _path)] = Path(
        "/run/miglet/state.json"
    )
    listen_timeout: Annotated[
        float,
        Setting(
            "MIGLET_LISTEN_TIMEOUT",
            "seconds the runner gets to start listening for jobs",
            _number(minimum=0, exclusive=True),
        ),
    ] = 300.0
    ack_timeout: Annotated[
        float,
        Setting(
            "MIGLET_ACK_TIMEOUT",
            "give up (exit 1) when vm_started is not acknowledged in N s (0: never)",
            _number(minimum=0),
        ),
    ] = 0.0
    registration_timeout: Annotated[
        float,
        Setting(
            "MIGLET_REGISTRATION_TIMEOUT",
            "give up (exit 1) after N s in Ready without a registration (0: never)",
            _number(minimum=0),
        ),
    ] = 0.0
    idle_timeout: Annotated[
        float,
        Setting(
            "MIGLET_IDLE_TIMEOUT", "stop (exit 0) when no job starts within N s of Idle (0: never)", _number(minimum=0)
        ),
    ] = 0.0
    clock_skew: Annotated[
        float,
        Setting(
            "MIGLET_CLOCK_SKEW",
            "seconds of clock skew allowed when checking a token's expires_at",
            _number(minimum=0, maximum=3600),
        ),
    ] = 30.0
    retry_base: Annotated[
        float,
        Setting(
            "MIGLET_RETRY_BASE",
            "first retry delay ceiling in seconds (exponential backoff, full jitter)",
            _number(minimum=MIN_RETRY_BASE),
        ),
    ] = 0.5
    retry_cap: Annotated[
        float, Setting("MIGLET_RETRY_CAP", "largest retry delay in seconds", _number(minimum=MIN_RETRY_BASE))
    ] = 30.0
    outbox_capacity: Annotated[
        int,
        Setting(
            "MIGLET_OUTBOX_CAPACITY",
            "events kept while the controller is unreachable (heartbeats go first)",
            _integer(minimum=10, maximum=1_000_000),
        ),
    ] = 1000
    log_format: Annotated[
        LogFormat,
        Setting(
            "MIGLET_LOG_FORMAT",
            "json or text; auto: text on a terminal, json otherwise",
            _choice("auto", "json", "text"),
        ),
    ] = "auto"
    log_level: Annotated[
        LogLevel,
        Setting("MIGLET_LOG_LEVEL", "debug, info, warning or error", _choice("debug", "info", "warning", "error")),
    ] = "info"

    preemption: Annotated[
        Preemption,
        Setting(
            "MIGLET_PREEMPTION",
            "which cloud's notices of preemption or maintenance to watch: aws, gcp, azure or off",
            _choice("off", "aws", "gcp", "azure"),
        ),
    ] = "off"
    metadata_endpoint: Annotated[
        str | None,
        Setting(
            "MIGLET_METADATA_ENDPOINT",
            "base URL of the cloud's metadata service",
            _metadata_endpoint,
            shown="the cloud's own",
        ),
    ] = None
    preemption_margin: Annotated[
        float,
        Setting(
            "MIGLET_PREEMPTION_MARGIN",
            "seconds before a preemption's deadline by which a running job is stopped",
            _number(minimum=0, maximum=600),
        ),
    ] = 20.0

    @property
    def effective_runner_name(self) -> str:
        return self.runner_name or self.vm_id

    @property
    def effective_metadata_endpoint(self) -> str | None:
        """The metadata service to watch for notices; None when preemption is off."""
        if self.preemption == "off":
            return None
        return self.metadata_endpoint or METADATA_ENDPOINTS[self.preemption]


# The defaults, stated once: in `Config`'s fields.
_DEFAULTS: Final = Config(vm_id="", pool_id="", controller_endpoint="")


class _Reader:
    """Reads and checks one variable at a time, so every error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def required(self, name: str) -> str:
        value = self.raw(name)
        if value is None:
            raise ConfigError(name, "is required but not set")
        return value

    def identifier(self, name: str, *, required: bool = True) -> str | None:
        value = self.required(name) if required else self.raw(name)
        if value is not None and not _ID_PATTERN.fullmatch(value):
            raise ConfigError(
                name,
                f"must be 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit; got {value!r}",
            )
        return value

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float,
        exclusive: bool = False,
        maximum: float | None = None,
        zero_is_off: bool = False,
    ) -> float:
        text = self.raw(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(name, f"must be a number of seconds, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(name, f"must be a finite number, got {text!r}")
        if zero_is_off and value == 0:
            return 0.0
        if value < minimum or (exclusive and value == minimum):
            relation = "greater than" if exclusive else "at least"
            off = "0 (off) or " if zero_is_off else ""
            raise ConfigError(name, f"must be {off}{relation} {minimum:g}, got {text!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(name, f"must be at most {maximum:g}, got {text!r}")
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        text = self.raw(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(name, f"must be a whole number, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(name, f"must be between {minimum} and {maximum}, got {text!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        text = self.raw(name)
        if text is None:
            return default
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(name, f"must be true or false, got {text!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        text = self.raw(name)
        if text is None:
            return default
        if text.lower() not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}; got {text!r}")
        return text.lower()

    def path(self, name: str, default: Path | None) -> Path | None:
        text = self.raw(name)
        return default if text is None else Path(text)


# --- Reading each setting (a `ReadSetting` each) ----------------------------------------------------------


def _identifier() -> ReadSetting:
    return lambda reader, name, default: reader.identifier(name)


def _optional_id() -> ReadSetting:
    return lambda reader, name, default: reader.identifier(name, required=False) or default


def _number(
    *, minimum: float, exclusive: bool = False, maximum: float | None = None, zero_is_off: bool = False
) -> ReadSetting:
    def read(reader: _Reader, name: str, default: float) -> float:
        return reader.number(
            name, default, minimum=minimum, exclusive=exclusive, maximum=maximum, zero_is_off=zero_is_off
        )

    return read


def _integer(*, minimum: int, maximum: int) -> ReadSetting:
    return lambda reader, name, default: reader.integer(name, default, minimum=minimum, maximum=maximum)


def _choice(*choices: str) -> ReadSetting:
    return lambda reader, name, default: reader.choice(name, default, choices)


def _boolean(reader: _Reader, name: str, default: bool) -> bool:
    return reader.boolean(name, default)


def _path(reader: _Reader, name: str, default: Path | None) -> Path | None:
    return reader.path(name, default)


def _endpoint(reader: _Reader, name: str, default: object) -> str:
    allow_insecure = reader.boolean("MIGLET_ALLOW_INSECURE", _DEFAULTS.allow_insecure)
    text = reader.required(name)
    parts = _base_url(name, text)
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname or ""):
        raise ConfigError(
            name,
            f"uses plain http:// to the non-loopback host {parts.hostname!r}; "
            "use https:// (or set MIGLET_ALLOW_INSECURE=1 for a trusted network)",
        )
    return text.rstrip("/")


def _metadata_endpoint(reader: _Reader, name: str, default: str | None) -> str | None:
    text = reader.raw(name)
    if text is None:
        return default
    # Plain http:// is what the clouds' metadata services speak, on an address only the VM reaches.
    _base_url(name, text)
    return text.rstrip("/")


def _base_url(name: str, text: str) -> SplitResult:
    """The parts of an http(s) base URL with a host, and neither credentials, a query nor a fragment."""
    if "@" in text:
        # Checked first, so that no message below can echo a password.
        raise ConfigError(name, "must not carry credentials (user:password@)")
    try:
        parts = urlsplit(text)
        _ = parts.port  # a port out of range raises ValueError here
    except ValueError as exc:
        raise ConfigError(name, f"is not a valid URL ({exc}): {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"must be an http:// or https:// URL with a host, got {text!r}")
    if parts.query or parts.fragment:
        raise ConfigError(name, "must not carry a query or a fragment")
    return parts


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress  # only plain-http endpoints get here

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ca_bundle(reader: _Reader, name: str, default: Path | None) -> Path | None:
    ca_bundle = reader.path(name, default)
    if ca_bundle is None:
        return None
    try:
        # OpenSSL would wait for ever on a FIFO, and read a device such as /dev/zero for ever.
        if not stat.S_ISREG(ca_bundle.stat().st_mode):
            raise ConfigError("MIGLET_CA_BUNDLE", f"{str(ca_bundle)!r} is not a regular file")
        ssl.create_default_context(cafile=str(ca_bundle))
    except FileNotFoundError:
        raise ConfigError("MIGLET_CA_BUNDLE", f"no such file: {str(ca_bundle)!r}") from None
    except (OSError, ssl.SSLError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise ConfigError("MIGLET_CA_BUNDLE", f"{str(ca_bundle)!r} is not a usable CA file: {exc}") from None
    return ca_bundle


def _controller_token(reader: _Reader, name: str, default: Secret | None) -> Secret | None:
    token = reader.raw("MIGLET_CONTROLLER_TOKEN")
    token_file = reader.raw("MIGLET_CONTROLLER_TOKEN_FILE")
    if token is not None and token_file is not None:
        raise ConfigError("MIGLET_CONTROLLER_TOKEN_FILE", "cannot be set together with MIGLET_CONTROLLER_TOKEN")
    if token_file is not None:
        try:
            return read_token_file(Path(token_file))
        except TokenFileError as exc:
            raise ConfigError("MIGLET_CONTROLLER_TOKEN_FILE", str(exc)) from None
    if token is not None and not BEARER_TOKEN.fullmatch(token):
        # Named without the value: the value is the secret.
        raise ConfigError("MIGLET_CONTROLLER_TOKEN", f"must be {BEARER_TOKEN_RULE}")
    return None if token is None else Secret(token)


def _runner_user(reader: _Reader, name: str, default: str | None) -> str | None:
    runner_dir = reader.path("MIGLET_RUNNER_DIR", _DEFAULTS.runner_dir) or _DEFAULTS.runner_dir
    user = reader.raw(name)
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: a NUL character in the name
        raise ConfigError(name, f"no such user: {user!r}") from None
    if os.geteuid() != 0:
        raise ConfigError(name, f"switching to {user!r} needs MIGlet to run as root")
    try:
        owner = runner_dir.stat().st_uid
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError("MIGLET_RUNNER_DIR", f"cannot use {str(runner_dir)!r}: {reason}") from None
    if owner != entry.pw_uid:
        # The runner writes its configuration, work folder and diagnostics there as that user.
        raise ConfigError(
            name,
            f"the runner directory {str(runner_dir)!r} must belong to {user!r} (it belongs to uid {owner}); "
            f"run: chown -R {user}: {runner_dir}",
        )
    return user


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from `env` (default: the process environment), checking every value; raises the
    first problem found."""
    config, problems = check_config(env)
    if config is None:
        raise problems[0]
    return config


def check_config(env: Mapping[str, str] | None = None) -> tuple[Config | None, list[ConfigError]]:
    """The configuration from `env`, or None and every problem with it."""
    reader = _Reader(os.environ if env is None else env)
    defaults = msgspec.structs.asdict(_DEFAULTS)
    values: dict[str, Any] = {}
    problems: list[ConfigError] = []
    for field, setting in SETTINGS:
        try:
            values[field] = setting.read(reader, setting.variable, defaults[field])
        except ConfigError as exc:
            problems.append(exc)
    return (None, problems) if problems else (Config(**values), [])


def _settings() -> tuple[tuple[str, Setting], ...]:
    hints = get_type_hints(Config, include_extras=True)
    found = []
    for field in Config.__struct_fields__:
        [setting] = [meta for meta in getattr(hints[field], "__metadata__", ()) if isinstance(meta, Setting)]
        found.append((field, setting))
    return tuple(found)


# Every setting, in the order the help and the docs list them: (the `Config` field, its `Setting`).
SETTINGS: Final = _settings()
_REQUIRED: Final = frozenset(
    Config.__struct_fields__[: len(Config.__struct_fields__) - len(Config.__struct_defaults__)]
)


def default_of(field: str) -> Any:
    """The default of an optional `Config` field."""
    return Config.__struct_defaults__[Config.__struct_fields__.index(field) - len(_REQUIRED)]


def _shown(field: str, setting: Setting) -> str:
    if setting.shown is not None:
        return setting.shown
    if field in _REQUIRED:
        return "required"
    default = default_of(field)
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


VARIABLES: Final = tuple(
    Variable(setting.variable, _shown(field, setting), setting.meaning, setting.secret) for field, setting in SETTINGS
)
