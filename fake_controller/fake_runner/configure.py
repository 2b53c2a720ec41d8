"""`configure` and `remove`: the real ConfigurationManager's flow and messages, against a fake GitHub.

Failures raise ConfigError inside and end as the real `Runner.ExecuteCommand` does: the message on
stderr (via WriteError) and exit code 1 (TerminatedError).
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .behaviour import Behaviour
from .cmdline import CommandLine
from .leftovers import leave_behind
from .remove_config import delete_local_config
from .store import load_registry, new_settings, read_settings, registration_api, save_config, save_registry
from .terminal import CYAN, YELLOW, Terminal

TERMINATED_ERROR = 1

BANNER = (
    "--------------------------------------------------------------------------------",
    "|        ____ _ _   _   _       _          _        _   _                      |",
    "|       / ___(_) |_| | | |_   _| |__      / \\   ___| |_(_) ___  _ __  ___      |",
    "|      | |  _| | __| |_| | | | | '_ \\    / _ \\ / __| __| |/ _ \\| '_ \\/ __|     |",
    "|      | |_| | | |_|  _  | |_| | |_) |  / ___ \\ (__| |_| | (_) | | | \\__ \\     |",
    "|       \\____|_|\\__|_| |_|\\__,_|_.__/  /_/   \\_\\___|\\__|_|\\___/|_| |_|___/     |",
    "|                                                                              |",
)
NOT_FOUND_BODY = '{"message":"Not Found","documentation_url":"https://docs.github.com/rest","status":"404"}'


class ConfigError(Exception):
    """A configure/remove failure; its message is what the real runner prints on stderr."""


def configure(root: Path, cmd: CommandLine, behaviour: Behaviour, term: Terminal) -> int:
    """`config.sh ...` => `Runner.Listener configure ...`."""
    _banner(term)
    leave_behind(root, behaviour.configure_leaves_behind, "configure")
    try:
        _configure(root, cmd, behaviour, term)
    except ConfigError as exc:
        term.error(str(exc))
        return TERMINATED_ERROR
    return 0


def remove(root: Path, cmd: CommandLine, behaviour: Behaviour, term: Terminal) -> int:
    """`config.sh remove [--token T] [--local]` => `Runner.Listener remove ...`."""
    if cmd.flag("local"):
        delete_local_config(root, term)
        return 0
    term.section("Runner removal")
    current = "Removing runner from the server"
    try:
        settings = read_settings(root)
        if settings is not None and (root / ".credentials").exists():
            url = str(settings.get("gitHubUrl", ""))
            token = _require(cmd, "token", "Enter runner remove token:")
            _github_auth(url, token, behaviour, term)
            registry = load_registry(root, behaviour)
            if registry.pop(str(settings.get("agentName", "")), None) is None:
                term.line("Does not exist. Skipping " + current)
            save_registry(root, registry)
            term.line()
            term.success("Runner removed successfully")
        else:
            term.line(
                "Cannot connect to server, because config files are missing. Skipping removing runner from the server."
            )
        delete_local_config(root, term)
    except ConfigError as exc:
        term.error("Failed: " + current)
        term.error(str(exc))
        return TERMINATED_ERROR
    term.line()
    return 0


def _configure(root: Path, cmd: CommandLine, behaviour: Behaviour, term: Terminal) -> None:
    if read_settings(root) is not None:
        raise ConfigError(
            "Cannot configure the runner because it is already configured. To reconfigure the runner, "
            "run 'config.cmd remove' or './config.sh remove' first."
        )
    term.section("Authentication")
    url = _require(cmd, "url", "What is the URL of your repository?", valid=_is_server_url)
    token = _require(cmd, "token", "What is your runner register token?")
    time.sleep(behaviour.configure_delay_s)
    _github_auth(url, token, behaviour, term)
    term.line()
    term.success("Connected to GitHub")

    term.section("Runner Registration")
    if not behaviour.runner_groups:
        raise ConfigError("Could not find any self-hosted runner groups. Contact support.")
    group = cmd.arg("runnergroup") or behaviour.runner_groups[0]
    term.line()
    pool = next((g for g in behaviour.runner_groups if g.lower() == group.lower()), None)
    if pool is None:
        raise ConfigError(f'Could not find any self-hosted runner group named "{group}".')
    name = cmd.arg("name") or socket.gethostname().split(".")[0] or "myrunner"
    term.line()
    labels = [x for x in (cmd.arg("labels") or "").split(",") if x]
    term.line()

    registry = load_registry(root, behaviour)
    if name in registry:
        term.line("A runner exists with the same name", YELLOW)
        if not cmd.flag("replace"):
            if not cmd.flag("unattended"):
                raise ConfigError("fake runner: interactive prompts are not supported; use --unattended")
            raise ConfigError(f"A runner exists with the same name {name}.")
        term.success("Successfully replaced the runner")
    else:
        term.success("Runner successfully added")
    ephemeral, disable_update = cmd.flag("ephemeral"), cmd.flag("disableupdate")
    registry[name] = {"labels": labels, "runner_group": pool, "ephemeral": ephemeral, "url": url}
    save_registry(root, registry)

    term.section("Runner settings")
    work = cmd.arg("work") or "_work"
    save_config(root, new_settings(name, url, pool, work, ephemeral, disable_update))
    term.line()
    term.success("Settings Saved.")
    term.line()


def _banner(term: Terminal) -> None:
    term.line()
    for row in BANNER:
        term.line(row)
    term.write("|                       ")
    term.write("Self-hosted runner registration", CYAN)
    term.line("                        |")
    term.line(BANNER[-1])
    term.line(BANNER[0])


def _require(cmd: CommandLine, name: str, prompt: str, valid: Callable[[str], bool] | None = None) -> str:
    """`GetArgOrPrompt` in unattended mode: a missing or invalid value ends configuration."""
    value = cmd.arg(name)
    if value is not None and (valid is None or valid(value)):
        return value
    if not cmd.flag("unattended"):
        raise ConfigError(f"{prompt} (fake runner: interactive prompts are not supported; use --unattended)")
    raise ConfigError(f"Invalid configuration provided for {name}. Terminating unattended configuration.")


def _is_server_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _github_auth(url: str, token: str, behaviour: Behaviour, term: Terminal) -> None:
    """`GetTenantCredential`: a rejected (bad or expired) token is a 404, printed as the real one is."""
    if token not in behaviour.reject_tokens:
        return
    request_id = ":".join(secrets.token_hex(n).upper() for n in (2, 3, 4, 4, 4))
    term.error(f"Http response code: NotFound from 'POST {registration_api(url)}' (Request Id: {request_id})")
    term.error(NOT_FOUND_BODY)
    raise ConfigError("Response status code does not indicate success: 404 (Not Found).")
