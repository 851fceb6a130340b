"""Built-in question sources: the committed demo pools and FanOutQA's single-hop questions.

``demo:NAME`` reads ``data/demo/NAME.csv`` (built from Debian's bsdgames quiz files, BSD licence,
see data/demo/NOTICE). ``fanoutqa`` (or ``fanoutqa:test``) takes the leaf sub-questions of FanOutQA's
decompositions that have a single answer (data CC-BY-SA-4.0; install with ``pip install --no-deps fanoutqa``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import PoolError
from ..paths import demo_dir
from .reader import PoolData, read_pool, validate_records


def demo_pools() -> list[str]:
    return sorted(p.stem for p in demo_dir().glob("*.csv"))


def is_builtin(ref: str) -> bool:
    return ref.startswith("demo:") or ref.split(":")[0] == "fanoutqa"


def load_builtin(ref: str, name: str | None = None, skip_invalid: bool = False) -> PoolData:
    if ref.startswith("demo:"):
        stem = ref.split(":", 1)[1]
        path = demo_dir() / f"{stem}.csv"
        if not path.is_file():
            raise PoolError(f"No demo pool {stem!r}. Demo pools: {', '.join(demo_pools()) or '(none)'}.")
        return read_pool(path, name=name or stem, skip_invalid=skip_invalid)
    split = ref.split(":", 1)[1] if ":" in ref else "dev"
    return validate_records(fanoutqa_single_hop(split), name=name or f"fanoutqa-{split}", source=f"fanoutqa:{split}", skip_invalid=True)


def fanoutqa_single_hop(split: str = "dev") -> list[dict]:
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise PoolError("FanOutQA is not installed. Run: pip install --no-deps fanoutqa")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"fanout-final-{split}.json"
    if not path.is_file():
        raise PoolError(f"FanOutQA has no {split!r} split at {path}. Use 'dev' or 'test'.")
    records: list[dict] = []

    def walk(node: dict) -> None:
        subs = node.get("decomposition") or []
        if not subs and isinstance(node.get("answer"), (str, int, float)) and str(node["answer"]).strip():
            records.append({"id": node["id"], "question": node["question"], "answer": str(node["answer"]),
                            "source": "FanOutQA (CC-BY-SA-4.0)", "wikipedia": (node.get("evidence") or {}).get("title")})
        for s in subs:
            walk(s)

    for top in json.loads(path.read_text()):
        for sub in top.get("decomposition") or []:
            walk(sub)
    return records
