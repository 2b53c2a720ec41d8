"""Bash scripts laid out like the real runner's directory (src/Misc/layoutroot), written for the fake.

They reproduce the real scripts' contract (messages, exit codes, process structure), not their text:
`config.sh` refuses root unless RUNNER_ALLOW_RUNASROOT is non-empty; `run.sh` keeps the listener alive
through `run-helper.sh` and, with RUNNER_MANUALLY_TRAP_SIG, runs it as a background job in its own
process group (`set -m`) and forwards SIGINT/SIGTERM to that group as SIGINT. The only fake parts are
`bin/Runner.Listener`, a shim that execs the Python listener, and `bin/fake_runner` (a copy of this
package), so a real runner can be dropped in instead.
"""

from __future__ import annotations

import shlex

RESOLVE_DIR = 'here="$(cd -P "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"'

CONFIG_SH = f"""#!/bin/bash
# config.sh of the FAKE GitHub Actions runner (fake_controller.fake_runner); same contract as the real one.
# Refuses root unless RUNNER_ALLOW_RUNASROOT is non-empty, works from its own directory, records the
# environment (env.sh), then hands over to bin/Runner.Listener. (No .NET, so no dependency checks.)

if [ "$(id -u)" -eq 0 ] && [ -z "$RUNNER_ALLOW_RUNASROOT" ]; then
    echo "Must not run with sudo"
    exit 1
fi

{RESOLVE_DIR}
cd "$here" || exit 1
source ./env.sh

shopt -s nocasematch
if [[ "$1" == "remove" ]]; then
    ./bin/Runner.Listener "$@"
else
    ./bin/Runner.Listener configure "$@"
fi
"""

RUN_SH = f"""#!/bin/bash
# run.sh of the FAKE GitHub Actions runner; same contract as the real one.
# run-helper.sh (fresh copy of its template each round) runs the listener once; its exit code 2 means
# "start again", anything else ends run.sh.

{RESOLVE_DIR}

fresh_helper() {{
    cp -f "$here/run-helper.sh.template" "$here/run-helper.sh"
}}

# Helper in the foreground, in run.sh's own process group; run.sh always exits 0.
run_in_foreground() {{
    while :; do
        fresh_helper
        "$here/run-helper.sh" $*
        status=$?
        if [[ $status -eq 2 ]]; then
            echo "Restarting runner..."
            continue
        fi
        echo "Exiting runner..."
        exit 0
    done
}}

# RUNNER_MANUALLY_TRAP_SIG: job control on, so the helper (and the listener under it) get a process
# group of their own; SIGINT/SIGTERM to run.sh become SIGINT to that group.
run_with_forwarding() {{
    set -m
    forwarded=0
    forward_to_helper() {{
        kill -INT -- "-$helper"
        forwarded=1
    }}
    trap forward_to_helper INT TERM
    while :; do
        fresh_helper
        "$here/run-helper.sh" $* &
        helper=$!
        wait "$helper"
        if [ "$forwarded" -eq 1 ]; then
            # the trap cut the first wait short: wait again for the helper's own exit status
            wait "$helper"
        fi
        # As in the real script this is the status of the `if` above: 0 unless a signal was forwarded.
        status=$?
        if [[ $status -eq 2 ]]; then
            echo "Restarting runner..."
            continue
        fi
        echo "Exiting runner..."
        trap - INT TERM
        wait "$helper"
        exit $status
    done
}}

if [[ -n "$RUNNER_UPDATE_CA_CERTS" ]]; then
    echo "Warning: failed to update certificate store: not supported by the fake runner"
fi

if [[ -z "$RUNNER_MANUALLY_TRAP_SIG" ]]; then
    run_in_foreground $*
else
    run_with_forwarding $*
fi
"""

