"""Reading BSD ``quiz(6)`` data files (Debian package bsdgames) into question/answer pairs.

A quiz field is a small pattern language: ``{x}`` optional, ``[a|b]`` alternatives, ``a|b``
alternatives at top level, and a trailing backslash continues a line. ``expand`` lists every
string a field accepts; the first alternative's longest expansion is its canonical form:

>>> expand("{G{eorge} }Washington")
['Washington', 'G Washington', 'George Washington']
>>> canonical("Cal{if{ornia}}|CA")
'California'
>>> expand("[St.|Saint] John's")
["St. John's", "Saint John's"]
>>> canonical("S[~\\ba|a\\b~|a]o Tom['\\be|e\\b'|e]"), canonical("C[^\\bo|o\\b^|o]te d'Ivoire")
('São Tomé', "Côte d'Ivoire")
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

# Accents are typewriter overstrikes: a mark, a backspace, a letter ("~\ba"), or the other way round.
_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", '"': "\u0308", "\u00b0": "\u030a", ",": "\u0327"}
_OVERSTRIKE = re.compile("([^\\x08])\\x08([^\\x08])")


def detex(text: str) -> str:
    """Resolve overstrikes: 'S~\\bao Tom\'\\be' -> 'São Tomé'; 'e\\b\'' -> 'é'. Other text is unchanged."""
    def repl(m: re.Match) -> str:
        a, b = m.group(1), m.group(2)
        mark, letter = (a, b) if a in _MARKS else (b, a)
        return unicodedata.normalize("NFC", letter + _MARKS[mark]) if mark in _MARKS else b

    return _OVERSTRIKE.sub(repl, text)


def _parse(pattern: str, pos: int, stop: str) -> tuple[list[list[str]], int]:
    """Top-level alternatives (each a list of expansions) up to a ``stop`` char, and the end position."""
    alts: list[list[str]] = []
    cur = [""]
    while pos < len(pattern) and pattern[pos] not in stop:
        ch = pattern[pos]
        if ch in "{[":
            inner, pos = _parse(pattern, pos + 1, "}" if ch == "{" else "]")
            options = [s for alt in inner for s in alt]
            if ch == "{":
                options = [""] + options
            cur = [a + b for a in cur for b in options]
        elif ch == "|":
            alts.append(cur)
            cur = [""]
        else:
            cur = [a + ch for a in cur]
        pos += 1
    alts.append(cur)
    return alts, pos


def alternatives(pattern: str) -> list[list[str]]:
    return _parse(pattern.strip(), 0, "")[0]


def expand(pattern: str) -> list[str]:
    return list(dict.fromkeys(detex(" ".join(s.split())) for alt in alternatives(pattern) for s in alt if s.strip()))


def canonical(pattern: str) -> str:
    first = [s for s in alternatives(pattern)[0] if s.strip()] or expand(pattern)
    return detex(" ".join(max(first, key=len).split()))


def read_quiz(path: Path) -> list[list[str]]:
    """Records of a quiz file as lists of raw fields (continuation lines joined)."""
    records, pending = [], ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.startswith("#"):
            records.append(line.split(":"))
    return records
