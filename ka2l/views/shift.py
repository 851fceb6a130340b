"""The boundary moved: a fine-tune's base Stage 1 run ("before") against its re-probe run ("after", the same
Stage 1 with the adapter, ``ka2l.finetune.reprobe``), per question and in one map. No Streamlit.

"Unknown" means the same on both sides: BiSE before is the base run's label, BiSE after is the tuned
model's SE against the base run's threshold gamma* (the re-probe run's own threshold would re-split the
tuned model's SE into two groups whatever happened, and may not exist when it is sure of nearly all).
P(unknown) on both sides is the base run's saved probe: on the base model's states, and on the tuned
model's (the re-probe's predictions).

    shift_summary(id)      shares unknown before / after, how many moved each way, correctness, mean P(unknown)
    shift_table(id)        one row per question, with whether the fine-tune trained on it
    shift_projection(id)   before and after in one 2-D projection fitted on the base run's states
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, NotFound
from ..paths import arrays_dir
from ..store import finetune as S
from ..store import queries as Q
from ..store.hidden import HiddenStates
from ..store.db import connect
from .maps import METHODS, fit_projection

UNKNOWN_TO_KNOWN = "unknown → known"
KNOWN_TO_UNKNOWN = "known → unknown"
TABLE_COLUMNS = ["question_id", "ext_id", "question", "gold", "bise_before", "bise_after", "moved", "correct_before", "correct_after",
                 "p_unknown_before", "p_unknown_after", "in_training", "finetune_split", "se_before", "se_after"]


def moved_label(before: int | None, after: int | None) -> str:
    """Which way a question crossed the boundary.

    >>> moved_label(1, 0), moved_label(0, 1), moved_label(1, 1), moved_label(None, 0)
    ('unknown → known', 'known → unknown', '', '')
    """
    if before == 1 and after == 0:
        return UNKNOWN_TO_KNOWN
    if before == 0 and after == 1:
        return KNOWN_TO_UNKNOWN
    return ""


def _runs(finetune_id: int) -> dict[str, Any]:
    """The fine-tune, its base and re-probe runs, the base run's saved probe and the fine-tune's data."""
    with connect() as db:
        row = S.get_finetune(db, finetune_id)
        if row["reprobe_run_id"] is None:
            raise NotFound(f"Fine-tune {finetune_id} has no re-probe yet, so there is no 'after' to compare. Run it with the "
                           f"Re-probe button on the Fine-tune page or `python -m ka2l reprobe --finetune {finetune_id}`.")
        if row["run_id"] is None:
            raise NotFound(f"Fine-tune {finetune_id}'s Stage 1 run was deleted, so there is no 'before' to compare with.")
        base, after = Q.get_run(db, row["run_id"]), Q.get_run(db, row["reprobe_run_id"])
        probes = Q.list_probes(db, base["id"])
        preds = Q.load_predictions(db, after["id"])
        data = S.load_data(db, finetune_id)
        scores = {"before": Q.load_scores(db, base["id"]), "after": Q.load_scores(db, after["id"])}
    if not probes:
        raise NotFound(f"Stage 1 run {base['id']} has no saved probe; re-probe fine-tune {finetune_id} after the run finishes.")
    return {"row": row, "base": base, "after": after, "probe": probes[-1], "predictions": preds, "data": data, "scores": scores}


def _normalised(question: str) -> str:
    return " ".join(question.casefold().split())


def _table(ctx: dict[str, Any]):
    import pandas as pd

    from ..probing.entropy import binarize
    from ..store.annotate import item_key
    from .tables import probe_scores

    before, after = ctx["scores"]["before"], {r["question_id"]: r for r in ctx["scores"]["after"]}
    gamma = ctx["base"]["threshold"]["gamma"]
    split_by_key = {d["item_key"]: d["split"] for d in ctx["data"]}
    split_by_text = {_normalised(d["question"]): d["split"] for d in ctx["data"]}  # file pairs are keyed by their text
    p_before = probe_scores(ctx["base"], ctx["probe"])  # (n,) in pool order, as load_scores
    p_after = {p["question_id"]: p["p_unknown"] for p in ctx["predictions"] if p["probe_id"] == ctx["probe"]["id"]}
    if len(p_before) != len(before):
        raise ConfigError(f"Stage 1 run {ctx['base']['id']} has {len(p_before)} hidden states for {len(before)} scored questions; "
                          f"finish the run before comparing.")
    rows = []
    for r, pb in zip(before, p_before):
        a = after.get(r["question_id"])
        se_after = None if a is None else a["se"]
        bise_after = None if se_after is None else int(binarize([se_after], gamma)[0])
        split = split_by_key.get(item_key("question", r["question_id"])) or split_by_text.get(_normalised(r["question"])) or ""
        rows.append({"question_id": r["question_id"], "ext_id": r["ext_id"], "question": r["question"], "gold": " | ".join(r["answers"]),
                     "bise_before": r["bise"], "bise_after": bise_after, "moved": moved_label(r["bise"], bise_after),
                     "correct_before": r["correct"], "correct_after": None if a is None else a["correct"],
                     "p_unknown_before": float(pb), "p_unknown_after": p_after.get(r["question_id"]),
                     "in_training": split == "train", "finetune_split": split, "se_before": r["se"], "se_after": se_after})
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return frame.astype({"bise_before": "Int64", "bise_after": "Int64", "correct_before": "Int64", "correct_after": "Int64",
                         "p_unknown_after": "float64", "se_after": "float64"})


def shift_table(finetune_id: int):
    """One row per pool question: BiSE, correctness and the saved probe's P(unknown) before and after, ``moved``
    ("unknown → known", "known → unknown" or ""), ``in_training`` (a training pair of this fine-tune) and
    ``finetune_split`` ('train', 'eval' (held out) or '' (not in its data)), and the SE on both sides."""
    return _table(_runs(finetune_id))


def moved_counts_by_training(table) -> dict[str, dict[str, int]]:
    """How many questions moved each way, among those the fine-tune trained on and the rest.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"moved": ["unknown → known", "", "unknown → known", "known → unknown"], "in_training": [True, True, False, False]})
    >>> moved_counts_by_training(t)["trained"]
    {'n': 2, 'unknown → known': 1, 'known → unknown': 0}
    """
    out = {}
    for name, part in (("trained", table[table["in_training"]]), ("not trained", table[~table["in_training"]])):
        out[name] = {"n": int(len(part)), UNKNOWN_TO_KNOWN: int((part["moved"] == UNKNOWN_TO_KNOWN).sum()),
                     KNOWN_TO_UNKNOWN: int((part["moved"] == KNOWN_TO_UNKNOWN).sum())}
    return out


def _share(column) -> float | None:
    """Mean of a column's known values (a share for 0 / 1 columns); None when none is known.

    >>> import pandas as pd
    >>> _share(pd.Series([1, 0, None, 1], dtype="Int64")), _share(pd.Series([None, None], dtype="Int64"))
    (0.6666666666666666, None)
    """
    import pandas as pd

    known = pd.to_numeric(column, errors="coerce").dropna()
    return float(known.mean()) if len(known) else None


def shift_summary(finetune_id: int) -> dict[str, Any]:
    """The boundary before and after fine-tune ``finetune_id``: shares unknown (at the base run's threshold),
    how many questions moved each way, shares answered correctly (None without gold answers), the saved
    probe's mean P(unknown) on the base and the tuned model's states; and what it was computed from."""
    ctx = _runs(finetune_id)
    table = _table(ctx)
    both = table[table["bise_before"].notna() & table["bise_after"].notna()]
    after = ctx["after"]
    return {
        "finetune_id": finetune_id, "base_run_id": ctx["base"]["id"], "reprobe_run_id": after["id"], "n": int(len(both)),
        "share_unknown_before": _share(both["bise_before"]), "share_unknown_after": _share(both["bise_after"]),
        "n_unknown_to_known": int((both["moved"] == UNKNOWN_TO_KNOWN).sum()),
        "n_known_to_unknown": int((both["moved"] == KNOWN_TO_UNKNOWN).sum()),
        "correct_before": _share(table["correct_before"]), "correct_after": _share(table["correct_after"]),
        "p_unknown_before_mean": _share(table["p_unknown_before"]), "p_unknown_after_mean": _share(table["p_unknown_after"]),
        "gamma": ctx["base"]["threshold"]["gamma"], "threshold_rule": ctx["base"]["threshold"]["rule"],
        "probe_id": ctx["probe"]["id"], "layer": ctx["probe"]["layer"], "moved_by_training": moved_counts_by_training(table),
        "reprobe_status": after["status"], "reprobe_error": after["error"],
    }


def _cache_path(base_run_id: int, reprobe_run_id: int, layer: int, method: str):
    return arrays_dir() / f"shift-run-{base_run_id}-run-{reprobe_run_id}-layer{layer}-{method}.npy"


def shift_projection(finetune_id: int, layer: int | None = None, method: str = "pca"):
    """Before and after in ONE 2-D map: the projection (``maps.fit_projection``) is fitted on the base run's
    states at ``layer`` (default: the saved probe's) and places the tuned model's states of the same questions
    in it. Columns x, y, when ('before' / 'after'), question_id, question, bise (of that side), moved; the
    'before' rows are the base run's own map (``maps.run_projection``). Computed once, then read from disk."""
    import pandas as pd

    if method not in METHODS:
        raise ConfigError(f"Unknown projection {method!r}. Choose one of: {', '.join(METHODS)}.")
    ctx = _runs(finetune_id)
    table = _table(ctx)
    layer = int(ctx["probe"]["layer"]) if layer is None else int(layer)
    before, after = HiddenStates.open(ctx["base"]["hidden_path"]), HiddenStates.open(ctx["after"]["hidden_path"])  # (n, L + 1, hidden)
    if layer not in before.layers or layer not in after.layers:
        raise ConfigError(f"Layer {layer} does not exist; these runs have layers 0..{min(before.shape[1], after.shape[1]) - 1}.")
    if before.shape != after.shape:
        raise ConfigError(f"The base run's hidden states {before.shape} and the re-probe run's {after.shape} differ in shape; "
                          f"re-probe fine-tune {finetune_id} again.")
    path = _cache_path(ctx["base"]["id"], ctx["after"]["id"], layer, method)
    if path.is_file():
        coords = np.load(path)
    else:
        xy_before, place = fit_projection(before.layer(layer), method)  # (n, 2)
        coords = np.concatenate([xy_before, place(after.layer(layer))])  # (2n, 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npy")
        np.save(tmp, coords)
        tmp.rename(path)
    n = len(table)
    if coords.shape != (2 * n, 2):
        raise ConfigError(f"The projection has {len(coords)} points for {n} questions before and after; delete {path} and try again.")
    side = lambda when, bise: pd.DataFrame({"when": when, "question_id": table["question_id"], "question": table["question"],  # noqa: E731
                                            "bise": table[bise], "moved": table["moved"]})
    frame = pd.concat([side("before", "bise_before"), side("after", "bise_after")], ignore_index=True)
    frame.insert(0, "y", coords[:, 1].astype(np.float64))
    frame.insert(0, "x", coords[:, 0].astype(np.float64))
    return frame
