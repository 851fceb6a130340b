"""Reading and validating question pools (CSV / TSV, JSONL, JSON, Parquet).

A pool row needs ``question``; ``answer`` / ``answers`` (gold answers) and ``id`` are optional, and
an ``aliases`` column adds more gold answers beside ``answer``; every other column is kept as
metadata. A gold-answer cell may hold a string (aliases separated by ``|``, or a JSON list or object
in the string), a number, a list (NQ-open) or TriviaQA's answer object, whose ``value``,
``aliases`` and ``normalized_aliases`` are all imported. Any other shape is refused with its row
named, never stored as text. Rows are
numbered from 1, not counting a header. Validation collects every problem before failing, and
nothing is stored unless the whole file passes (or ``skip_invalid`` leaves the bad rows out).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PoolError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
DEFAULT_MAX_MB = 200
MAX_QUESTION_CHARS = 2000
ANSWER_COLUMNS = ("answer", "answers")
ALIAS_COLUMN = "aliases"
# TriviaQA's answer object (Hugging Face ``trivia_qa``): these fields give gold answers, the rest describe them.
TRIVIAQA_ANSWER_FIELDS = ("value", "aliases", "normalized_aliases")
TRIVIAQA_OTHER_FIELDS = ("normalized_value", "matched_wiki_entity_name", "normalized_matched_wiki_entity_name", "type")
# How a message tells the user to fix a problem. The defaults name the library argument and the CLI
# flag; the app passes its own wording (a checkbox, a field) through ``read_pool(hints=...)``, and a
# "question_column" sentence of its own to replace "Rename 'prompt' to 'question'.".
CLI_HINTS = {
    "skip_invalid": "import with skip_invalid (--skip-invalid)",
    "max_mb": "raise the limit (--max-mb) if this machine has the memory",
    "encoding": "give its encoding (e.g. --encoding cp1252)",
}
ACCEPTED_ANSWERS = ("Accepted: a string (aliases separated by '|'), a number, a list of strings (NQ-open), or TriviaQA's answer "
                    "object with value / aliases / normalized_aliases.")


@dataclass(frozen=True)
class QuestionRow:
    ext_id: str
    question: str
    answers: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class PoolData:
    name: str
    source: str
    rows: list[QuestionRow]
    n_read: int
    skipped: list[str] = field(default_factory=list)
    metadata_columns: list[str] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        return any(r.answers for r in self.rows)

    def sample(self, n: int, seed: int = 0) -> "PoolData":
        """A random subset of ``n`` rows (pool order kept), for quick runs on a slice of a big pool."""
        import random

        if n <= 0:
            raise PoolError(f"--limit must be a positive number of questions, got {n}.")
        keep = sorted(random.Random(seed).sample(range(len(self.rows)), min(n, len(self.rows))))
        return PoolData(self.name, self.source, [self.rows[i] for i in keep], self.n_read, self.skipped, self.metadata_columns)

    def report(self) -> dict[str, Any]:
        return {
            "rows_read": self.n_read,
            "rows_imported": len(self.rows),
            "rows_with_answers": sum(1 for r in self.rows if r.answers),
            "skipped": self.skipped,
            "metadata_columns": self.metadata_columns,
        }


def read_pool(
    path: Path | str,
    name: str | None = None,
    skip_invalid: bool = False,
    encoding: str | None = None,
    max_mb: float = DEFAULT_MAX_MB,
    source: str | None = None,
    question_column: str | None = None,
    hints: dict[str, str] | None = None,
) -> PoolData:
    """``source``: what messages and the stored pool call the file (default: its path);
    ``question_column``: the column holding the questions when none is named 'question';
    ``hints``: how messages say to fix a problem, overriding ``CLI_HINTS`` by key."""
    path = Path(path)
    hints = {**CLI_HINTS, **(hints or {})}
    if not path.is_file():
        raise PoolError(f"{path} does not exist or is not a file.")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PoolError(f"{path.name}: unsupported file type {path.suffix or '(none)'!r}. Use one of: {', '.join(sorted(FORMATS))}.")
    size = path.stat().st_size
    if size == 0:
        raise PoolError(f"{path.name} is empty (0 bytes). Export the pool again; it needs a 'question' column and at least one row.")
    if size > max_mb * 1024 * 1024:
        raise PoolError(
            f"{path.name} is {size / 1024 / 1024:.0f} MB, over the {max_mb:g} MB limit for one pool. "
            f"Split it into smaller pools, or {hints['max_mb']}."
        )
    records = _read_records(path, fmt, encoding, hints)
    return validate_records(records, name=name or path.stem, source=source or str(path), skip_invalid=skip_invalid,
                            question_column=question_column, hints=hints)


def read_columns(path: Path | str, encoding: str | None = None) -> list[str]:
    """The column names of a pool file, in order (for choosing the question column)."""
    path = Path(path)
    records = _read_records(path, FORMATS.get(path.suffix.lower(), "csv"), encoding)
    return [str(c) for c in dict.fromkeys(k for r in records for k in r)]


def read_corpus(path: Path | str, name: str | None = None, encoding: str | None = None, max_mb: float = DEFAULT_MAX_MB) -> PoolData:
    """An extra question corpus (decoder training data): a .txt file with one question per line, or
    any pool file with a 'question' column or a single column of any name. Blank lines are skipped;
    a corpus keeps its valid rows and reports the rest."""
    path = Path(path)
    if path.suffix.lower() == ".txt" and path.is_file():
        lines = [line.strip() for line in _read_text(path, encoding).splitlines()]
        records = [{"question": line} for line in lines if line]
        if not records:
            raise PoolError(f"{path.name} has no questions. Put one question per line.")
        return validate_records(records, name=name or path.stem, source=str(path), skip_invalid=True)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None or not path.is_file():
        return read_pool(path, name=name, skip_invalid=True, encoding=encoding, max_mb=max_mb)  # its errors name the problem
    records = _read_records(path, fmt, encoding)
    columns = list(records[0]) if records else []
    if len(columns) == 1 and str(columns[0]).strip().lower() != "question":
        records = [{"question": r[columns[0]]} for r in records]
    return validate_records(records, name=name or path.stem, source=str(path), skip_invalid=True)


def _read_text(path: Path, encoding: str | None, hints: dict[str, str] = CLI_HINTS) -> str:
    raw = path.read_bytes()
    head = raw[:8192]
    if head.startswith(b"PAR1"):
        raise PoolError(f"{path.name} is a Parquet file with a {path.suffix} name. Rename it to .parquet.")
    if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PoolError(f"{path.name} looks like a binary file (it contains NUL bytes), not text. Export the pool as UTF-8 CSV, JSONL or Parquet.")
    enc = encoding or ("utf-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig")
    try:
        return raw.decode(enc)
    except LookupError as exc:
        raise PoolError(f"Unknown encoding {encoding!r}. Use a Python codec name such as utf-8, cp1252 or latin-1.") from exc
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PoolError(
            f"{path.name} is not valid {enc} text: byte 0x{raw[exc.start]:02x} at line {line} cannot be decoded. "
            f"Re-save the file as UTF-8, or {hints['encoding']}."
        ) from exc


def _read_records(path: Path, fmt: str, encoding: str | None, hints: dict[str, str] = CLI_HINTS) -> list[dict[str, Any]]:
    import pandas as pd

    if fmt == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types
            raise PoolError(f"{path.name} is not a readable Parquet file: {exc}") from exc
        return frame.to_dict(orient="records")
    text = _read_text(path, encoding, hints)
    if not text.strip():
        raise PoolError(f"{path.name} contains only whitespace. It needs a 'question' column and at least one row.")
    if fmt in ("csv", "tsv"):
        try:
            frame = pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False, skip_blank_lines=True)
        except pd.errors.ParserError as exc:
            raise PoolError(f"{path.name} is not well-formed {fmt.upper()}: {exc}. Check quoting on that line.") from exc
        return frame.to_dict(orient="records")
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PoolError(f"{path.name} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise PoolError(f"{path.name} must hold a JSON list of objects, one per question.")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoolError(f"{path.name} line {n} is not valid JSON ({exc.msg}). Each line must be one JSON object.") from exc
        if not isinstance(obj, dict):
            raise PoolError(f"{path.name} line {n} is a JSON {type(obj).__name__}, expected an object such as {{\"question\": \"...\"}}.")
        records.append(obj)
    return records


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _shape(value: Any) -> str:
    """How a refused answer cell looks, for the message: 'an object with keys any_of', 'a boolean'."""
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(str, value)) or '(none)'}"
    if isinstance(value, (list, tuple)):
        odd = next(v for v in value if not _is_missing(v) and (isinstance(v, (bool, dict, list, tuple)) or not isinstance(v, (str, int, float))))
        return f"a list holding {_shape(odd) if not isinstance(odd, (list, tuple)) else 'a list'}"
    if isinstance(value, bool):
        return "a boolean"
    return f"a {type(value).__name__}"


def _plain(value: Any) -> Any:
    """numpy / Arrow containers and scalars (Parquet cells) as Python lists, dicts and scalars."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_answers(value: Any) -> tuple[str, ...]:
    """Gold answers from a cell: a string (aliases separated by '|', or a JSON list / object in the
    string), a number, a list, or TriviaQA's answer object. Raises ``PoolError`` (without a row
    number; the caller adds it) for any other shape.

    >>> parse_answers({"value": "Paris", "aliases": ["Paris", "Paris, France"], "normalized_aliases": ["paris"], "type": "WikipediaEntity"})
    ('Paris', 'Paris, France', 'paris')
    """
    value = _plain(value)
    if _is_missing(value):
        return ()
    if isinstance(value, str):
        s = value.strip()
        if s.startswith(("[", "{")):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                value = s.split("|")
        else:
            value = s.split("|")
    if isinstance(value, dict):
        unknown = [k for k in value if k not in TRIVIAQA_ANSWER_FIELDS + TRIVIAQA_OTHER_FIELDS]
        if unknown or not any(k in value for k in ("value", "aliases")):
            raise PoolError(f"holds {_shape(value)}. {ACCEPTED_ANSWERS}")
        items: list[Any] = []
        for k in TRIVIAQA_ANSWER_FIELDS:
            v = value.get(k)
            items += v if isinstance(v, list) else [] if _is_missing(v) else [v]
        value = items
    if isinstance(value, bool) or not isinstance(value, (list, str, int, float)):
        raise PoolError(f"holds {_shape(value)}. {ACCEPTED_ANSWERS}")
    if not isinstance(value, list):
        value = [value]
    if any(isinstance(v, (bool, dict, list)) or not (_is_missing(v) or isinstance(v, (str, int, float))) for v in value):
        raise PoolError(f"holds {_shape(value)}. {ACCEPTED_ANSWERS}")
    return tuple(dict.fromkeys(str(v).strip() for v in value if not _is_missing(v) and str(v).strip()))


