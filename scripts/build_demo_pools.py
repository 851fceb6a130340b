"""Build the committed demo pools in data/demo/ from Debian's bsdgames quiz files.

    apt-get download bsdgames && dpkg-deb -x bsdgames_*.deb /tmp/bsd
    python scripts/build_demo_pools.py /tmp/bsd/usr/share/games/bsdgames/quiz

Writes capitals.csv (countries, US states, Canadian provinces), elements.csv and NOTICE (BSD licence).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ka2l.pools.quizfiles import canonical, expand, read_quiz  # noqa: E402

CAPITAL_FILES = {"africa": "Africa", "america": "the Americas", "asia": "Asia", "europe": "Europe", "state": "US states", "province": "Canadian provinces"}

NOTICE = """The demo pools in this folder are derived from the quiz(6) data files of the BSD games
(Debian package bsdgames), rewritten as questions with their accepted answers.

Copyright (c) 1980, 1982, 1983, 1985-1994 The Regents of the University of California.
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:
1. Redistributions of source code must retain the above copyright notice, this list of conditions
   and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
   conditions and the following disclaimer in the documentation and/or other materials provided
   with the distribution.
3. Neither the name of the University nor the names of its contributors may be used to endorse or
   promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE REGENTS AND CONTRIBUTORS ``AS IS'' AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR
A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE REGENTS OR CONTRIBUTORS BE LIABLE FOR ANY
DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED
TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR
TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF
ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


_ARTICLE = ("United", "Republic", "Democratic", "People's", "Central African", "Malagasy", "Dominican", "Czech", "Netherlands",
            "Philippines", "Maldives", "Comoros", "Seychelles", "British", "Cayman", "Falkland", "Turks", "Faroe", "Aland")


def place_name(raw: str) -> str:
    """'United Kingdom' -> 'the United Kingdom'."""
    name = raw.replace("Rep. Congo", "Republic of the Congo")
    return f"the {name}" if name.startswith(_ARTICLE) or name.endswith("Islands") else name


def write(path: Path, rows: list[dict]) -> None:
    seen, unique = set(), []
    for r in rows:
        if r["question"].casefold() not in seen:
            seen.add(r["question"].casefold())
            unique.append(r)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "question", "answer", "category"])
        w.writeheader()
        w.writerows(unique)
    print(f"{path.relative_to(ROOT)}: {len(unique)} questions")


def main(quiz: Path) -> None:
    out = ROOT / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    capitals = []
    for stem, category in CAPITAL_FILES.items():
        for fields in read_quiz(quiz / stem):
            place, capital = place_name(canonical(fields[0])), fields[1]
            capitals.append({"id": f"{stem}-{len(capitals)}", "question": f"What is the capital of {place}?",
                             "answer": json.dumps([canonical(capital)] + [a for a in expand(capital) if a != canonical(capital)], ensure_ascii=False),
                             "category": category})
    write(out / "capitals.csv", capitals)
    elements = []
    for symbol, number, _weight, name in (f[:4] for f in read_quiz(quiz / "elements")):
        el = canonical(name)
        elements.append({"id": f"symbol-{symbol}", "question": f"Which chemical element has the symbol {symbol}?", "answer": json.dumps([el], ensure_ascii=False), "category": "element from symbol"})
        elements.append({"id": f"number-{symbol}", "question": f"What is the atomic number of {el}?", "answer": json.dumps([number]), "category": "atomic number"})
    write(out / "elements.csv", elements)
    (out / "NOTICE").write_text(NOTICE)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bsd/usr/share/games/bsdgames/quiz"))
