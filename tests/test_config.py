"""Configuration: every variable is checked up front, and a bad one is named in a single line.

Rules: `load_config` gets an explicit environment mapping; the command-line tests run `python -m miglet` as a
subprocess with a hard timeout and a controller address nothing listens on.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from fake_controller.fake_runner import install
from miglet.config import ConfigError, load_config
from miglet.secret import Secret

BASE = {
    "MIGLET_VM_ID": "vm-123",
    "MIGLET_POOL_ID": "pool-001",
    "MIGLET_CONTROLLER_ENDPOINT": "http://localhost:8080",
}


def test_seed_variables_suffice_and_defaults_apply() -> None:
    config = load_config(BASE)
    assert config.vm_id == "vm-123"
    assert config.pool_id == "pool-001"
    assert config.controller_endpoint == "http://localhost:8080"
    assert config.poll_interval == 5.0
    assert config.command_wait == 20
    assert config.ephemeral is True
    assert config.shutdown_grace == 30.0
    assert config.runner_dir == Path("/opt/actions-runner")
    assert config.effective_runner_name == "vm-123"
    assert config.org_id is None
    assert config.controller_token is None


def test_every_value_is_read() -> None:
    config = load_config(
        {
            **BASE,
            "MIGLET_CONTROLLER_ENDPOINT": "https://controller.example:8443/",
            "MIGLET_ORG_ID": "org-001",
            "MIGLET_POLL_INTERVAL": "0.5",
            "MIGLET_COMMAND_WAIT": "0",
            "MIGLET_RUNNER_DIR": "/srv/runner",
            "MIGLET_RUNNER_NAME": "runner-7",
            "MIGLET_EPHEMERAL": "false",
            "MIGLET_SHUTDOWN_GRACE": "12",
            "MIGLET_STATE_FILE": "/tmp/x/state.json",
            "MIGLET_LOG_FORMAT": "JSON",
            "MIGLET_LOG_LEVEL": "debug",
        }
    )
    assert config.controller_endpoint == "https://controller.example:8443"
    assert config.org_id == "org-001"
    assert config.poll_interval == 0.5
    assert config.command_wait == 0
    assert config.runner_dir == Path("/srv/runner")
    assert config.effective_runner_name == "runner-7"
    assert config.ephemeral is False
    assert config.shutdown_grace == 12.0
    assert config.state_file == Path("/tmp/x/state.json")
    assert config.log_format == "json"
    assert config.log_level == "debug"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MIGLET_VM_ID", None, "is required"),
        ("MIGLET_VM_ID", "  ", "is required"),
        ("MIGLET_VM_ID", "vm/../x", "letters, digits"),
        ("MIGLET_POOL_ID", None, "is required"),
        ("MIGLET_CONTROLLER_ENDPOINT", None, "is required"),
        ("MIGLET_CONTROLLER_ENDPOINT", "localhost:8080", "http:// or https://"),
        ("MIGLET_CONTROLLER_ENDPOINT", "ftp://x", "http:// or https://"),
        ("MIGLET_CONTROLLER_ENDPOINT", "http://10.1.2.3:8080", "non-loopback"),
        ("MIGLET_CONTROLLER_ENDPOINT", "https://user:pw@host", "credentials"),
        ("MIGLET_CONTROLLER_ENDPOINT", "http://host:99999", "not a valid URL"),
        ("MIGLET_POLL_INTERVAL", "soon", "number of seconds"),
        ("MIGLET_POLL_INTERVAL", "0", "at least 0.1"),
        ("MIGLET_POLL_INTERVAL", "1e-300", "at least 0.1"),
        ("MIGLET_HEARTBEAT_INTERVAL", "0.001", "0 (off) or at least 0.1"),
        ("MIGLET_RETRY_BASE", "1e-9", "at least 0.01"),
        ("MIGLET_POLL_INTERVAL", "nan", "finite"),
        ("MIGLET_COMMAND_WAIT", "1.5", "whole number"),
        ("MIGLET_COMMAND_WAIT", "-1", "between 0 and 600"),
        ("MIGLET_SHUTDOWN_GRACE", "-3", "at least 0"),
        ("MIGLET_CLOCK_SKEW", "1e12", "at most 3600"),
        ("MIGLET_EPHEMERAL", "maybe", "true or false"),
        ("MIGLET_LOG_FORMAT", "xml", "one of auto, json, text"),
        ("MIGLET_LOG_LEVEL", "loud", "one of debug"),
        ("MIGLET_RUNNER_USER", "no-such-user-here", "no such user"),
        ("MIGLET_CA_BUNDLE", "/nonexistent/ca.pem", "no such file"),
        ("MIGLET_CONTROLLER_TOKEN_FILE", "/nonexistent/token", "cannot read"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str | None, expected: str) -> None:
    env = dict(BASE)
    if value is None:
        env.pop(variable, None)
    else:
        env[variable] = value
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert caught.value.variable == variable
    assert expected in str(caught.value)
    assert str(caught.value).startswith(f"{variable}: ")


def test_insecure_endpoint_can_be_allowed_explicitly() -> None:
    config = load_config({**BASE, "MIGLET_CONTROLLER_ENDPOINT": "http://10.1.2.3:8080", "MIGLET_ALLOW_INSECURE": "1"})
    assert config.controller_endpoint == "http://10.1.2.3:8080"


def test_controller_token_from_file_is_a_secret(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-controller-token\n")
    config = load_config({**BASE, "MIGLET_CONTROLLER_TOKEN_FILE": str(token_file)})
    assert isinstance(config.controller_token, Secret)
    assert config.controller_token.reveal() == "s3cret-controller-token"
    assert "s3cret" not in repr(config)


def test_token_and_token_file_together_are_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abcdefgh")
    with pytest.raises(ConfigError, match="cannot be set together"):
        load_config({**BASE, "MIGLET_CONTROLLER_TOKEN": "abcdefgh", "MIGLET_CONTROLLER_TOKEN_FILE": str(token_file)})


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "miglet", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_exits_2_with_one_line_and_no_traceback() -> None:
    result = _run_cli({**BASE, "MIGLET_POLL_INTERVAL": "often"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "miglet: configuration error: MIGLET_POLL_INTERVAL: must be a number of seconds, got 'often'"
    ]
    assert "Traceback" not in result.stderr


@pytest.fixture
def runnable(tmp_path: Path) -> dict[str, str]:
    """BASE, with a runner directory and a state file that pass the pre-flight checks."""
    return {
        **BASE,
        "MIGLET_RUNNER_DIR": str(install(tmp_path / "runner")),
        "MIGLET_STATE_FILE": str(tmp_path / "state" / "state.json"),
    }


def test_cli_flag_overrides_the_environment(runnable: dict[str, str]) -> None:
    result = _run_cli({**runnable, "MIGLET_POLL_INTERVAL": "often"}, "check-config", "--poll-interval", "7")
    assert result.returncode == 0, result.stderr
    assert "poll_interval = 7.0" in result.stdout


def test_check_config_masks_the_controller_token(runnable: dict[str, str]) -> None:
    result = _run_cli({**runnable, "MIGLET_CONTROLLER_TOKEN": "ctl-token-value-123"}, "check-config")
    assert result.returncode == 0
    assert "ctl-token-value-123" not in result.stdout + result.stderr
    assert "controller_token = Secret('***')" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_runner_user_must_own_the_runner_directory(tmp_path: Path) -> None:
    runner_dir = tmp_path / "runner"
    runner_dir.mkdir()
    env = {**BASE, "MIGLET_RUNNER_USER": "nobody", "MIGLET_RUNNER_DIR": str(runner_dir)}
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert caught.value.variable == "MIGLET_RUNNER_USER"
    assert f"chown -R nobody: {runner_dir}" in str(caught.value)
    os.chown(runner_dir, pwd.getpwnam("nobody").pw_uid, -1)
    assert load_config(env).runner_user == "nobody"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_runner_user_needs_an_existing_runner_directory(tmp_path: Path) -> None:
    env = {**BASE, "MIGLET_RUNNER_USER": "nobody", "MIGLET_RUNNER_DIR": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match="MIGLET_RUNNER_DIR: cannot use"):
        load_config(env)


def test_check_config_refuses_plain_http_to_a_remote_controller_without_sending() -> None:
    # 192.0.2.1 is TEST-NET-1: nothing answers there, and nothing is sent to it.
    result = _run_cli({**BASE, "MIGLET_CONTROLLER_ENDPOINT": "http://192.0.2.1:8080"}, "check-config")
    assert result.returncode == 2
    assert "MIGLET_CONTROLLER_ENDPOINT: uses plain http:// to the non-loopback host '192.0.2.1'" in result.stderr
