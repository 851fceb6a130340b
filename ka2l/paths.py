"""Where runtime state lives. ``KA2L_DATA_DIR`` overrides the default ``data/`` beside the package."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("KA2L_DATA_DIR") or PROJECT_ROOT / "data")


def db_path() -> Path:
    return data_dir() / "ka2l.db"


def arrays_dir() -> Path:
    return data_dir() / "arrays"


def models_dir() -> Path:
    return data_dir() / "models"


def probes_dir() -> Path:
    return data_dir() / "probes"


def demo_dir() -> Path:
    return PROJECT_ROOT / "data" / "demo"