def validate_records(records: Sequence[dict[str, Any]], name: str, source: str, skip_invalid: bool = False,
                     question_column: str | None = None, hints: dict[str, str] | None = None) -> PoolData:
    hints = {**CLI_HINTS, **(hints or {})}
    if not records:
        raise PoolError(f"{source} has no rows. Add at least one question.")
    columns = list(dict.fromkeys(k for r in records for k in r))
    lower = {str(c).strip().lower(): c for c in columns}
    if question_column is not None:
        chosen = next((c for c in columns if str(c) == question_column), None)
        if chosen is None:
            raise PoolError(f"{source} has no column {question_column!r}. Columns found: {', '.join(map(str, columns)) or '(none)'}.")
        lower = {k: c for k, c in lower.items() if c != chosen and k != "question"} | {"question": chosen}
    if "question" not in lower:
        hint = next((c for c in columns if str(c).strip().lower() in ("prompt", "query", "text", "q", "questions")), None)
        raise PoolError(
            f"{source} has no 'question' column. Columns found: {', '.join(map(str, columns)) or '(none)'}. "
            + (hints["question_column"] if "question_column" in hints
               else f"Rename {hint!r} to 'question'." if hint else "Rename the column holding the questions to 'question'.")
        )
    qcol, idcol = lower["question"], lower.get("id")
    acol = next((lower[c] for c in ANSWER_COLUMNS if c in lower), None)
    alias_col = lower.get(ALIAS_COLUMN)
    gold_cols = [c for c in (acol, alias_col) if c is not None]
    meta_cols = [c for c in columns if c not in (qcol, idcol, *gold_cols)]

    problems: list[str] = []
    bad: set[int] = set()
    seen_q: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    rows: list[tuple[int, QuestionRow]] = []
    for n, rec in enumerate(records, start=1):
        raw_q = rec.get(qcol)
        q = "" if _is_missing(raw_q) else " ".join(str(raw_q).split())
        ext = str(n) if idcol is None or _is_missing(rec.get(idcol)) or str(rec.get(idcol)).strip() == "" else str(rec[idcol]).strip()
        if not q:
            problems.append(f"Row {n}: column 'question' is empty. Every row needs a question; remove the row or fill it in.")
            bad.add(n)
            continue
        if len(q) > MAX_QUESTION_CHARS:
            problems.append(f"Row {n}: the question is {len(q)} characters, over the {MAX_QUESTION_CHARS} limit. Shorten it or remove the row.")
            bad.add(n)
            continue
        key = q.casefold()
        if key in seen_q:
            problems.append(f"Row {n}: duplicate of row {seen_q[key]} ({q[:60]!r}). Remove one of them.")
            bad.add(n)
            continue
        if ext in seen_id:
            problems.append(f"Row {n}: id {ext!r} is already used by row {seen_id[ext]}. Ids must be unique.")
            bad.add(n)
            continue
        answers: list[str] = []
        try:
            for col in gold_cols:
                answers += parse_answers(rec.get(col))
        except PoolError as exc:
            problems.append(f"Row {n}: column {str(col)!r} {exc}")
            bad.add(n)
            continue
        seen_q[key], seen_id[ext] = n, n
        meta = {str(c): _jsonable(rec.get(c)) for c in meta_cols if not _is_missing(rec.get(c))}
        rows.append((n, QuestionRow(ext_id=ext, question=q, answers=tuple(dict.fromkeys(answers)), metadata=meta)))
    if problems and not skip_invalid:
        raise PoolError(
            f"{source}: {len(bad)} of {len(records)} rows are invalid, so nothing was imported. "
            f"Fix them, or {hints['skip_invalid']} to leave them out:",
            problems,
        )
    if not rows:
        raise PoolError(f"{source}: none of the {len(records)} rows is valid, so nothing was imported.", problems)
    return PoolData(name=name, source=source, rows=[r for _, r in rows], n_read=len(records), skipped=problems, metadata_columns=[str(c) for c in meta_cols])


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value if isinstance(value, (str, int, float, bool, list, dict)) or value is None else str(value)
