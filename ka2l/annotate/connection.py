"""Where ka2l finds its Label Studio: a URL and an API token, kept out of every row, log, job config and
error message.

Three ways to connect, first found wins:

1. the environment: ``KA2L_LABEL_STUDIO_URL`` and ``KA2L_LABEL_STUDIO_TOKEN`` (both set);
2. ``.streamlit/secrets.toml`` at the project root, table ``[label_studio]`` with ``url`` and ``token``;
3. the file the Settings page (and ``ka2l annotate serve``) writes: ``<data folder>/secrets/label_studio.json``,
   readable by its owner only (0600, in a 0700 folder). A file others can read is refused, not used.

Only the masked form of a token is ever shown:

>>> mask("a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f89f0e")
'a1b2…9f0e'
>>> mask("short")
'…'
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..paths import PROJECT_ROOT, data_dir

log = logging.getLogger(__name__)

ENV_URL = "KA2L_LABEL_STUDIO_URL"
ENV_TOKEN = "KA2L_LABEL_STUDIO_TOKEN"
SECRETS_TABLE = "label_studio"

HOW_TO_CONNECT = (
    "Connect ka2l to Label Studio in one of three ways: start the local server with `python -m ka2l annotate serve` "
    "(or the button on the Annotate page); enter the URL and token on the Settings page (kept in "
    "<data folder>/secrets/label_studio.json, readable by you only); or set the environment variables "
    f"{ENV_URL} and {ENV_TOKEN} (or a [label_studio] table with url and token in .streamlit/secrets.toml)."
)


def mask(token: str | None) -> str:
    """The first and last four characters of a token; nothing of a token too short to hide."""
    token = token or ""
    return f"{token[:4]}…{token[-4:]}" if len(token) >= 16 else "…"


@dataclass(frozen=True)
class Connection:
    """A Label Studio URL and its token. ``repr`` and ``str`` never show the token, only ``masked``."""

    url: str
    token: str = field(repr=False)
    source: str = ""  # where it came from: "environment", "secrets.toml" or the file's path

    @property
    def masked(self) -> str:
        return mask(self.token)

    def __str__(self) -> str:
        return f"{self.url} (token {self.masked}, from {self.source})"


def secrets_toml_path() -> Path:
    return PROJECT_ROOT / ".streamlit" / "secrets.toml"


def secrets_file() -> Path:
    return data_dir() / "secrets" / "label_studio.json"


def _clean_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"The Label Studio URL {url!r} does not start with http:// or https://. "
            "Enter the address you open Label Studio at, e.g. http://127.0.0.1:8080."
        )
    return url


def _clean_token(token: str) -> str:
    token = (token or "").strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError(
            "The Label Studio token is empty or contains spaces. Copy it from Label Studio's "
            "Account & Settings page (an access token or a legacy token)."
        )
    return token


def _from_env() -> Connection | None:
    url, token = os.environ.get(ENV_URL, "").strip(), os.environ.get(ENV_TOKEN, "").strip()
    if not url and not token:
        return None
    if not (url and token):
        missing = ENV_TOKEN if url else ENV_URL
        raise ConfigError(f"{missing} is not set but {ENV_URL if url else ENV_TOKEN} is. Set both, or neither.")
    return Connection(_clean_url(url), _clean_token(token), "environment")


def _from_secrets_toml() -> Connection | None:
    path = secrets_toml_path()
    if not path.is_file():
        return None
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get(SECRETS_TABLE)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        # the parser's message may quote the offending line, which may hold a token: name only the file
        raise ConfigError(f"{path} could not be read as TOML ({type(exc).__name__}). Fix the file's syntax.") from None
    if not table:
        return None
    if not isinstance(table, dict) or not table.get("url") or not table.get("token"):
        raise ConfigError(f"The [{SECRETS_TABLE}] table in {path} needs both `url` and `token`.")
    return Connection(_clean_url(str(table["url"])), _clean_token(str(table["token"])), "secrets.toml")


def _from_file() -> Connection | None:
    path = secrets_file()
    if not path.is_file():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path} can be read by other users (mode {mode:o}); ka2l does not use a token kept like that. "
            f"Run `chmod 600 {path}`, or save the connection again on the Settings page."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Connection(_clean_url(data["url"]), _clean_token(data["token"]), str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a valid connection file ({type(exc).__name__}). Save the connection again on the Settings page."
        ) from None


def load() -> Connection | None:
    """The connection to use (environment, then secrets.toml, then the 0600 file), or None if none is set."""
    for source in (_from_env, _from_secrets_toml, _from_file):
        found = source()
        if found is not None:
            log.debug("Label Studio connection %s", found)
            return found
    return None


def require() -> Connection:
    """The connection, or a ConfigError that names the ways to set one."""
    found = load()
    if found is None:
        raise ConfigError("No Label Studio connection is set. " + HOW_TO_CONNECT)
    return found


def save(url: str, token: str) -> Path:
    """Write the connection to the 0600 file (atomically, in a 0700 folder) and return its path."""
    url, token = _clean_url(url), _clean_token(token)
    path = secrets_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".label_studio.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"url": url, "token": token}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("Label Studio connection saved to %s (token %s)", path, mask(token))
    return path


def forget() -> bool:
    """Delete the saved connection file; True if there was one. The environment and secrets.toml stay as they are."""
    path = secrets_file()
    if path.is_file():
        path.unlink()
        log.info("Label Studio connection file %s removed", path)
        return True
    return False
