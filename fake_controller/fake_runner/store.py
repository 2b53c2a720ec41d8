"""Files the fake runner reads and writes: its config files and the fake GitHub's state.

Runner side (same names and shapes as the real runner): `.runner` (camelCase JSON, UTF-8 with BOM, no
secrets), `.credentials` (OAuth client data, never the registration token), `.credentials_rsaparams`.
Fake GitHub side, under `DIR/_fake_github/`: `calls.jsonl` (one line per listener invocation, for tests),
`left_behind.jsonl` (processes the fake left behind on purpose, for tests),
`runners.json` (names registered at "GitHub"), `jobs/` (queued job files the runner picks up).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .behaviour import Behaviour

ROOT_ENV = "FAKE_RUNNER_ROOT"
FAKE_GITHUB = "_fake_github"
CALLS_FILE = "calls.jsonl"
LEFT_BEHIND_FILE = "left_behind.jsonl"
JOBS_DIR = "jobs"
REGISTRY_FILE = "runners.json"


def runner_root() -> Path:
    """The runner directory: set by the `bin/Runner.Listener` shim (like the real binary's parent dir)."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()


def github_dir(root: Path) -> Path:
    """`DIR/_fake_github`: everything the fake GitHub side keeps."""
    return root / FAKE_GITHUB


def record_call(root: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to `calls.jsonl`."""
    append_record(root, CALLS_FILE, record)


def append_record(root: Path, name: str, record: dict[str, Any]) -> None:
    """Append one JSON line to `_fake_github/NAME` in a single O_APPEND write (safe with concurrent writers)."""
    path = github_dir(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def load_dotenv(root: Path) -> None:
    """`Program.LoadAndSetEnv`: KEY=VALUE lines of `DIR/.env` become environment variables."""
    try:
        lines = (root / ".env").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for entry in lines:
        key, sep, value = entry.partition("=")
        if sep and key:
            os.environ[key] = value


def write_json(path: Path, obj: Any, bom: bool = True) -> None:
    """Write indented JSON like `IOUtil.SaveObject` (Encoding.UTF8 => with a byte-order mark)."""
    text = json.dumps(obj, indent=2)
    path.write_bytes(("\ufeff" if bom else "").encode("utf-8") + text.encode("utf-8"))


def read_settings(root: Path) -> dict[str, Any] | None:
    """The parsed `.runner`, or None when the runner is not configured."""
    try:
        raw = (root / ".runner").read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    loaded = json.loads(raw)
    return loaded if isinstance(loaded, dict) else {}


def is_hosted(url: str) -> bool:
    """`UrlUtil.IsHostedServer`: github.com (and GHE.com / localhost variants) versus GHES."""
    host = (urlsplit(url).hostname or "").lower()
    return host in ("github.com", "www.github.com", "github.localhost") or host.endswith((".ghe.com", ".ghe.localhost"))


def registration_api(url: str) -> str:
    """The URL `GetTenantCredential` POSTs the token to; shown in the 404 message."""
    parts = urlsplit(url)
    if is_hosted(url):
        return f"{parts.scheme}://api.{parts.hostname}/actions/runner-registration"
    return f"{parts.scheme}://{parts.netloc}/api/v3/actions/runner-registration"


def new_settings(name: str, url: str, pool: str, work: str, ephemeral: bool, disable_update: bool) -> dict[str, Any]:
    """A `.runner` object as the real configure saves it (false members omitted, like EmitDefaultValue)."""
    tenant = secrets.token_hex(8)
    settings: dict[str, Any] = {
        "agentId": 1000 + secrets.randbelow(9000),
        "agentName": name,
        "poolId": 1,
        "poolName": pool,
    }
    if disable_update:
        settings["disableUpdate"] = True
    if ephemeral:
        settings["ephemeral"] = True
    settings["serverUrl"] = f"https://pipelinesghubeus1.actions.githubusercontent.com/{tenant}/"
    settings["gitHubUrl"] = url
    settings["workFolder"] = work
    settings["useV2Flow"] = True
    settings["serverUrlV2"] = "https://broker.actions.githubusercontent.com/"
    if not is_hosted(url):
        settings["isHostedServer"] = False
    return settings


def new_credentials(settings: dict[str, Any]) -> dict[str, Any]:
    """`.credentials`: the OAuth client the runner uses afterwards (a fresh fake, never the token)."""
    return {
        "scheme": "OAuth",
        "data": {
            "clientId": str(uuid.uuid4()),
            "authorizationUrl": f"{settings.get('serverUrl', 'https://example.invalid/')}_apis/oauth2/token",
            "requireFipsCryptography": "True",
        },
    }


def save_config(root: Path, settings: dict[str, Any]) -> None:
    """Write `.credentials`, `.credentials_rsaparams` (0600) and `.runner`."""
    write_json(root / ".credentials", new_credentials(settings))
    rsa = root / ".credentials_rsaparams"
    write_json(rsa, {"d": secrets.token_urlsafe(32), "modulus": secrets.token_urlsafe(64), "exponent": "AQAB"})
    rsa.chmod(0o600)
    write_json(root / ".runner", settings)


def load_registry(root: Path, behaviour: Behaviour) -> dict[str, dict[str, Any]]:
    """Runners registered at the fake GitHub; seeded from `existing_runners` until first written."""
    try:
        loaded = json.loads((github_dir(root) / REGISTRY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {name: {"labels": []} for name in behaviour.existing_runners}
    return loaded if isinstance(loaded, dict) else {}


def save_registry(root: Path, registry: dict[str, dict[str, Any]]) -> None:
    """Atomically replace `runners.json`."""
    path = github_dir(root) / REGISTRY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{REGISTRY_FILE}.{os.getpid()}")
    write_json(tmp, registry, bom=False)
    tmp.chmod(0o666)
    tmp.replace(path)


def encode_jitconfig(name: str, url: str = "https://github.com/fake-org", ephemeral: bool = True) -> str:
    """Build a JIT config in the real format: base64 of JSON {file name: base64 file content}."""
    settings = new_settings(name, url, "Default", "_work", ephemeral, disable_update=False)
    files = {".runner": settings, ".credentials": new_credentials(settings)}
    blob = {key: base64.b64encode(json.dumps(value).encode("utf-8")).decode("ascii") for key, value in files.items()}
    return base64.b64encode(json.dumps(blob).encode("utf-8")).decode("ascii")


def decode_jitconfig(value: str) -> dict[str, bytes]:
    """Inverse of `encode_jitconfig`; raises ValueError with a .NET-like message when malformed."""
    message = (
        "The input is not a valid Base-64 string as it contains a non-base 64 character, more than two "
        "padding characters, or an illegal character among the padding characters."
    )
    try:
        outer = json.loads(base64.b64decode(value, validate=True))
        files = dict(outer) if isinstance(outer, dict) else None
        decoded = {str(k): base64.b64decode(str(v), validate=True) for k, v in (files or {}).items()}
    except (ValueError, TypeError) as exc:
        raise ValueError(message) from exc
    if not decoded:
        raise ValueError(message)
    return decoded


def write_jit_files(root: Path, files: dict[str, bytes]) -> None:
    """Write the decoded JIT files into the runner root, like `Runner.ExecuteCommand` does."""
    for name, content in files.items():
        target = root / Path(name).name
        target.write_bytes(content)