RUN_HELPER_TEMPLATE = f"""#!/bin/bash
# run-helper.sh of the FAKE GitHub Actions runner: runs the listener once and maps its exit code to
# run.sh's protocol (2 = start again, anything else = stop), with the real runner's messages.

if [ "$(id -u)" -eq 0 ] && [ -z "$RUNNER_ALLOW_RUNASROOT" ]; then
    echo "Must not run interactively with sudo"
    exit 1
fi

shopt -s nocasematch
{RESOLVE_DIR}

if [ -n "$RUNNER_WAIT_FOR_DOCKER_IN_SECONDS" ] && [ "$RUNNER_WAIT_FOR_DOCKER_IN_SECONDS" -gt 0 ]; then
    echo "Waiting for docker to be ready."
    for _ in $(seq "$RUNNER_WAIT_FOR_DOCKER_IN_SECONDS"); do
        if docker ps > /dev/null 2>&1; then
            echo "Docker is ready."
            break
        fi
        "$here/safe_sleep.sh" 1
    done
fi

wait_for_update() {{
    for _ in $(seq 0 30); do
        if [ -f update.finished ]; then
            echo "Update finished successfully."
            rm update.finished
            return
        fi
        "$here/safe_sleep.sh" 1
    done
}}

"$here/bin/Runner.Listener" run $*
code=$?
if [[ $code -eq 7 && "$ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE" == "1" ]]; then
    echo "Runner listener exit with deprecated version exit code: ${{code}}."
    exit "$code"
fi
case $code in
    0) echo "Runner listener exit with 0 return code, stop the service, no retry needed."; exit 0 ;;
    1) echo "Runner listener exit with terminated error, stop the service, no retry needed."; exit 0 ;;
    2) echo "Runner listener exit with retryable error, re-launch runner in 5 seconds."
       "$here/safe_sleep.sh" 5
       exit 2 ;;
    3|4) echo "Runner listener exit because of updating, re-launch runner after successful update"
       wait_for_update
       exit 2 ;;
    5) echo "Runner listener exit with Session Conflict error, stop the service, no retry needed."; exit 0 ;;
    *) echo "Exiting with unknown error code: ${{code}}"; exit 0 ;;
esac
"""

ENV_SH = """#!/bin/bash
# env.sh of the FAKE GitHub Actions runner: sourced by config.sh from the runner directory. Saves PATH to
# .path and adds a few well-known variables to .env (kept if already there); the listener loads .env.
touch .env
echo "$PATH" > .path
for name in LANG JAVA_HOME ANT_HOME M2_HOME ANDROID_HOME GRADLE_HOME NVM_BIN NVM_PATH VSTS_HTTP_PROXY; do
    if [ -n "${!name}" ] && ! grep -q "^${name}=" .env; then
        echo "${name}=${!name}" >> .env
    fi
done
"""

SAFE_SLEEP_SH = """#!/bin/bash
# safe_sleep.sh of the FAKE GitHub Actions runner: sleep N seconds.
sleep "$1"
"""


def listener_shim(python: str) -> str:
    """`bin/Runner.Listener`: where the real .NET binary sits; execs the fake listener (same pid).

    `bin/fake_runner` (a copy of this package) is imported as a top-level package, so neither
    `fake_controller/__init__.py` (trio, msgspec) nor anything else of the repo is imported: startup
    stays fast and any Python >= 3.11 works, e.g. the system one for an unprivileged runner user.
    """
    return f"""#!/bin/bash
# bin/Runner.Listener of the FAKE GitHub Actions runner: runs the Python fake listener in this process.
{RESOLVE_DIR}
export FAKE_RUNNER_ROOT="$(cd -P "$here/.." && pwd)"
export PYTHONPATH="$here${{PYTHONPATH:+:$PYTHONPATH}}"
exec {shlex.quote(python)} -m fake_runner.listener "$@"
"""


SCRIPTS = {
    "config.sh": CONFIG_SH,
    "run.sh": RUN_SH,
    "run-helper.sh.template": RUN_HELPER_TEMPLATE,
    "env.sh": ENV_SH,
    "safe_sleep.sh": SAFE_SLEEP_SH,
}
