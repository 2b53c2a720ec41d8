"""Packaging: the Dockerfile, the systemd unit and its environment file, the cloud-init example, the operations doc.

Rules: files are read as text and checked against the code they describe (`miglet.config.VARIABLES`, the stop
timeouts, the exit codes), so that a new variable or a longer flush fails here until the packaging follows.
External linters (hadolint, systemd-analyze, cloud-init, shellcheck) run when they are installed and are skipped
otherwise. Nothing is built and nothing is started.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from miglet import exitcodes
from miglet.cli import EXIT_CONFIG
from miglet.config import VARIABLES, Variable
from miglet.runner.process import DRAIN_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "packaging" / "systemd" / "miglet.service"
ENV_EXAMPLE = ROOT / "packaging" / "systemd" / "miglet.env.example"
CLOUD_INIT = ROOT / "packaging" / "cloud-init" / "miglet.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

NAMES = frozenset(variable.name for variable in VARIABLES)
# Defaults that are words, not values a variable could be set to.
DESCRIPTIVE_DEFAULTS = frozenset({"required", "unset", "system", "the VM id", "the cloud's own"})


def variable(name: str) -> Variable:
    return next(v for v in VARIABLES if v.name == name)


def tool(name: str) -> str:
    """The path of an external tool, preferring the one installed next to this Python (the venv's)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def seconds(span: str) -> float:
    """A systemd time span such as `60`, `90s`, `2min` or `1min 30s`, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, f"not a time span: {span!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- Dockerfile ---------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments left out."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions() if keyword == name]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in instruction("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", arguments):
            env[key] = value
    return env


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_starts_from_a_pinned_python_311_slim_image() -> None:
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base


def test_dockerfile_installs_the_repository_with_pip() -> None:
    assert any("pip install --no-cache-dir" in run for run in instruction("RUN"))


def test_dockerfile_runs_miglet_and_the_runner_as_different_users() -> None:
    # MIGlet as root, the runner (and every job) as a user of its own: a job cannot read MIGlet's files or
    # signal it. The image's user is explicit, so that nobody takes root for an oversight.
    users = instruction("USER")
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] in ("root", "0")
    runner_user = docker_env()["MIGLET_RUNNER_USER"]
    assert runner_user not in ("root", "0")
    created = " ".join(instruction("RUN"))
    assert re.search(rf"useradd .*\b{runner_user}\b", created), f"the image does not create {runner_user!r}"
    # The runner directory is the runner user's (MIGlet checks this at start), the state file's directory is not.
    runner_dir = docker_env()["MIGLET_RUNNER_DIR"]
    state_dir = str(Path(docker_env()["MIGLET_STATE_FILE"]).parent)
    assert re.search(rf"install -d -o {runner_user} [^&]*{re.escape(runner_dir)}", created)
    assert not re.search(rf"install -d -o {runner_user} [^&]*{re.escape(state_dir)}", created)


def test_dockerfile_health_check_runs_miglet_status() -> None:
    (healthcheck,) = instruction("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command == ["miglet", "status"]


def test_dockerfile_stops_with_sigterm_and_runs_miglet() -> None:
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(entry) for entry in instruction("ENTRYPOINT")] == [["miglet"]]
    assert [json.loads(cmd) for cmd in instruction("CMD")] == [["run"]]


def test_dockerfile_environment_names_real_variables() -> None:
    env = docker_env()
    miglet = {key: value for key, value in env.items() if key.startswith("MIGLET_")}
    assert set(miglet) <= NAMES
    assert miglet["MIGLET_LOG_FORMAT"] == "json"
    # The directories the image creates for the runner user are the ones MIGlet is told to use.
    created = " ".join(instruction("RUN"))
    assert miglet["MIGLET_RUNNER_DIR"] in created
    assert str(Path(miglet["MIGLET_STATE_FILE"]).parent) in created


def test_dockerignore_keeps_what_the_build_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"]["readme"]]
    needed += [f"{package}/" for package in pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]]
    lines = DOCKERIGNORE.read_text().splitlines()
    assert "*" in lines, "the .dockerignore is an allow-list: '*' first, then what the build needs"
    for path in needed:
        assert f"!{path}" in lines, f"{path} is not allowed into the build context"


# --- systemd --------------------------------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_parses_into_its_sections() -> None:
    assert unit().sections() == ["Unit", "Service", "Install"]


def test_unit_stop_timeout_covers_the_grace_period_and_the_flush() -> None:
    service = unit()["Service"]
    grace = float(variable("MIGLET_SHUTDOWN_GRACE").default)
    flush = float(variable("MIGLET_FLUSH_TIMEOUT").default)
    assert seconds(service["TimeoutStopSec"]) > grace + flush + DRAIN_SECONDS
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to MIGlet alone: it stops the runner itself, in order.
    assert service["KillMode"] == "mixed"


def test_unit_restarts_on_failure_but_not_on_a_configuration_error() -> None:
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert str(EXIT_CONFIG) in service["RestartPreventExitStatus"].split()
    # A stop that could not deliver its events is still a stop: a new agent would announce the VM afresh.
    assert str(exitcodes.UNDELIVERED) in service["RestartPreventExitStatus"].split()
    assert seconds(service["RestartSec"]) >= 1


def test_unit_reads_the_environment_file_and_runs_miglet() -> None:
    service = unit()["Service"]
    assert service["EnvironmentFile"].lstrip("-") == "/etc/miglet/miglet.env"
    assert service["ExecStart"].split()[1:] == ["run"]
    assert Path(service["ExecStart"].split()[0]).name == "miglet"


def test_unit_runtime_directory_holds_the_default_state_file() -> None:
    service = unit()["Service"]
    state_file = Path(variable("MIGLET_STATE_FILE").default)
    assert Path("/run") / service["RuntimeDirectory"] == state_file.parent


def test_unit_leaves_jobs_their_privileges() -> None:
    # The runner's jobs run inside the unit: sudo, package installs and Docker bind mounts of /tmp must work.
    service = unit()["Service"]
    assert service.get("NoNewPrivileges", "no") == "no"
    assert service.get("ProtectSystem", "no") == "no"
    assert service.get("ProtectHome", "no") == "no"
    assert service.get("PrivateTmp", "no") == "no"


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify insists that ExecStart exists: point it at this environment's miglet.
    miglet = Path(sys.executable).parent / "miglet"
    if not miglet.exists():
        pytest.skip("no miglet script next to this Python")
    copy = tmp_path / "miglet.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/miglet", str(miglet)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def env_example_assignments() -> dict[str, tuple[str, bool]]:
    """NAME -> (value, commented) for every `NAME=value` or `# NAME=value` line of the example."""
    found: dict[str, tuple[str, bool]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"(# )?(MIGLET_[A-Z_]+)=(.*)", line):
            found[match[2]] = (match[3], match[1] is not None)
    return found


def test_env_example_lists_every_variable() -> None:
    assignments = env_example_assignments()
    assert set(assignments) == NAMES


def test_env_example_shows_the_real_defaults() -> None:
    for name, (value, commented) in env_example_assignments().items():
        default = variable(name).default
        if commented and default not in DESCRIPTIVE_DEFAULTS:
            assert value == default, f"{name}: the example says {value!r}, the code {default!r}"
        if default == "required":
            assert not commented, f"{name} is required and must be set in the example"


# --- cloud-init -----------------------------------------------------------------------------------------------------


def cloud_config() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    text = CLOUD_INIT.read_text()
    assert text.startswith("#cloud-config\n")
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def written_file(path: str) -> str:
    (entry,) = [entry for entry in cloud_config()["write_files"] if entry["path"] == path]
    content: str = entry["content"]
    return content


def test_cloud_init_installs_the_unit_as_packaged() -> None:
    assert written_file("/etc/systemd/system/miglet.service") == UNIT.read_text(), (
        "copy packaging/systemd/miglet.service into the cloud-init example (indented by 6 spaces)"
    )


def test_cloud_init_environment_uses_real_variables() -> None:
    env = dict(line.split("=", 1) for line in written_file("/etc/miglet/miglet.env").splitlines() if line)
    assert set(env) <= NAMES
    assert {"MIGLET_VM_ID", "MIGLET_POOL_ID", "MIGLET_CONTROLLER_ENDPOINT"} <= set(env)
    assert env["MIGLET_RUNNER_USER"] == "runner"
    assert "runner" in [user["name"] for user in cloud_config()["users"] if isinstance(user, dict)]


def test_cloud_init_schema_is_valid() -> None:
    cloud_init = tool("cloud-init")
    result = subprocess.run(
        [cloud_init, "schema", "--config-file", str(CLOUD_INIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloud_init_bootstrap_script_is_sound_shell(tmp_path: Path) -> None:
    script = tmp_path / "miglet-bootstrap"
    script.write_text(written_file("/usr/local/sbin/miglet-bootstrap"))
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False, timeout=60)
        assert result.returncode == 0, result.stdout


# --- docs -----------------------------------------------------------------------------------------------------------


def test_operations_doc_documents_every_variable_with_its_default() -> None:
    text = OPERATIONS.read_text()
    for v in VARIABLES:
        row = re.search(rf"^\| `{v.name}` \| ([^|]+) \|", text, re.MULTILINE)
        assert row is not None, f"{v.name} has no row in the configuration table"
        assert row[1].strip() == v.default, f"{v.name}: the doc says {row[1].strip()!r}, the code {v.default!r}"


def test_operations_doc_gives_the_exit_codes() -> None:
    text = OPERATIONS.read_text()
    for code, meaning in ((0, "clean stop"), (1, "unrecoverable failure"), (EXIT_CONFIG, "configuration error")):
        assert f"| {code} | {meaning} |" in text


# --- The lock -------------------------------------------------------------------------------------------------------


def test_the_lock_pins_every_runtime_dependency_within_its_range_with_hashes() -> None:
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = (ROOT / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\$", text, re.MULTILINE))
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        assert requirement.name in pins, f"{requirement.name} is not in requirements.lock: run `just lock`"
        assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins[requirement.name])
    # Every pin carries its hashes, so that pip --require-hashes installs exactly what was locked.
    entries = re.split(r"\n(?=[a-z0-9])", text.split("\n\n", 1)[-1] if text.startswith("#") else text)
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)
    # Runtime only: nothing the fake controller or the tests need.
    assert "hypercorn" not in pins
    assert "pytest" not in pins
