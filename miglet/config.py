"""Configuration from the environment (docs/operations.md lists every setting).

Every value is checked before MIGlet touches the network: a bad one raises `ConfigError`, which names the
variable and the problem in one line, and the command line turns it into exit code 2.
"""

from __future__ import annotations

import os
import pwd
import re
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

import msgspec

from miglet.secret import Secret
from miglet.tokenfile import BEARER_TOKEN, BEARER_TOKEN_RULE, TokenFileError, read_token_file

LogFormat = Literal["auto", "json", "text"]
LogLevel = Literal["debug", "info", "warning", "error"]

# Ids end up in URL paths and runner names: keep them to characters that need no quoting anywhere.
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# Polling, heartbeats and retries faster than this would be request storms, not a configuration.
MIN_INTERVAL: Final = 0.1
MIN_RETRY_BASE: Final = 0.01


class Variable(msgspec.Struct, frozen=True):
    name: str
    default: str
    meaning: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.removeprefix("MIGLET_").lower().replace("_", "-")


VARIABLES: Final = (
    Variable("MIGLET_VM_ID", "required", "this VM's id, used in every URL and event"),
    Variable("MIGLET_POOL_ID", "required", "pool id, sent in events"),
    Variable("MIGLET_CONTROLLER_ENDPOINT", "required", "controller base URL, e.g. https://controller:8080"),
    Variable("MIGLET_ORG_ID", "unset", "org id, sent in events when set"),
    Variable("MIGLET_CONTROLLER_TOKEN", "unset", "bearer token for every controller request", secret=True),
    Variable(
        "MIGLET_CONTROLLER_TOKEN_FILE",
        "unset",
        "file holding the bearer token (read again when the controller refuses it)",
    ),
    Variable("MIGLET_CA_BUNDLE", "system", "CA file for TLS to the controller (default: the OS trust store)"),
    Variable("MIGLET_ALLOW_INSECURE", "false", "allow plain http:// to a non-loopback controller"),
    Variable("MIGLET_POLL_INTERVAL", "5", "seconds between command polls"),
    Variable("MIGLET_COMMAND_WAIT", "20", "long-poll: ask the controller to hold a poll up to N s (0: off)"),
    Variable("MIGLET_HEARTBEAT_INTERVAL", "30", "seconds between heartbeat events once acknowledged (0: off)"),
    Variable("MIGLET_RUNNER_DIR", "/opt/actions-runner", "directory holding the runner's config.sh and run.sh"),
    Variable("MIGLET_RUNNER_NAME", "the VM id", "runner name at GitHub"),
    Variable("MIGLET_RUNNER_USER", "unset", "when MIGlet runs as root, run the runner as this user"),
    Variable("MIGLET_RUNNER_DISABLE_UPDATE", "false", "register with --disableupdate"),
    Variable("MIGLET_ALLOW_HTTP_RUNNER_URL", "false", "accept an http:// runner_url (a GitHub Enterprise Server)"),
    Variable("MIGLET_EPHEMERAL", "true", "register with --ephemeral: one job, then the VM is done"),
    Variable("MIGLET_SHUTDOWN_GRACE", "30", "seconds a stopping runner gets before it is killed"),
    Variable("MIGLET_FLUSH_TIMEOUT", "60", "seconds a stop waits to deliver the events still owed to the controller"),
    Variable("MIGLET_STATE_FILE", "/run/miglet/state.json", "where the current state is written"),
    Variable("MIGLET_LISTEN_TIMEOUT", "300", "seconds the runner gets to start listening for jobs"),
    Variable("MIGLET_ACK_TIMEOUT", "0", "give up (exit 1) when vm_started is not acknowledged in N s (0: never)"),
    Variable(
        "MIGLET_REGISTRATION_TIMEOUT", "0", "give up (exit 1) after N s in Ready without a registration (0: never)"
    ),
    Variable("MIGLET_IDLE_TIMEOUT", "0", "stop (exit 0) when no job starts within N s of Idle (0: never)"),
    Variable("MIGLET_CLOCK_SKEW", "30", "seconds of clock skew allowed when checking a token's expires_at"),
    Variable("MIGLET_RETRY_BASE", "0.5", "first retry delay ceiling in seconds (exponential backoff, full jitter)"),
    Variable("MIGLET_RETRY_CAP", "30", "largest retry delay in seconds"),
    Variable("MIGLET_OUTBOX_CAPACITY", "1000", "events kept while the controller is unreachable (heartbeats go first)"),
    Variable("MIGLET_LOG_FORMAT", "auto", "json or text; auto: text on a terminal, json otherwise"),
    Variable("MIGLET_LOG_LEVEL", "info", "debug, info, warning or error"),
)


