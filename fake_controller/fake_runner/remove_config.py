"""`DeleteLocalRunnerConfig`: delete `.credentials`/`.runner` with the real runner's messages.

Shared by `config.sh remove` and by an ephemeral runner after its one job.
"""

from __future__ import annotations

from pathlib import Path

from .terminal import Terminal


def delete_local_config(root: Path, term: Terminal) -> None:
    """Remove the credentials (and RSA key), then the settings, printing what happened."""
    creds = root / ".credentials"
    if creds.exists():
        creds.unlink()
        (root / ".credentials_rsaparams").unlink(missing_ok=True)
        term.success("Removed .credentials")
    else:
        term.line("Does not exist. Skipping Removing .credentials")
    settings = root / ".runner"
    if settings.exists():
        settings.unlink()
        term.success("Removed .runner")
    else:
        term.line("Does not exist. Skipping Removing .runner")
