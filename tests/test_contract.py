"""The contract, tried by a tool that reads it: schemathesis fuzzes the fake controller against docs/openapi.json.

Rules: the fake controller is served as a real process on 127.0.0.1, answering polls at once (its long poll would
hold a request for as long as `wait` asks); schemathesis generates valid and invalid requests (`--mode all`),
bounded in number, and checks every answer against the document. Skipped where schemathesis is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ST = shutil.which("st", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(ST is None, reason="schemathesis not installed")


def test_the_fake_controller_satisfies_the_document_for_valid_and_invalid_requests() -> None:
    assert ST is not None
    server = subprocess.Popen(
        [sys.executable, "-m", "fake_controller", "--port", "0", "--quiet", "--no-long-poll"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match is not None, line
        result = subprocess.run(
            [
                ST,
                "run",
                str(ROOT / "docs" / "openapi.json"),
                "--url",
                match[1],
                "--mode",
                "all",
                "--phases",
                "examples,fuzzing",
                "--max-examples",
                "30",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:]
        assert "No issues found" in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
