"""App settings stored in the database (model, device, judge). Validated by building the configs
they feed, so a bad value is refused with the config's own message and nothing is stored."""

from __future__ import annotations

import json
from typing import Any

from .config import JudgeConfig, ModelSpec
from .store.db import connect

DEFAULTS: dict[str, Any] = {"model": ModelSpec().name_or_path, "device": "auto", "judge": "lexical", "judge_model": None}


def load() -> dict[str, Any]:
    with connect() as db:
        stored = {r["key"]: json.loads(r["value"]) for r in db.query("SELECT key, value FROM settings")}
    return {**DEFAULTS, **{k: v for k, v in stored.items() if k in DEFAULTS}}


def save(values: dict[str, Any]) -> dict[str, Any]:
    merged = {**load(), **{k: v for k, v in values.items() if k in DEFAULTS}}
    model_spec(merged)
    judge_config(merged)
    check_device(merged["device"])
    with connect() as db, db.atomic():
        db["settings"].insert_all(({"key": k, "value": json.dumps(v)} for k, v in merged.items()), replace=True)
    return merged


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without a GPU), through the one device
    resolver: saved, it would only fail later, inside every job."""
    from .device import resolve_device

    resolve_device(name)


def model_spec(s: dict[str, Any]) -> ModelSpec:
    return ModelSpec(name_or_path=s["model"], device=s["device"])


def judge_config(s: dict[str, Any]) -> JudgeConfig:
    return JudgeConfig(kind=s["judge"], model=s["judge_model"] or None, device=s["device"])
