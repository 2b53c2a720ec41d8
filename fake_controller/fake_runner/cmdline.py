"""Command line and `ACTIONS_RUNNER_INPUT_*` handling, like the real CommandLineParser/CommandSettings.

Real rules: words before the first `--x` are commands; `--x value` is an arg, `--x` followed by another
`--y` (or nothing) is a flag; names are case-insensitive. Every `ACTIONS_RUNNER_INPUT_<NAME>` variable is
read (trimmed, empty ignored) as arg `<name>` and removed from the environment; an explicit command-line
arg wins over the environment. Unknown names only produce a warning.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field

ENV_PREFIX = "ACTIONS_RUNNER_INPUT_"

COMMANDS = ("configure", "remove", "run", "warmup")
FLAGS = (
    "check", "commit", "disableupdate", "ephemeral", "generateserviceconfig", "help", "local",
    "no-default-labels", "once", "replace", "runasservice", "unattended", "version",
)  # fmt: skip
ARGS = (
    "auth", "jitconfig", "labels", "monitorsocketaddress", "name", "pat", "runnergroup", "startuptype",
    "token", "url", "username", "windowslogonaccount", "windowslogonpassword", "work",
)  # fmt: skip


@dataclass
class CommandLine:
    """Parsed argv plus the environment inputs."""

    commands: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    args: dict[str, str] = field(default_factory=dict)
    env_args: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The first recognised command, or '' (the real listener then prints usage)."""
        for name in self.commands:
            if name in COMMANDS:
                return name
        return ""

    def flag(self, name: str) -> bool:
        """`TestFlag`: on the command line, or `ACTIONS_RUNNER_INPUT_<NAME>=true`."""
        return name in self.flags or self.env_args.get(name, "").lower() == "true"

    def arg(self, name: str) -> str | None:
        """`GetArg`: command line first, then environment; empty counts as missing."""
        value = self.args.get(name) or self.env_args.get(name)
        return value or None

    def arg_source(self, name: str) -> str | None:
        """Where `arg(name)` came from: 'argv', 'env' or None."""
        if self.args.get(name):
            return "argv"
        if self.env_args.get(name):
            return "env"
        return None

    def unknown(self) -> list[str]:
        """Names the real `CommandSettings.Validate` would complain about."""
        found = [c for c in self.commands if c not in COMMANDS]
        found += sorted(f for f in self.flags if f not in FLAGS)
        found += sorted(a for a in self.args if a not in ARGS)
        return found


def parse_argv(argv: list[str]) -> CommandLine:
    """Split argv into commands, flags and args the way CommandLineParser does."""
    parsed = CommandLine()
    scope: str | None = None
    for word in argv:
        if word.startswith("--"):
            if scope is not None:
                parsed.flags.add(scope)
            scope = word[2:].lower()
        elif scope is not None:
            parsed.args[scope] = word
            scope = None
        else:
            parsed.commands.append(word.lower())
    if scope is not None:
        parsed.flags.add(scope)
    return parsed


def take_env_inputs(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Read and remove every `ACTIONS_RUNNER_INPUT_*` variable (names lower-cased, values trimmed)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for key in [k for k in env if k.upper().startswith(ENV_PREFIX)]:
        value = env.pop(key).strip()
        if value:
            found[key[len(ENV_PREFIX) :].lower()] = value
    return found
