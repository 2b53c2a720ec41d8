"""The standalone build: PyInstaller's onedir bundle runs the seed flow with no Python environment on PATH.

Rules: the bundle is built once for this module from the test environment (about 15 s; skipped where PyInstaller
is not installed), then run as a real process against the fake controller on 127.0.0.1 and the fake runner,
with a hard timeout, as the end-to-end tests run `python -m miglet`.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.fake_runner import enqueue_job
from tests.test_end_to_end import TIMEOUT, miglet_against

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "bundle" / "build.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("PyInstaller") is None, reason="PyInstaller not installed")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, str(BUILD), "bundle", str(dist)], check=True, capture_output=True, timeout=240)
    [archive] = dist.glob("miglet-*-linux-*.tar.gz")
    with tarfile.open(archive) as tar:
        assert {name.split("/")[0] for name in tar.getnames()} == {"miglet"}  # one top-level folder
        tar.extractall(dist, filter="tar")
    return dist / "miglet"


def test_the_bundle_states_its_glibc_floor_and_its_version(bundle: Path) -> None:
    floor = (bundle / "GLIBC_FLOOR").read_text().strip()
    assert floor.startswith("2.")
    result = subprocess.run(
        [str(bundle / "miglet"), "--version"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60
    )
    assert result.stdout.startswith("miglet ")


async def test_the_bundle_runs_the_seed_flow_with_a_job_to_the_ephemeral_end(tmp_path: Path, bundle: Path) -> None:
    controller = FakeController(Settings())
    with trio.fail_after(TIMEOUT):
        async with miglet_against(tmp_path, controller, command=[str(bundle / "miglet"), "run"]) as (
            miglet,
            runner_dir,
        ):
            await miglet.wait_state("Idle")
            enqueue_job(runner_dir, "build", "Succeeded", duration_s=0.2)
        assert miglet.process.returncode == 0
    kinds = [event["type"] for event in controller.events_of("vm-123") if event["type"] != "heartbeat"]
    assert kinds == [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_identified",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_the_debian_package_installs_the_bundle_the_unit_and_a_conffile(bundle: Path) -> None:
    dist = bundle.parent
    subprocess.run([sys.executable, str(BUILD), "deb", str(dist)], check=True, capture_output=True, timeout=120)
    [deb] = dist.glob("miglet_*.deb")
    contents = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    entries = {line.split()[5].removeprefix("."): line for line in contents.splitlines()}
    assert entries["/opt/miglet/miglet"].startswith("-rwxr-xr-x root/root")
    assert "/usr/bin/miglet -> /opt/miglet/miglet" in contents
    assert entries["/etc/miglet/miglet.env"].startswith("-rw------- root/root")
    assert "/lib/systemd/system/miglet.service" in entries
    fields = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    floor = (bundle / "GLIBC_FLOOR").read_text().strip()
    assert f"Depends: libc6 (>= {floor})" in fields
    with tempfile.TemporaryDirectory() as control:
        subprocess.run(["dpkg-deb", "-e", str(deb), control], check=True)
        assert Path(control, "conffiles").read_text() == "/etc/miglet/miglet.env\n"
        unit = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
        ).stdout  # the unit starts the packaged binary
        assert b"ExecStart=/usr/bin/miglet run" in unit
        for script in ("postinst", "postrm"):
            text = Path(control, script).read_text()
            assert "enable" not in text
            assert "start" not in text.replace("daemon-reload", "")