class ConfigError(Exception):
    """A configuration value is missing or invalid."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's effective configuration."""

    vm_id: str
    pool_id: str
    controller_endpoint: str
    org_id: str | None = None
    controller_token: Secret | None = None
    # Where the token came from, read again when the controller refuses it (a rotated token).
    controller_token_file: Path | None = None
    ca_bundle: Path | None = None
    allow_insecure: bool = False
    poll_interval: float = 5.0
    command_wait: int = 20
    heartbeat_interval: float = 30.0
    runner_dir: Path = Path("/opt/actions-runner")
    runner_name: str = ""
    runner_user: str | None = None
    runner_disable_update: bool = False
    allow_http_runner_url: bool = False
    ephemeral: bool = True
    shutdown_grace: float = 30.0
    flush_timeout: float = 60.0
    state_file: Path = Path("/run/miglet/state.json")
    listen_timeout: float = 300.0
    ack_timeout: float = 0.0
    registration_timeout: float = 0.0
    idle_timeout: float = 0.0
    clock_skew: float = 30.0
    retry_base: float = 0.5
    retry_cap: float = 30.0
    outbox_capacity: int = 1000
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"

    @property
    def effective_runner_name(self) -> str:
        return self.runner_name or self.vm_id


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


def _endpoint(reader: _Reader, allow_insecure: bool) -> str:
    name = "MIGLET_CONTROLLER_ENDPOINT"
    text = reader.required(name)
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
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ConfigError(
            name,
            f"uses plain http:// to the non-loopback host {parts.hostname!r}; "
            "use https:// (or set MIGLET_ALLOW_INSECURE=1 for a trusted network)",
        )
    return text.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress  # only plain-http endpoints get here

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ca_bundle(reader: _Reader) -> Path | None:
    ca_bundle = reader.path("MIGLET_CA_BUNDLE", None)
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


def _controller_token(reader: _Reader) -> Secret | None:
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


def _runner_user(reader: _Reader, runner_dir: Path) -> str | None:
    name = "MIGLET_RUNNER_USER"
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
    """Build the configuration from `env` (default: the process environment), checking every value."""
    reader = _Reader(os.environ if env is None else env)
    vm_id = reader.identifier("MIGLET_VM_ID")
    pool_id = reader.identifier("MIGLET_POOL_ID")
    allow_insecure = reader.boolean("MIGLET_ALLOW_INSECURE", _DEFAULTS.allow_insecure)
    endpoint = _endpoint(reader, allow_insecure)
    ca_bundle = _ca_bundle(reader)
    assert vm_id is not None
    assert pool_id is not None
    d = _DEFAULTS
    runner_dir = reader.path("MIGLET_RUNNER_DIR", d.runner_dir) or d.runner_dir
    return Config(
        vm_id=vm_id,
        pool_id=pool_id,
        controller_endpoint=endpoint,
        org_id=reader.identifier("MIGLET_ORG_ID", required=False),
        controller_token=_controller_token(reader),
        controller_token_file=reader.path("MIGLET_CONTROLLER_TOKEN_FILE", None),
        ca_bundle=ca_bundle,
        allow_insecure=allow_insecure,
        poll_interval=reader.number("MIGLET_POLL_INTERVAL", d.poll_interval, minimum=MIN_INTERVAL),
        command_wait=reader.integer("MIGLET_COMMAND_WAIT", d.command_wait, minimum=0, maximum=600),
        heartbeat_interval=reader.number(
            "MIGLET_HEARTBEAT_INTERVAL", d.heartbeat_interval, minimum=MIN_INTERVAL, zero_is_off=True
        ),
        runner_dir=runner_dir,
        runner_name=reader.identifier("MIGLET_RUNNER_NAME", required=False) or "",
        runner_user=_runner_user(reader, runner_dir),
        runner_disable_update=reader.boolean("MIGLET_RUNNER_DISABLE_UPDATE", d.runner_disable_update),
        allow_http_runner_url=reader.boolean("MIGLET_ALLOW_HTTP_RUNNER_URL", d.allow_http_runner_url),
        ephemeral=reader.boolean("MIGLET_EPHEMERAL", d.ephemeral),
        shutdown_grace=reader.number("MIGLET_SHUTDOWN_GRACE", d.shutdown_grace, minimum=0),
        flush_timeout=reader.number("MIGLET_FLUSH_TIMEOUT", d.flush_timeout, minimum=0, maximum=3600),
        state_file=reader.path("MIGLET_STATE_FILE", d.state_file) or d.state_file,
        listen_timeout=reader.number("MIGLET_LISTEN_TIMEOUT", d.listen_timeout, minimum=0, exclusive=True),
        ack_timeout=reader.number("MIGLET_ACK_TIMEOUT", d.ack_timeout, minimum=0),
        registration_timeout=reader.number("MIGLET_REGISTRATION_TIMEOUT", d.registration_timeout, minimum=0),
        idle_timeout=reader.number("MIGLET_IDLE_TIMEOUT", d.idle_timeout, minimum=0),
        clock_skew=reader.number("MIGLET_CLOCK_SKEW", d.clock_skew, minimum=0, maximum=3600),
        retry_base=reader.number("MIGLET_RETRY_BASE", d.retry_base, minimum=MIN_RETRY_BASE),
        retry_cap=reader.number("MIGLET_RETRY_CAP", d.retry_cap, minimum=MIN_RETRY_BASE),
        outbox_capacity=reader.integer("MIGLET_OUTBOX_CAPACITY", d.outbox_capacity, minimum=10, maximum=1_000_000),
        log_format=reader.choice("MIGLET_LOG_FORMAT", d.log_format, ("auto", "json", "text")),  # type: ignore[arg-type]
        log_level=reader.choice("MIGLET_LOG_LEVEL", d.log_level, ("debug", "info", "warning", "error")),  # type: ignore[arg-type]
    )
