"""`python -m benchmarks` (`just bench`): run every benchmark, print a table, write the results.

Results go to `benchmarks/results.json` (machine-readable) and `docs/benchmarks.md` (method, machine, figures).
Each benchmark can be run alone: `python -m benchmarks latency startup`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from benchmarks import fleet, footprint, latency, preemption, report, startup, warmup
from benchmarks.common import machine_description

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
REPORT = ROOT / "docs" / "benchmarks.md"

BENCHMARKS: dict[str, Callable[[Path], Awaitable[dict[str, Any]]]] = {
    "latency": latency.run,
    "startup": startup.run,
    "footprint": footprint.run,
    "fleet": fleet.run,
    "preemption": preemption.run,
    "warmup": warmup.run,
}


def calibration() -> dict[str, float]:
    """How fast this machine runs Python at all, so figures from different machines can be compared."""
    runs = []
    for _ in range(5):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "import asyncio"], check=True)
        runs.append(time.monotonic() - start)
    return {"python_import_asyncio_ms": round(sorted(runs)[2] * 1000, 1)}


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = machine_description() | calibration()
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="miglet-bench-") as workdir:
        for name in chosen:
            print(f"running {name} ...", flush=True)
            started = time.monotonic()
            results[name] = trio.run(BENCHMARKS[name], Path(workdir))
            print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = report.table(results)
    print(table)
    REPORT.write_text(report.document(results, table))
    print(f"wrote {RESULTS.relative_to(ROOT)} and {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
