# syntax=docker/dockerfile:1
#
# MIGlet in a container: `docker build -t miglet .` from the repository root (BuildKit, the default builder
# since Docker 23, for the bind mount below).
#
# This image holds MIGlet only, not GitHub's runner. Add the runner in a layer of your own that unpacks
# actions/runner into /opt/actions-runner and gives it to the `runner` user (docs/operations.md has the whole
# example):
#
#   FROM miglet
#   ARG RUNNER_VERSION=2.330.0
#   ADD https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz /tmp/runner.tar.gz
#   RUN tar -xzf /tmp/runner.tar.gz -C /opt/actions-runner && rm /tmp/runner.tar.gz \
#       && /opt/actions-runner/bin/installdependencies.sh && rm -rf /var/lib/apt/lists/* \
#       && chown -R runner:runner /opt/actions-runner
#
# Two users, as on a VM under systemd: MIGlet runs as root, the runner (and so every job) as `runner`
# (MIGLET_RUNNER_USER). A job then cannot read the controller token, neither from MIGlet's environment or memory
# nor from a token file readable by root only, and cannot signal MIGlet. With one user for both, a job could
# read every file MIGlet reads and kill MIGlet (MIGlet is non-dumpable, which keeps its memory and environment
# from processes of its own user, but not its files). Of root's powers MIGlet uses only five: SETUID and SETGID
# (to start the runner as `runner`), KILL (to stop it and kill what it leaves behind), DAC_OVERRIDE (to delete
# the runner's configuration in its directory) and CHOWN (to give its job hooks' spool to `runner`); drop the
# others (`docker run --cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL --cap-add DAC_OVERRIDE
# --cap-add CHOWN`), unless jobs need them for `sudo`.
#
# A platform that insists on a non-root user (Kubernetes' runAsNonRoot) cannot run this image as built. Either
# exempt this container (it is root only to become `runner`), or run both as `runner` (`USER 1001:1001`, or
# runAsUser: 1001, and MIGLET_RUNNER_USER unset): then give the token in MIGLET_CONTROLLER_TOKEN from a secret,
# not in a file (a job could read the file), run MIGlet itself as PID 1 (no init in front of it holding the
# token in its environment), and accept that a job can kill MIGlet. MIGlet warns at start in that setup.
#
# Stopping: on SIGTERM MIGlet sends the runner SIGINT, gives it MIGLET_SHUTDOWN_GRACE seconds (default 30), kills
# what is left of it, then spends up to MIGLET_FLUSH_TIMEOUT (default 60 s) delivering the events it still owes
# the controller, and exits 0 (3 when the controller did not take them all). The platform's stop timeout must be
# longer than all of that, or the platform's SIGKILL cuts it short: `docker stop -t 100` / `docker run
# --stop-timeout 100`, Kubernetes `terminationGracePeriodSeconds: 100` (both default to 10 s and 30 s, too
# short); keep it at grace + flush timeout + 10 s, or lower MIGLET_FLUSH_TIMEOUT to fit a shorter one.
#
# PID 1: MIGlet handles SIGTERM, SIGINT and SIGHUP itself, and reaps the orphans it adopts (it is their child
# subreaper, and as PID 1 it adopts every orphan of the container); it needs no init in front of it.

FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="miglet" \
      org.opencontainers.image.description="The agent inside each ephemeral CI VM: introduces the VM to its controller and runs a GitHub Actions runner." \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The locked dependencies in a layer of their own (every version pinned, every hash checked), cached until the lock
# changes; then MIGlet alone on top. The build context is mounted, not copied, so no layer keeps the source; a
# writable mount lets the build backend write where it likes, and whatever it writes is thrown away.
RUN --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock
RUN --mount=type=bind,target=/tmp/miglet-src,rw \
    pip install --no-cache-dir --no-deps /tmp/miglet-src

# The runner runs as this user, never as MIGlet's (config.sh refuses root unless told otherwise); its directory
# is its own. The state file's directory is MIGlet's (root's): others may pass through it (to run MIGlet's job
# hooks in /run/miglet/job-hooks) but not list it, and the state file is root's alone (`miglet status` runs as root).
RUN groupadd --gid 1001 runner \
    && useradd --uid 1001 --gid runner --create-home --shell /bin/bash runner \
    && install -d -o runner -g runner -m 0755 /opt/actions-runner \
    && install -d -o root -g root -m 0711 /run/miglet

ENV MIGLET_RUNNER_DIR=/opt/actions-runner \
    MIGLET_RUNNER_USER=runner \
    MIGLET_STATE_FILE=/run/miglet/state.json \
    MIGLET_LOG_FORMAT=json

# MIGlet is root so that the runner is not MIGlet's user (see the top of this file); numeric, like `runner`'s.
# hadolint ignore=DL3002
USER 0:0
WORKDIR /opt/actions-runner

# `miglet status` exits 0 while the agent lives, is not Stopped and has rewritten its state file (every 10 s)
# within the last 30 s.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 CMD ["miglet", "status"]

STOPSIGNAL SIGTERM

ENTRYPOINT ["miglet"]
CMD ["run"]
