"""Build the standalone MIGlet (no Python needed on the image) and its Debian package.

    python packaging/bundle/build.py bundle DIST [--python PYTHON]
    python packaging/bundle/build.py deb DIST

`bundle` runs PyInstaller (onedir) with PYTHON, whose environment must hold MIGlet and PyInstaller (`just dist`
makes one from requirements.lock), and writes `miglet-<version>-linux-<machine>.tar.gz`: one top-level folder,
`miglet/`, holding the executable `miglet` and its `_internal/` libraries. `deb` packs that folder as
`miglet_<version>_<arch>.deb`: /opt/miglet, /usr/bin/miglet, the systemd unit, and /etc/miglet/miglet.env as a
conffile. Stdlib only, so that it runs with any Python that can run PyInstaller.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "packaging" / "bundle" / "miglet-entry.py"
UNIT = ROOT / "packaging" / "systemd" / "miglet.service"
ENV_EXAMPLE = ROOT / "packaging" / "systemd" / "miglet.env.example"
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def version() -> str:
    text = (ROOT / "miglet" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise SystemExit("no __version__ in miglet/__init__.py")
    return match[1]


def glibc_floor(folder: Path) -> str:
    """The newest GLIBC_ symbol version any binary in `folder` needs: the oldest glibc it runs on."""
    found: set[tuple[int, ...]] = set()
    for path in folder.rglob("*"):
        if path.is_file() and (path.suffix == ".so" or ".so." in path.name or os.access(path, os.X_OK)):
            result = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=False)
            found |= {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", result.stdout)}
    return ".".join(map(str, max(found))) if found else "unknown"


def build_bundle(dist: Path, python: str) -> Path:
    """The onedir build, archived in `dist`; returns the archive."""
    with tempfile.TemporaryDirectory(prefix="miglet-bundle-") as work:
        subprocess.run(
            [
                python,
                "-m",
                "PyInstaller",
                "--onedir",
                "--strip",
                "--noconfirm",
                "--clean",
                "--log-level",
                "WARN",
                "--name",
                "miglet",
                "--distpath",
                f"{work}/dist",
                "--workpath",
                f"{work}/build",
                "--specpath",
                work,
                str(ENTRY),
            ],
            check=True,
        )
        folder = Path(work) / "dist" / "miglet"
        (folder / "GLIBC_FLOOR").write_text(glibc_floor(folder) + "\n")
        dist.mkdir(parents=True, exist_ok=True)
        archive = dist / f"miglet-{version()}-linux-{platform.machine()}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname="miglet")
    return archive


def build_deb(dist: Path) -> Path:
    """The Debian package of the bundle already in `dist`; returns it."""
    machine = platform.machine()
    archive = dist / f"miglet-{version()}-linux-{machine}.tar.gz"
    with tempfile.TemporaryDirectory(prefix="miglet-deb-") as work:
        root = Path(work) / "root"
        (root / "opt").mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root / "opt", filter="tar")
        floor = (root / "opt" / "miglet" / "GLIBC_FLOOR").read_text().strip()
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "usr" / "bin" / "miglet").symlink_to("/opt/miglet/miglet")
        unit_dir = root / "lib" / "systemd" / "system"
        unit_dir.mkdir(parents=True)
        unit = UNIT.read_text().replace("ExecStart=/usr/local/bin/miglet run", "ExecStart=/usr/bin/miglet run")
        unit = re.sub(r"^# The cloud-init example links.*\n", "", unit, flags=re.MULTILINE)
        (unit_dir / "miglet.service").write_text(unit)
        etc = root / "etc" / "miglet"
        etc.mkdir(parents=True)
        shutil.copy(ENV_EXAMPLE, etc / "miglet.env")
        (etc / "miglet.env").chmod(0o600)  # it will hold the controller's address, and maybe its token
        debian = root / "DEBIAN"
        debian.mkdir()
        size_kib = sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) // 1024
        arch = DEB_ARCH.get(machine, machine)
        (debian / "control").write_text(
            f"""Package: miglet
Version: {version()}
Architecture: {arch}
Maintainer: MIGlet maintainers <miglet@localhost>
Installed-Size: {size_kib}
Depends: libc6 (>= {floor})
Section: admin
Priority: optional
Description: agent inside each ephemeral CI VM for GitHub Actions runners
 MIGlet introduces the VM to its controller, receives a runner registration,
 configures and starts GitHub's actions/runner, reports each job, and stops
 without losing anything. Standalone build: it needs no Python.
"""
        )
        (debian / "conffiles").write_text("/etc/miglet/miglet.env\n")
        # Only what a package should do: tell systemd its unit changed. Nothing is enabled or started.
        for script in ("postinst", "postrm"):
            path = debian / script
            path.write_text(
                "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then\n"
                "    systemctl daemon-reload >/dev/null 2>&1 || true\nfi\nexit 0\n"
            )
            path.chmod(0o755)
        deb = dist / f"miglet_{version()}_{arch}.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return deb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("bundle", "deb"))
    parser.add_argument("dist", type=Path)
    parser.add_argument("--python", default=sys.executable, help="the Python that runs PyInstaller")
    args = parser.parse_args()
    built = build_bundle(args.dist, args.python) if args.what == "bundle" else build_deb(args.dist)
    print(built.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
