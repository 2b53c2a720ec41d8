"""The `miglet` command: `run` (the default), `status`, `check-config`.

Exit codes (`miglet.exitcodes`): 0 clean stop (or healthy, for `status`), 1 unrecoverable failure (or unhealthy),
2 configuration error, 3 a stop that could not deliver every event it owed the controller. Every MIGLET_
variable can also be given as a flag of `run` and `check-config` (`--vm-id` for MIGLET_VM_ID, and so on); a flag
wins over the environment.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from miglet import __version__, exitcodes, preflight
from miglet.config import VARIABLES, Config, ConfigError, check_config, default_of, load_config
from miglet.hardening import Exposure, harden_process, token_exposures
from miglet.stop_signals import HeldSignals, ignore_stop_signals

EXIT_OK: Final = exitcodes.OK
EXIT_FAILURE: Final = exitcodes.FAILURE
EXIT_CONFIG: Final = exitcodes.CONFIG

log = logging.getLogger("miglet")


def _variables_help() -> str:
    width = max(len(variable.name) for variable in VARIABLES)
    lines = ["environment (each, but the token, also a flag of run and check-config, e.g. --vm-id):"]
    lines += [f"  {v.name:<{width}}  {v.meaning} [default: {v.default}]" for v in VARIABLES]
    return "\n".join(lines)


def _add_variable_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override the environment)")
    for variable in VARIABLES:
        if variable.secret:
            continue  # a secret on the command line would show in every process list
        help_text = f"{variable.meaning} ({variable.name}; default: {variable.default})".replace("%", "%%")
        group.add_argument(variable.flag, dest=variable.name, metavar="VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miglet",
        description="MIGlet: brings up a GitHub Actions runner in this VM for its controller.",
        epilog=_variables_help() + "\n\nexit codes: 0 clean stop, 1 unrecoverable failure, 2 configuration error,"
        " 3 stopped without delivering every event owed to the controller",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"miglet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent (the default command)")
    _add_variable_flags(run)
    status = commands.add_parser("status", help="report the agent's state from its state file; exit 0 while healthy")
    status.add_argument("--json", action="store_true", help="print the state record as JSON")
    status.add_argument("--state-file", type=Path, help="state file to read [default: $MIGLET_STATE_FILE]")
    check = commands.add_parser("check-config", help="validate the configuration and print it, secrets masked")
    _add_variable_flags(check)
    return parser


def _environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    for variable in VARIABLES:
        value = getattr(args, variable.name, None)
        if value is not None:
            env[variable.name] = value
    return env


def _load(env: dict[str, str]) -> Config | None:
    try:
        return load_config(env)
    except ConfigError as exc:
        print(f"miglet: configuration error: {exc}", file=sys.stderr)
        return None


_COMMANDS: Final = frozenset({"run", "status", "check-config", "-h", "--help", "--version"})


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in _COMMANDS:
        arguments.insert(0, "run")
    args = build_parser().parse_args(arguments)
    if args.command == "status":
        from miglet.status import status_command

        return status_command(args.state_file, as_json=args.json)
    held = HeldSignals()
    problems: list[tuple[str, str]] = []
    if args.command == "run":
        # First of all, before the configuration is read: from here on a stop signal cannot kill MIGlet before it
        # has stopped its runner, and no other process of its user can read its environment or memory.
        held.hold()
        problems = harden_process()
    env = _environment(args)
    if args.command == "check-config":
        return _check_config(env)
    config = _load(env)
    if config is None:
        return EXIT_CONFIG
    # Before the VM is announced: a runner that cannot start would only waste the registration token.
    broken = preflight.runner_dir_problems(config.runner_dir)
    for problem in broken:
        print(f"miglet: configuration error: {problem}", file=sys.stderr)
    if broken:
        return EXIT_CONFIG
    exposures = _exposures(config, env)
    warnings: list[tuple[str, Mapping[str, object]]] = [(warning, {}) for warning in preflight.misspelt(env)]
    warnings += [(exposure.message, exposure.fields) for exposure in exposures]
    return _run(config, held, problems, warnings)


def _exposures(config: Config, env: Mapping[str, str]) -> list[Exposure]:
    """Where a job could read the controller token, in this configuration."""
    return token_exposures(config, (env.get("MIGLET_CONTROLLER_TOKEN_FILE") or "").strip() or None)


def _check_config(env: dict[str, str]) -> int:
    """Every problem with the configuration and what it points at, at once; the effective values; warnings."""
    config, errors = check_config(env)
    if config is not None:
        errors += preflight.preflight(config)
    elif not any(error.variable == "MIGLET_RUNNER_DIR" for error in errors):
        # The runner directory is worth checking however the rest is (an image is built before its VM has an id).
        errors += preflight.runner_dir_problems(Path(env.get("MIGLET_RUNNER_DIR") or default_of("runner_dir")))
    warnings = preflight.misspelt(env)
    if config is not None:
        from miglet.status import print_config

        print_config(config)
        stop_time = preflight.stop_time_warning(config)
        identity = preflight.job_identity_warning(config)
        warnings += [warning for warning in (stop_time, identity) if warning is not None]
        for exposure in _exposures(config, env):
            warnings.append(exposure.message + "".join(f" {key}={value}" for key, value in exposure.fields.items()))
    for warning in warnings:
        print(f"miglet: warning: {warning}", file=sys.stderr)
    for error in errors:
        print(f"miglet: configuration error: {error}", file=sys.stderr)
    return EXIT_CONFIG if errors else EXIT_OK


def _run(
    config: Config,
    held: HeldSignals,
    problems: list[tuple[str, str]],
    warnings: list[tuple[str, Mapping[str, object]]],
) -> int:
    # Importing trio and httpx creates about fifty thousand objects, none of them garbage; collecting while
    # they are created only costs start-up time, and freezing them keeps later collections from rescanning them.
    # httpx imports its transport, httpcore, only when the first client is made: it is imported here instead.
    gc.disable()
    try:
        import httpcore  # noqa: F401
        import trio

        from miglet.app import Agent
        from miglet.logs import configure_logging
        from miglet.sdnotify import Notifier
        from miglet.timings import process_start
    finally:
        gc.freeze()
        gc.enable()
    configure_logging(config.log_format, config.log_level)
    log.info("MIGlet starting", extra={"version": __version__, "vm_id": config.vm_id, "pool_id": config.pool_id})
    for what, error in problems:
        log.warning(what, extra={"error": error})
    for message, fields in warnings:
        log.warning(message, extra=fields)
    try:
        notifier = Notifier.from_environment()
        agent = Agent(config, started_at=process_start(), held_signals=held, notifier=notifier)
        return trio.run(agent.run)
    except KeyboardInterrupt:
        log.warning("Interrupted before the agent could stop cleanly")
        return EXIT_FAILURE
    except Exception:
        log.critical("MIGlet failed", exc_info=True)
        return EXIT_FAILURE
    finally:
        ignore_stop_signals()


if __name__ == "__main__":
    sys.exit(main())
