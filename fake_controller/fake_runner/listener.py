"""The fake `Runner.Listener`: `python -m fake_controller.fake_runner.listener configure|remove|run ...`.

The installed `bin/Runner.Listener` shim execs this, so `config.sh`, `run.sh` and `run-helper.sh` are the
real scripts' twins. Like the real `Program.Main`: load `DIR/.env`, parse argv, take (and remove)
`ACTIONS_RUNNER_INPUT_*` from the environment, warn about unknown arguments, dispatch. Every invocation
first appends one line to `DIR/_fake_github/calls.jsonl` (who ran it, with which token/JIT config), so
tests can prove secrets arrived through the environment and never through argv.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .behaviour import Behaviour, BehaviourError, load_behaviour
from .cmdline import CommandLine, parse_argv, take_env_inputs
from .configure import TERMINATED_ERROR, configure, remove
from .run import NOT_CONFIGURED, Stopper, run
from .store import load_dotenv, read_settings, record_call, runner_root
from .terminal import Terminal, colour_enabled

USAGE = """
Commands:
 ./config.sh         Configures the runner
 ./config.sh remove  Unconfigures the runner
 ./run.sh            Runs the runner interactively. Does not require any options.
"""
# Runner.Listener's own commands besides these: `warmup` (load its code ahead of use, print nothing).


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (the real ReturnCode values)."""
    words = sys.argv[1:] if argv is None else argv
    root = runner_root()
    load_dotenv(root)
    cmd = parse_argv(words)
    cmd.env_args = take_env_inputs()
    _record(root, words, cmd)
    try:
        behaviour = load_behaviour(root)
    except BehaviourError as exc:
        sys.stderr.write(f"fake runner: {exc}\n")
        return TERMINATED_ERROR
    term = Terminal(colour_enabled(behaviour.colour))
    _warn_unknown(cmd, term)

    if cmd.flag("help"):
        term.line(USAGE)
        return 0
    if cmd.flag("version"):
        term.line(behaviour.version)
        return 0
    if cmd.command in ("configure", "remove"):
        signal.signal(signal.SIGINT, _exit_in_config_stage)
        action = configure if cmd.command == "configure" else remove
        return action(root, cmd, behaviour, term)
    if cmd.command == "warmup":
        return warmup(root, behaviour)
    if cmd.command == "run":
        stopper = Stopper(term)
        stopper.install(ignore=behaviour.ignore_sigint)
        return run(root, cmd, behaviour, term, stopper)
    if read_settings(root) is None:
        term.error(NOT_CONFIGURED)
        return TERMINATED_ERROR
    term.line(USAGE)
    return 0


def warmup(root: Path, behaviour: Behaviour) -> int:
    """Like the real `warmup`: load every assembly in `bin/` (here: read every file, which warms the page cache the
    same way), spend `warmup_s` of CPU as the real one compiles, print nothing, exit 0."""
    for path in sorted((root / "bin").rglob("*")):
        if path.is_file():
            with contextlib.suppress(OSError):
                path.read_bytes()
    deadline = time.process_time() + behaviour.warmup_s
    while time.process_time() < deadline:
        pass
    return 0


def _exit_in_config_stage(signum: int, frame: FrameType | None) -> None:
    """Real `CtrlCHandler` during configure/remove: `Exiting...` then exit 1 at once."""
    os.write(1, b"Exiting...\n")
    os._exit(TERMINATED_ERROR)


def _warn_unknown(cmd: CommandLine, term: Terminal) -> None:
    unknown = cmd.unknown()
    if not unknown:
        return
    listed = ", ".join(unknown)
    usage = "For usage refer to: .\\config.cmd --help or ./config.sh --help"
    if cmd.command:
        term.error(f"Unrecognized command-line input arguments for command {cmd.command}: '{listed}'. {usage}")
    else:
        term.error(f"This command does not recognize the command-line input arguments: '{listed}'. {usage}")


def _record(root: Path, words: list[str], cmd: CommandLine) -> None:
    """One `calls.jsonl` line; a failure to record must not change the runner's behaviour."""
    record = {
        "cmd": cmd.command or (cmd.commands[0] if cmd.commands else ""),
        "argv": words,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "cwd": os.getcwd(),
        "root": str(root),
        "token": cmd.arg("token"),
        "token_source": cmd.arg_source("token"),
        "jitconfig": cmd.arg("jitconfig"),
        "jitconfig_source": cmd.arg_source("jitconfig"),
        "env_runasroot": os.environ.get("RUNNER_ALLOW_RUNASROOT"),
        "env_manually_trap_sig": os.environ.get("RUNNER_MANUALLY_TRAP_SIG"),
        "nice": os.nice(0),
        "ts": time.time(),
    }
    try:
        record_call(root, record)
    except OSError as exc:
        sys.stderr.write(f"fake runner: cannot record call: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
