"""App benchmark on a synthetic 10,000-question Stage 1 run (random hidden states of the embedded
model's size: 31 x 576). Times the Scores and Map pages' scripts after the first load (AppTest:
server-side time, not browser paint) and UMAP on 10,000 x 576. Writes bench/results/app.json.

    .venv/bin/python bench/bench_app.py [--n 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_synthetic_run(n: int, layers: int = 30, dim: int = 576, seed: int = 0) -> int:
    import numpy as np

    from ka2l.config import ProbeConfig, Stage1Config, config_hash, to_dict
    from ka2l.paths import arrays_dir, probes_dir
    from ka2l.probing.runs import versions
    from ka2l.probing.stage1 import _stage_labels
    from ka2l.pools.reader import PoolData, QuestionRow
    from ka2l.probing.probes import probe_layers, save_probe
    from ka2l.store import queries as Q
    from ka2l.store.arrays import create_array
    from ka2l.store.db import connect

    rng = np.random.default_rng(seed)
    cfg = Stage1Config(probe=ProbeConfig(kind="logistic", bootstrap=0))
    pool = PoolData("synthetic", "bench", [QuestionRow(str(i), f"Synthetic question number {i}?", (f"answer {i}",)) for i in range(n)], n)
    with connect() as db:
        pool_id = Q.insert_pool(db, pool)
        qids = [q["id"] for q in Q.pool_questions(db, pool_id)]
        run_id = Q.create_run(db, pool_id, "stage1", to_dict(cfg), config_hash(cfg), "synthetic", versions())
        path = arrays_dir() / f"run-{run_id}-hidden.npy"
        hidden = create_array(path, (n, layers + 1, dim))
        signal = rng.integers(0, 2, n)
        for s in range(0, n, 1000):
            block = rng.normal(size=(min(1000, n - s), layers + 1, dim)).astype(np.float16)
            block[:, 14] += (signal[s : s + 1000, None] * 0.5).astype(np.float16)
            hidden[s : s + 1000] = block
        hidden.flush()
        Q.update_run(db, run_id, hidden_path=str(path), n_layers=layers, hidden_size=dim)
        se = np.clip(rng.normal(0.4 + 1.2 * signal, 0.4), 0, None)
        Q.insert_scores(db, run_id, [
            {"question_id": q, "cluster_ids": [0], "n_clusters": 1 + int(s_ * 3), "judge_calls": 40, "verdicts": [], "se": float(s_),
             "se_weighted": float(s_) * 0.9, "regular_entropy": float(s_) + 1, "mean_loglik": -float(s_), "correct": int(rng.random() > s_ / 2)}
            for q, s_ in zip(qids, se)])
        _stage_labels(db, run_id, cfg)
        bise = [r["bise"] for r in Q.load_scores(db, run_id)]
        res = probe_layers(hidden, bise, cfg.probe, layers=[14])
        ppath = save_probe(probes_dir() / f"run-{run_id}", res.net, "logistic", 14, cfg.probe, {"target": "bise"})
        metrics = {"split": res.split.to_dict(), "best_layer": 14, "baselines": [], "robustness": [], "test_auroc": res.best.test_auroc,
                   "test_ci": [res.best.test_ci_low, res.best.test_ci_high], "val_auroc": res.best.val_auroc, "test_auroc_correct": None}
        Q.insert_probe(db, run_id, "logistic", "bise", 14, str(ppath), to_dict(cfg.probe), metrics, [vars(s) for s in res.layers])
        Q.update_run(db, run_id, status="done", stage="done")
    return run_id


def time_page(page: str, extra=None) -> tuple[float, float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.switch_page(f"app_pages/{page}.py")
    t0 = time.perf_counter()
    at.run()
    first = time.perf_counter() - t0
    assert not at.exception, at.exception
    t0 = time.perf_counter()
    at.run()
    again = time.perf_counter() - t0
    assert not at.exception, at.exception
    return first, again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "app.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KA2L_DATA_DIR"] = tmp
        import numpy as np

        from ka2l.views.maps import project
        from ka2l.store.arrays import open_array
        from ka2l.store.db import connect
        from ka2l.store import queries as Q

        t0 = time.perf_counter()
        run_id = build_synthetic_run(args.n)
        build_s = time.perf_counter() - t0
        scores_first, scores_again = time_page("scores")
        map_first, map_again = time_page("map")
        with connect() as db:
            hidden = open_array(Q.get_run(db, run_id)["hidden_path"])
        x = np.asarray(hidden[:, 14], dtype=np.float32)
        t0 = time.perf_counter()
        project(x[:100], "umap")  # numba compiles UMAP once per process
        jit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        project(x, "umap")
        umap_s = time.perf_counter() - t0
    result = {"n_questions": args.n, "hidden_shape": [args.n, 31, 576], "build_s": round(build_s, 1),
              "scores_page_first_s": round(scores_first, 2), "scores_page_after_first_s": round(scores_again, 2),
              "map_page_first_s": round(map_first, 2), "map_page_after_first_s": round(map_again, 2),
              "umap_compile_once_s": round(jit_s, 1), "umap_10k_x_576_s": round(umap_s, 1), "targets": {"page_after_first_s": 2.0, "umap_s": 60.0}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, v in result.items():
        print(f"{k:<28} {v}")


if __name__ == "__main__":
    main()
