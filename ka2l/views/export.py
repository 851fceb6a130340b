"""Downloads: CSV safe against spreadsheet formula injection, and JSONL."""

from __future__ import annotations

import json
from typing import Any

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """Text a spreadsheet would run as a formula gets a leading apostrophe: '=1+1' -> "'=1+1"."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _cell(value: Any) -> Any:
    """A list or object cell (gold answers) as JSON, which the pool reader reads back, not as Python's repr."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    if hasattr(value, "tolist") and not isinstance(value, str):
        return json.dumps(value.tolist(), ensure_ascii=False)
    return neutralise(value)


def _is_text(series) -> bool:
    """Object, string (Python or Arrow) and categorical columns can hold text; numbers, booleans and dates cannot."""
    import pandas as pd

    dtype = series.dtype
    return (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)
            or isinstance(dtype, pd.CategoricalDtype))


def to_safe_csv(frame) -> bytes:
    """CSV where every text cell and header that a spreadsheet would run as a formula is neutralised,
    whatever the column's dtype (object, ``string``, Arrow-backed or categorical); list cells go out as
    JSON lists. Nullable integer columns stay integers (44, not 44.0)."""
    safe = frame.copy()
    for col in safe.columns:
        if _is_text(safe[col]):
            safe[col] = safe[col].astype(object).map(_cell)
    safe.columns = [neutralise(str(c)) for c in safe.columns]
    return safe.to_csv(index=False).encode("utf-8")


def to_jsonl(frame) -> bytes:
    rows = json.loads(frame.to_json(orient="records"))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
