"""Where runtime state lives: ``KA2L_DATA_DIR`` if set, else the folder chosen in the app's Settings
(kept in ~/.config/ka2l/app.json, outside any data folder), else ``data/`` beside the package."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def user_config_path() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ka2l" / "app.json"


def _user_data_dir() -> str | None:
    path = user_config_path()
    try:
        return json.loads(path.read_text()).get("data_dir") if path.is_file() else None
    except (OSError, ValueError):
        return None


def data_dir() -> Path:
    return Path(os.environ.get("KA2L_DATA_DIR") or _user_data_dir() or PROJECT_ROOT / "data")


def set_data_dir(folder: str | Path) -> Path:
    """Remember ``folder`` as the data folder (created if needed). ``KA2L_DATA_DIR`` still wins."""
    target = Path(folder).expanduser().resolve()
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".ka2l-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Cannot use {target} as the data folder: {exc.strerror}. Choose a folder you can write to.") from exc
    path = user_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data_dir": str(target)}, indent=1))
    return target


def db_path() -> Path:
    return data_dir() / "ka2l.db"


def arrays_dir() -> Path:
    return data_dir() / "arrays"


def models_dir() -> Path:
    return data_dir() / "models"


def probes_dir() -> Path:
    return data_dir() / "probes"


def decoders_dir() -> Path:
    return data_dir() / "decoders"


def demo_dir() -> Path:
    return PROJECT_ROOT / "data" / "demo"
