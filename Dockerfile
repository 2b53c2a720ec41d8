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
#   USER root
#   ARG RUNNER_VERSION=2.330.0
#   ADD https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz /tmp/runner.tar.gz
#   RUN tar -xzf /tmp/runner.tar.gz -C /opt/actions-runner && rm /tmp/runner.tar.gz \
#       && /opt/actions-runner/bin/installdependencies.sh && rm -rf /var/lib/apt/lists/* \
#       && chown -R runner:runner /opt/actions-runner
#   USER 1001:1001
#
# Stopping: on SIGTERM MIGlet sends the runner SIGINT, gives it MIGLET_SHUTDOWN_GRACE seconds (default 30), kills
# what is left of it, then spends up to 10 s delivering the events it still owes the controller, and exits 0.
# The platform's stop timeout must be longer than all of that, or the platform's SIGKILL cuts it short:
# `docker stop -t 45` / `docker run --stop-timeout 45`, Kubernetes `terminationGracePeriodSeconds: 45` (both
# default to 10 s and 30 s, too short), and raise them with MIGLET_SHUTDOWN_GRACE (grace + 15 s).
#
# PID 1: MIGlet handles SIGTERM itself, but it does not reap orphaned grandchildren (job processes whose
# parents died). Run with `docker run --init` (tini as PID 1, signals forwarded) where you can.

FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="miglet" \
      org.opencontainers.image.description="The agent inside each ephemeral CI VM: introduces the VM to its controller and runs a GitHub Actions runner." \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The build context is mounted, not copied, so no layer keeps the source; a writable mount lets the build
# backend write where it likes, and whatever it writes is thrown away.
RUN --mount=type=bind,target=/tmp/miglet-src,rw \
    pip install --no-cache-dir /tmp/miglet-src

# The runner runs as this user, not as root (config.sh refuses root unless told otherwise). MIGlet runs as it
# too, so MIGLET_RUNNER_USER stays unset here: switching users is for MIGlet running as root on a VM.
RUN groupadd --gid 1001 runner \
    && useradd --uid 1001 --gid runner --create-home --shell /bin/bash runner \
    && install -d -o runner -g runner -m 0755 /opt/actions-runner /run/miglet

ENV MIGLET_RUNNER_DIR=/opt/actions-runner \
    MIGLET_STATE_FILE=/run/miglet/state.json \
    MIGLET_LOG_FORMAT=json

# Numeric, so that Kubernetes' runAsNonRoot can tell that it is not root; 1001 is `runner`.
USER 1001:1001
WORKDIR /opt/actions-runner

# `miglet status` exits 0 while the agent lives, is not Stopped and has rewritten its state file (every 10 s)
# within the last 30 s.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 CMD ["miglet", "status"]

STOPSIGNAL SIGTERM

ENTRYPOINT ["miglet"]
CMD ["run"]
